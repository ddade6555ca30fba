"""One typed config for every stage: loaded from YAML, overridden with dotted `key=value`
arguments, validated, and saved beside every run.

Unknown keys, wrong types and out-of-range values raise `ConfigError` naming the dotted key
and the file it came from, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is malformed; the message names the dotted key at fault."""


@dataclass
class DataConfig:
    # Where the demo screen is generated when `train_manifest` does not exist yet (jobs/demo.py).
    screen_dir: str = "demo_output/screen"
    synthetic_layout: str = "demo"
    synthetic_seed: int = 0
    train_manifest: str = "demo_output/screen/train.parquet"
    # Per image and channel (cellfm.data.normalize): percentile = clip to [clip_low, clip_high]
    # percentiles -> [0, 1]; clahe = that + adaptive histogram equalization; standardize = z-score;
    # none = raw stored intensities (for models with their own input normalization).
    normalization: str = "percentile"
    clip_low: float = 1.0
    clip_high: float = 99.0
    clahe_clip_limit: float = 0.01  # fraction of a tile's pixels per histogram bin (skimage convention)
    clahe_tiles: int = 8  # tiles per image side
    channel_permutation: bool = True
    # Mixed channel counts (e.g. 5-, 4- and 1-channel plates in one run): pad = every field is
    # zero-padded to pad_channels_to channels (0 = the largest count) with a channel mask; group =
    # no padding, each training batch holds fields of one channel count.
    mixed_channels: str = "pad"
    pad_channels_to: int = 0
    # Field edge in pixels delivered to the trainer (0 = as stored; all fields must then share one
    # size). crop = centre crop (reads only the tiles it covers; smaller fields are resized up),
    # resize = the whole field resized.
    field_size: int = 0
    field_resize: str = "crop"
    # What crosses Ray's object store: float16, or uint8 (256 levels of [0, 1]; half the bytes;
    # training streams with percentile/clahe only).
    transfer_dtype: str = "float16"
    # Unreadable/corrupt fields: fail = stop with an error naming plate/well/field; skip = drop,
    # count and report them, failing once more than max_bad_fraction of the fields are bad.
    bad_field_policy: str = "fail"
    max_bad_fraction: float = 0.01
    use_zarrs: bool = False  # Rust codec pipeline (optional extra cellfm[zarrs]) in the read tasks
    # Bounded memory: Ray Data object-store budget for this dataset (0 = Ray's default fraction) and
    # the most read tasks in flight (0 = as many as CPUs allow).
    object_store_limit_mb: int = 0
    read_concurrency: int = 0
    # Reads in a pool of this many long-lived reader actors (read_cpus each, two blocks queued per
    # actor) instead of tasks (0): no scheduling gap between blocks, so a higher sustained rate on
    # long streams (benchmarks/pipeline.py), but every pass first starts the actors (seconds).
    read_actors: int = 0
    progress_interval_s: float = 30.0  # a "[cellfm] data: ... fields/s" line this often (0 = off)
    # Fractional CPUs per read task: on a 2-core machine whole CPUs for reads starve training (STACK_NOTES).
    read_cpus: float = 0.5
    read_batch_size: int = 8
    shuffle_buffer: int = 64
    # Training only: read and normalize every field once, before the first epoch, and keep them in Ray's
    # object store (cellfm.data.pipeline.FieldCache); every epoch then takes its fields from memory
    # instead of the plates. For screens that fit: the run refuses one above cache_max_mb.
    cache_fields: bool = False
    cache_max_mb: int = 4096
    storage_options: dict = field(default_factory=dict)


@dataclass
class ModelConfig:
    name: str = "cellrep"  # cellrep | c3r | vit_rgb | channelvit | single_channel
    size: str = "tiny"  # tiny | small | base | large (see cellfm.models.registry.SIZES)
    patch_size: int = 8
    img_size: int = 64
    mixer_depth: int = 2
    channel_encoder_dim: int = 64
    channel_encoder_stride: int = 2
    pooling_ratio: int = 1
    num_register_tokens: int = 0
    drop_path_rate: float = 0.0
    # DINOv2 uses 1e-5 at scale; small models trained briefly need a larger value (or none) so the
    # CLS token depends on the input from the first step (else DINO collapses to uniform).
    layerscale_init: typing.Optional[float] = 0.1
    # In-model per-channel preprocessing (CellRep): none | percentile | adaptive_hist.
    input_norm: str = "none"
    # C3R: depth of the per-group branch encoders f_c (the joint encoder gets depth - n_pre // 2 blocks).
    n_pre: int = 2
    # C3R: channel name -> "context" | "concept". Overrides the manifest's channel_groups, e.g. at
    # inference for stains never seen in training.
    channel_groups: dict = field(default_factory=dict)
    # ChannelViT: the channel names that get a learned embedding (empty: the training manifest's).
    channel_vocabulary: list = field(default_factory=list)


