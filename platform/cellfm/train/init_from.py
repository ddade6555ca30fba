"""Continued pre-training (`train.init_from`): a new run starts from an existing checkpoint's student, teacher,
heads and teacher centers, with a fresh optimizer and schedules, on its own plates (DINOv2's most requested
feature; the CellRep paper's "DINOv2 Finetuned" row).

Before Ray starts (`cellfm.preflight`, `cellfm.train.trainer.run_pretraining`) the checkpoint's architecture is
checked against the config: both students are built on the meta device (no memory, no weights read) from the
checkpoint's config.yaml and from this config, and where their parameter shapes differ, the problem line names
the config key(s) that make the difference. Channel names: CellRep, C3R (each stain needs a context/concept
group, from the manifest or model.channel_groups) and CA-MAE have no parameter tied to a channel name, so they
continue on any channels; ChannelViT and DiChaViT have one learned embedding per name of the checkpoint's
vocabulary (adopted when model.channel_vocabulary is empty), and a training channel outside it is a problem."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from cellfm.config import Config, ConfigError
from cellfm import storage
from cellfm.train.checkpoint import STATE_FILE, latest_checkpoint, load_checkpoint_config

# The config keys that shape the student's parameters, in the order a mismatch is reported.
ARCHITECTURE_KEYS = (
    "model.name", "model.size", "model.patch_size", "model.img_size", "model.num_register_tokens",
    "model.layerscale_init", "model.mixer_depth", "model.channel_encoder_dim", "model.channel_encoder_stride",
    "model.pooling_ratio", "model.channel_mixer", "model.channel_pooling", "model.channel_pooling_queries",
    "model.n_pre", "model.channel_vocabulary",
    "ssl.objective", "ssl.ibot_separate_head", "ssl.head_out_dim", "ssl.head_hidden_dim", "ssl.head_bottleneck_dim",
    "ssl.head_nlayers", "ssl.head_use_bn", "ssl.mae_decoder_dim", "ssl.mae_decoder_depth", "ssl.mae_decoder_heads",
)


def resolve_init_from(path: str, storage_options: dict | None = None) -> str:
    """The checkpoint folder `path` names: itself if it holds a checkpoint, else the latest checkpoint of the
    run folder it is (CheckpointError if it has none)."""
    if storage.is_remote(path):
        try:
            storage.read_text(f"{path.rstrip('/')}/{STATE_FILE}", storage_options)
            return path
        except FileNotFoundError:
            return str(latest_checkpoint(path, storage_options))
    return path if (Path(path) / STATE_FILE).is_file() else str(latest_checkpoint(path))


def init_from_config(cfg: Config) -> Config | None:
    """The config the `train.init_from` checkpoint was saved with; None when train.init_from is empty or the
    checkpoint cannot be read (`init_from_problems` reports why)."""
    if not cfg.train.init_from:
        return None
    options = cfg.data.storage_options or None
    try:
        return load_checkpoint_config(resolve_init_from(cfg.train.init_from, options), options)
    except (ConfigError, ValueError, OSError):
        return None


def init_from_problems(cfg: Config, manifest: pd.DataFrame) -> list[str]:
    """Why the `train.init_from` checkpoint cannot start a run of `cfg` on `manifest`'s channels (one line each,
    naming the key); [] when it can or train.init_from is empty. Reads the checkpoint's config.yaml only."""
    if not cfg.train.init_from:
        return []
    from cellfm.models.registry import VOCABULARY_BACKBONES
    from cellfm.train.inputs import record_channel_metadata

    key = f"train.init_from={cfg.train.init_from}"
    options = cfg.data.storage_options or None
    try:
        source = load_checkpoint_config(resolve_init_from(cfg.train.init_from, options), options)
    except (ConfigError, ValueError, OSError) as exc:
        return [f"{key}: {exc}"]
    run = copy.deepcopy(cfg)
    try:
        record_channel_metadata(run, manifest)
    except ConfigError:
        return []  # the manifest's own problem, reported by the training manifest's checks
    if run.model.name in VOCABULARY_BACKBONES and source.model.name == run.model.name:
        vocabulary = source.model.channel_vocabulary
        if run.model.channel_vocabulary != vocabulary:
            return [f"{key}: model.channel_vocabulary={run.model.channel_vocabulary} is not the checkpoint's "
                    f"{vocabulary} (one learned embedding per name, in that order); leave it empty to use the "
                    f"checkpoint's"]
        unknown = sorted({n for names in manifest["channel_names"] for n in names} - set(vocabulary))
        if unknown:
            return [f"{key}: channel(s) {unknown} of data.train_manifest are not in the checkpoint's "
                    f"model.channel_vocabulary {vocabulary}; {run.model.name} embeds only the channels it was "
                    f"trained on (CellRep, C3R and CA-MAE continue on any channels)"]
    return architecture_problems(run, source, key)


def architecture_problems(cfg: Config, source: Config, key: str) -> list[str]:
    """[] when a student built from `cfg` has the parameters (names and shapes) of one built from `source`;
    else one line, prefixed by `key`, naming the architecture keys whose values make the difference."""
    shapes = student_shapes(cfg)
    source_shapes = student_shapes(source)
    if shapes == source_shapes:
        return []
    culprits = []
    for name in ARCHITECTURE_KEYS:
        if _get(cfg, name) == _get(source, name):
            continue
        reverted = copy.deepcopy(cfg)
        _set(reverted, name, copy.deepcopy(_get(source, name)))
        try:
            if student_shapes(reverted) != shapes:
                culprits.append(name)
        except ValueError:  # the key alone does not make a buildable model: it matters
            culprits.append(name)
    if culprits:
        return [f"{key}: the checkpoint's architecture differs in "
                + ", ".join(f"{name} (checkpoint {_get(source, name)!r}, this run {_get(cfg, name)!r})"
                            for name in culprits)
                + "; set them as the checkpoint has them to continue from it"]
    differing = sorted(set(shapes.items()) ^ set(source_shapes.items()))
    return [f"{key}: the checkpoint's student does not fit this run's model (first difference: parameter "
            f"{differing[0][0]}); compare its config.yaml's model and ssl sections"]


def student_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the student `cfg` builds (parameters and buffers), built on the meta
    device (no memory is allocated, nothing is initialized)."""
    from cellfm.train.self_distillation import build_student_teacher

    with torch.device("meta"):
        student, _ = build_student_teacher(cfg)
    return {name: tuple(t.shape) for name, t in student.state_dict().items()}


def _get(cfg: Config, dotted: str) -> Any:
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def _set(cfg: Config, dotted: str, value: Any) -> None:
    section, name = dotted.split(".")
    setattr(getattr(cfg, section), name, value)
