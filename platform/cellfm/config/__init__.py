"""One typed config for every stage: loaded from YAML, overridden with dotted `key=value`
arguments, validated, and saved beside every run.

Unknown keys, wrong types and out-of-range values raise `ConfigError` naming the dotted key
and the file it came from, so a typo never silently falls back to a default. Every problem is
reported at once (`ConfigError.problems`, one line each), not just the first.

This package's names below are its public API, which the rest of cellfm imports from `cellfm.config`;
each lives in one module: the schema (`schema`: the sections and their documented keys), the rules beyond
types (`rules`), typed YAML and dotted overrides (`typed_yaml`), credentials (`credentials`: saved configs
hold `CREDENTIAL_MARKER`, never a credential), the config file (`files`) and the errors (`errors`).
"""

from cellfm.config.credentials import CREDENTIAL_MARKER, is_credential_key, saved_config_dict
from cellfm.config.errors import ConfigError, PreflightError
from cellfm.config.files import config_source, load_config, save_config
from cellfm.config.rules import (
    CHANNEL_GROUPS,
    CHANNEL_READOUTS,
    EVAL_PROTOCOLS,
    PLATE_PROTOCOLS,
    config_problems,
    data_config_problems,
    student_channel_sampling,
    validate,
)
from cellfm.config.schema import (
    Config,
    DataConfig,
    EvalConfig,
    FeaturesConfig,
    ModelConfig,
    OptimConfig,
    RayConfig,
    SSLConfig,
    TrainConfig,
)
from cellfm.config.typed_yaml import read_yaml_mapping, typed_from_mapping

__all__ = [
    "CHANNEL_GROUPS", "CHANNEL_READOUTS", "CREDENTIAL_MARKER", "EVAL_PROTOCOLS", "PLATE_PROTOCOLS", "Config",
    "ConfigError", "DataConfig", "EvalConfig", "FeaturesConfig", "ModelConfig", "OptimConfig", "PreflightError",
    "RayConfig", "SSLConfig", "TrainConfig", "config_problems", "config_source", "data_config_problems",
    "is_credential_key", "load_config", "read_yaml_mapping", "save_config", "saved_config_dict",
    "student_channel_sampling", "typed_from_mapping", "validate",
]