@dataclass
class SSLConfig:
    # dino: DINO CLS loss only (CellRep); ibot: DINO + masked-patch iBOT loss (C3R, baselines).
    objective: str = "dino"
    ibot_loss_weight: float = 1.0
    # A separate iBOT patch head (DINOv2's recipes) or the DINO head shared (C3R's code).
    ibot_separate_head: bool = True
    mask_ratio_min_max: list = field(default_factory=lambda: [0.1, 0.5])
    mask_sample_probability: float = 0.5
    koleo_weight: float = 0.0
    # Masked Context Distillation (C3R): the student keeps k context channels, k drawn per sample
    # from this set (empty: {1..C1}); the teacher sees all; concept channels are never dropped.
    mcd: bool = False
    mcd_keep_counts: list = field(default_factory=list)
    # Hierarchical channel sampling (ChannelViT): per sample the student sees m ~ U{1..n} of its n real
    # channels (the teacher all of them; never at evaluation). auto = hcs for model.name=channelvit, else
    # none; hcs and ssl.mcd both choose the student's channels, so they exclude each other.
    channel_sampling: str = "auto"
    # Weakly supervised SupCon on a manifest label column (e.g. an antibody id); 0 disables it.
    supcon_weight: float = 0.0
    supcon_temperature: float = 0.1
    supcon_label: str = ""
    head_out_dim: int = 4096
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    # BatchNorm in the head's hidden layers (DINO's option): batch statistics remove the component
    # every image shares, so the teacher's targets differ between images from the first step.
    head_use_bn: bool = False
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 5
    center_momentum: float = 0.9
    centering: str = "centering"  # centering | sinkhorn_knopp
    kl_uniform_weight: float = 0.1
    ema_momentum_start: float = 0.992
    ema_momentum_end: float = 1.0
    freeze_last_layer_epochs: int = 1
    global_crop_size: int = 64
    local_crop_size: int = 32
    n_local_crops: int = 4
    global_crop_scale: list = field(default_factory=lambda: [0.32, 1.0])
    local_crop_scale: list = field(default_factory=lambda: [0.05, 0.32])
    intensity_jitter: float = 0.2
    # Probability that a view is Gaussian-blurred, and the sigma range in pixels of the view.
    blur_probability: float = 0.0
    blur_sigma: list = field(default_factory=lambda: [0.1, 2.0])
    # Random flips / 90-degree rotations, drawn independently per view.
    flip: bool = True
    rot90: bool = True


@dataclass
class OptimConfig:
    epochs: int = 10
    batch_size_per_worker: int = 32
    # DINOv2 rule: lr = base_lr * sqrt(global_batch / 1024).
    base_lr: float = 4e-3
    min_lr: float = 1e-6
    warmup_epochs: int = 1
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    # DINOv2 parameter groups: lr of trunk block i scaled by layerwise_decay**(depth - i); the
    # patch/channel embedding's lr scaled by patch_embed_lr_mult.
    layerwise_decay: float = 1.0
    patch_embed_lr_mult: float = 1.0
    # Micro-batches per optimizer step (global batch = batch_size_per_worker * workers * this).
    accumulate_steps: int = 1


@dataclass
class TrainConfig:
    # ddp: PyTorch DDP; deepspeed: DeepSpeed ZeRO (optimizer state, and at stage 2 gradients,
    # partitioned across workers) under the same Ray Train loop.
    engine: str = "ddp"
    # DeepSpeed ZeRO stage (train.engine=deepspeed): 1 = optimizer states, 2 = + gradients partitioned.
    zero_stage: int = 2
    # bf16 autocast on GPU (fp32 on CPU regardless).
    mixed_precision: str = "bf16"  # bf16 | fp32
    gpus_per_worker: float = 1.0
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    torch_threads: int = 1
    storage_path: str = "demo_output/runs"
    run_name: str = "cellrep-demo"
    num_to_keep: int = 2
    max_failures: int = 0
    seed: int = 0
    log_every_steps: int = 10
    # Peak dense bf16 FLOP/s of one GPU for the MFU estimate, in TFLOP/s (0 = from the GPU's name:
    # H100, H200, A100 known); ignored on CPU, where MFU is not reported.
    peak_tflops: float = 0.0


