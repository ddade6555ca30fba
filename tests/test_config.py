import pytest
import yaml

from cellfm.config import Config, ConfigError, load_config, save_config
from tests.conftest import SMOKE_CONFIG, REPO


def test_defaults_yaml_and_overrides_layer_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  epochs: 3\nmodel:\n  pooling_ratio: 2\n")
    cfg = load_config(path, ["optim.epochs=5", "ssl.global_crop_scale=[0.4, 1.0]", "ray.address=auto"])
    assert cfg.optim.epochs == 5  # override beats file
    assert cfg.model.pooling_ratio == 2  # file beats default
    assert cfg.model.patch_size == Config().model.patch_size  # default kept
    assert cfg.ssl.global_crop_scale == [0.4, 1.0]
    assert cfg.ray.address == "auto"
    assert isinstance(cfg.optim.base_lr, float)


def test_int_accepted_for_float_but_not_string_for_int(tmp_path):
    assert load_config(None, ["optim.base_lr=1"]).optim.base_lr == 1.0
    assert load_config(None, ["optim.base_lr=1e-4"]).optim.base_lr == 1e-4  # YAML 1.1 reads this as a string
    with pytest.raises(ConfigError, match=r"optim\.base_lr must be float"):
        load_config(None, ["optim.base_lr=fast"])
    with pytest.raises(ConfigError, match=r"optim\.epochs must be int"):
        load_config(None, ["optim.epochs=three"])
    with pytest.raises(ConfigError, match=r"train\.use_gpu must be bool"):
        load_config(None, ["train.use_gpu=3"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("model:\n  nmae: cellrep\n", r"unknown config key\(s\) model\.nmae"),
        ("modle:\n  name: cellrep\n", r"unknown config key\(s\) modle"),
        ("model: 3\n", r"model must be a mapping"),
        ("- a\n- b\n", r"top level must be a mapping"),
        ("model:\n  name: vit_huge\n", r"model\.name='vit_huge' is not one of"),
        ("model:\n  patch_size: 7\n", r"not a multiple of model\.patch_size=7"),
        ("data:\n  clip_low: 99\n  clip_high: 1\n", r"clip_low < data\.clip_high"),
        ("optim:\n  epochs: 0\n", r"optim\.epochs must be > 0"),
        ("model: [unclosed\n", r"not valid YAML"),
    ],
)
def test_malformed_config_names_the_key_and_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert "bad.yaml" in str(info.value)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["optim.epochs"])
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(None, ["optim.epoch=3"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(SMOKE_CONFIG, ["optim.epochs=2"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp files left
    assert yaml.safe_load(path.read_text())["optim"]["epochs"] == 2


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_loads(name):
    load_config(REPO / "configs" / name)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.engine=horovod"], r"train\.engine='horovod' is not one of \['ddp', 'deepspeed'\]"),
        (["train.zero_stage=4"], r"train\.zero_stage must be 0, 1, 2 or 3, got 4"),
        (["train.engine=deepspeed", "train.zero_stage=3"], r"train\.zero_stage=3 is not supported with train\.engine=deepspeed"),
        (["train.engine=deepspeed", "train.zero_stage=0"], r"train\.zero_stage=0 is not supported with train\.engine=deepspeed"),
        (["train.peak_tflops=-1"], r"train\.peak_tflops must be >= 0"),
        (["ssl.blur_probability=1.5"], r"ssl\.blur_probability must be in \[0, 1\], got 1\.5"),
        (["ssl.blur_sigma=[2.0, 1.0]"], r"ssl\.blur_sigma must be \[low, high\] pixels"),
        (["eval.n_splits=0"], r"eval\.n_splits must be > 0"),
        (["data.read_actors=-1"], r"data\.read_actors must be >= 0, got -1"),
    ],
)
def test_engine_settings_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SMOKE_CONFIG, overrides)


def test_deepspeed_zero_1_and_2_are_accepted():
    for stage in (1, 2):
        cfg = load_config(SMOKE_CONFIG, ["train.engine=deepspeed", f"train.zero_stage={stage}"])
        assert (cfg.train.engine, cfg.train.zero_stage) == ("deepspeed", stage)


SECRETS = {"key": "AKIAEXAMPLEKEY0123", "secret": "example-secret-value-0123456789", "token": "example-session-token-xyz",
           "nested": "example-nested-secret-42"}


def _with_credentials() -> list[str]:
    return [f"data.storage_options={{endpoint_url: 'http://127.0.0.1:9000', key: {SECRETS['key']}, "
            f"secret: {SECRETS['secret']}, token: {SECRETS['token']}, anon: false, "
            f"client_kwargs: {{region_name: eu-west-1, aws_secret_access_key: {SECRETS['nested']}}}}}"]


def test_saved_config_keeps_storage_option_keys_but_no_credential(tmp_path):
    from cellfm.config import CREDENTIAL_MARKER

    cfg = load_config(SMOKE_CONFIG, _with_credentials())
    assert cfg.data.storage_options["secret"] == SECRETS["secret"]  # in memory, the job has them
    text = save_config(cfg, tmp_path / "config.yaml").read_text()
    assert not [name for name, value in SECRETS.items() if value in text]
    saved = yaml.safe_load(text)["data"]["storage_options"]
    assert saved == {"endpoint_url": "http://127.0.0.1:9000", "key": CREDENTIAL_MARKER, "secret": CREDENTIAL_MARKER,
                     "token": CREDENTIAL_MARKER, "anon": False,
                     "client_kwargs": {"region_name": "eu-west-1", "aws_secret_access_key": CREDENTIAL_MARKER}}
    # Loading it back (evaluation, resume) drops the markers: credentials then come from the environment.
    loaded = load_config(tmp_path / "config.yaml")
    assert loaded.data.storage_options == {"endpoint_url": "http://127.0.0.1:9000", "anon": False,
                                           "client_kwargs": {"region_name": "eu-west-1"}}
    # ... or from explicit options given again
    again = load_config(tmp_path / "config.yaml", [f"data.storage_options.secret={SECRETS['secret']}"])
    assert again.data.storage_options["secret"] == SECRETS["secret"]


def test_credentials_are_not_echoed_by_errors_or_repr():
    cfg = load_config(SMOKE_CONFIG, _with_credentials())
    assert not [name for name, value in SECRETS.items() if value in repr(cfg) + str(cfg.data)]
    with pytest.raises(ConfigError) as info:
        load_config(SMOKE_CONFIG, [f"data.storage_options={SECRETS['secret']}"])
    assert "data.storage_options must be a mapping, got a str" in str(info.value)
    assert SECRETS["secret"] not in str(info.value)


@pytest.mark.parametrize("name, credential", [("key", True), ("secret", True), ("token", True), ("password", True),
                                              ("aws_access_key_id", True), ("aws_session_token", True),
                                              ("endpoint_url", False), ("region_name", False), ("anon", False)])
def test_credential_keys(name, credential):
    from cellfm.config import is_credential_key

    assert is_credential_key(name) is credential