@dataclass
class EvalConfig:
    # Named held-out manifests: each is embedded and scored separately.
    manifests: dict = field(
        default_factory=lambda: {
            "seen": "demo_output/screen/heldout.parquet",
            "unseen": "demo_output/screen/unseen.parquet",
        }
    )
    labels: list = field(default_factory=lambda: ["perturbation_id", "moa"])
    # Well features normalized per plate against its negative controls (none | negcon).
    well_normalization: str = "negcon"
    test_fraction: float = 0.5
    split_seed: int = 0
    # Scores are the mean over this many fixed splits (seeds split_seed, split_seed + 1, ...).
    n_splits: int = 5
    batch_size: int = 32
    # Side length fields are resized to before embedding; 0 = as stored (native resolution; the
    # backbone interpolates its positional embedding).
    image_size: int = 0
    embed_actors: int = 1
    random_init_seed: int = 0
    output_dir: str = "demo_output/report"


@dataclass
class RayConfig:
    # None: connect to RAY_ADDRESS if set (e.g. under `ray job submit`), else start an embedded local Ray.
    address: typing.Optional[str] = None
    # Logical CPUs of the embedded Ray; more than the physical cores so data tasks are never starved.
    num_cpus: int = 4


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "<dict>") -> "Config":
        cfg = _build(cls, raw, prefix="", source=source)
        validate(cfg, source)
        return cfg


_CHOICES = {
    "data.normalization": {"percentile", "clahe", "standardize", "none"},
    "data.field_resize": {"crop", "resize"},
    "data.transfer_dtype": {"float16", "uint8"},
    "data.bad_field_policy": {"fail", "skip"},
    "data.mixed_channels": {"pad", "group"},
    "model.name": {"cellrep", "c3r", "vit_rgb", "channelvit", "single_channel"},
    "ssl.objective": {"dino", "ibot"},
    "ssl.channel_sampling": {"auto", "none", "hcs"},
    "model.input_norm": {"none", "percentile", "adaptive_hist"},
    "model.size": {"tiny", "small", "base", "large"},
    "ssl.centering": {"centering", "sinkhorn_knopp"},
    "train.engine": {"ddp", "deepspeed"},
    "train.mixed_precision": {"bf16", "fp32"},
    "eval.well_normalization": {"none", "negcon"},
}

_POSITIVE = (
    "model.patch_size", "model.img_size", "model.pooling_ratio", "model.channel_encoder_dim",
    "model.channel_encoder_stride",
    "ssl.head_out_dim", "ssl.global_crop_size", "ssl.local_crop_size",
    "optim.epochs", "optim.batch_size_per_worker", "optim.base_lr", "optim.accumulate_steps",
    "optim.layerwise_decay", "optim.patch_embed_lr_mult", "train.gpus_per_worker",
    "train.num_workers", "train.cpus_per_worker", "train.torch_threads", "train.num_to_keep",
    "data.read_cpus", "data.read_batch_size", "data.clahe_clip_limit", "data.clahe_tiles", "data.cache_max_mb",
    "eval.batch_size", "eval.embed_actors", "eval.n_splits",
)


def validate(cfg: Config, source: str = "<config>") -> None:
    """Checks that go beyond types: allowed choices, positive sizes, consistent crop geometry."""
    for key, allowed in _CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{source}: {key}={value!r} is not one of {sorted(allowed)}")
    for key in _POSITIVE:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{source}: {key} must be > 0, got {_get(cfg, key)!r}")
    if cfg.eval.image_size < 0 or cfg.eval.image_size % cfg.model.patch_size:
        raise ConfigError(f"{source}: eval.image_size={cfg.eval.image_size} must be 0 or a multiple of model.patch_size")
    for key in ("model.mixer_depth", "ssl.n_local_crops", "train.max_failures", "model.num_register_tokens",
                "data.read_concurrency", "data.read_actors"):
        if _get(cfg, key) < 0:
            raise ConfigError(f"{source}: {key} must be >= 0, got {_get(cfg, key)!r}")
    if not 0 <= cfg.data.clip_low < cfg.data.clip_high <= 100:
        raise ConfigError(
            f"{source}: need 0 <= data.clip_low < data.clip_high <= 100, got {cfg.data.clip_low}, {cfg.data.clip_high}"
        )
    for key in ("ssl.global_crop_size", "ssl.local_crop_size", "model.img_size"):
        if _get(cfg, key) % cfg.model.patch_size:
            raise ConfigError(f"{source}: {key}={_get(cfg, key)} is not a multiple of model.patch_size={cfg.model.patch_size}")
    for key in ("ssl.global_crop_scale", "ssl.local_crop_scale"):
        lo_hi = _get(cfg, key)
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
            raise ConfigError(f"{source}: {key} must be [low, high] with 0 < low <= high <= 1, got {lo_hi!r}")
    if not 0 <= cfg.ssl.blur_probability <= 1:
        raise ConfigError(f"{source}: ssl.blur_probability must be in [0, 1], got {cfg.ssl.blur_probability}")
    if len(cfg.ssl.blur_sigma) != 2 or not 0 <= cfg.ssl.blur_sigma[0] <= cfg.ssl.blur_sigma[1]:
        raise ConfigError(f"{source}: ssl.blur_sigma must be [low, high] pixels with 0 <= low <= high, "
                          f"got {cfg.ssl.blur_sigma!r}")
    if cfg.train.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: train.zero_stage must be 0, 1, 2 or 3, got {cfg.train.zero_stage!r}")
    if cfg.train.engine == "deepspeed" and cfg.train.zero_stage not in (1, 2):
        # Stage 0 is plain data parallelism (train.engine=ddp does that); stage 3 partitions the
        # parameters themselves, which the EMA teacher update and our pickle-free checkpoints do not handle.
        raise ConfigError(f"{source}: train.zero_stage={cfg.train.zero_stage} is not supported with "
                          f"train.engine=deepspeed; use 1 or 2 (or train.engine=ddp for unpartitioned training)")
    if cfg.train.seed < 0:
        raise ConfigError(f"{source}: train.seed must be >= 0, got {cfg.train.seed}")
    if cfg.ssl.mcd and student_channel_sampling(cfg) == "hcs":
        raise ConfigError(f"{source}: ssl.mcd=true and hierarchical channel sampling (ssl.channel_sampling="
                          f"{cfg.ssl.channel_sampling} with model.name={cfg.model.name}) both choose the student's "
                          f"channels; set ssl.channel_sampling=none or ssl.mcd=false")
    if cfg.train.peak_tflops < 0:
        raise ConfigError(f"{source}: train.peak_tflops must be >= 0, got {cfg.train.peak_tflops!r}")
    if not 0 < cfg.eval.test_fraction < 1:
        raise ConfigError(f"{source}: eval.test_fraction must be in (0, 1), got {cfg.eval.test_fraction}")
    if not cfg.eval.manifests:
        raise ConfigError(f"{source}: eval.manifests is empty; name at least one held-out manifest")


def student_channel_sampling(cfg: Config) -> str:
    """How the training step chooses the channels the student sees, besides MCD: "hcs" (hierarchical
    channel sampling) or "none". `ssl.channel_sampling: auto` means hcs for ChannelViT (its paper trains
    with it), none for every other model."""
    if cfg.ssl.channel_sampling == "auto":
        return "hcs" if cfg.model.name == "channelvit" else "none"
    return cfg.ssl.channel_sampling


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- dotted `key=value` overrides (values parsed as YAML scalars/lists)."""
    raw: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        with open(path) as fh:
            try:
                loaded = yaml.safe_load(fh)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        _set_nested(raw, key.strip().split("."), yaml.safe_load(value) if value != "" else "", item)
    src = source if not overrides else f"{source} + overrides"
    return Config.from_dict(raw, source=src)


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".yaml", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)
    os.replace(tmp, path)
    return path


def _set_nested(raw: dict, keys: list[str], value: Any, item: str) -> None:
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {k!r} is not a section")
    node[keys[-1]] = value


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for k in dotted.split("."):
        node = getattr(node, k)
    return node


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"{source}: unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys under {where}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name in names & set(raw):
        kwargs[name] = _coerce(hints[name], raw[name], prefix + name, source)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str, source: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", source)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads `1e-5` (no dot) as a string; accept any float literal.
        try:
            return float(value)
        except ValueError:
            pass
    expected = {int: int, float: float, str: str, bool: bool, list: list, dict: dict}[hint]
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {key} must be {expected.__name__}, got {value!r} ({type(value).__name__})")
    return value
