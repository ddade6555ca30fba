"""The config's rules beyond types: allowed choices, ranges and cross-field rules (`config_problems`), each
problem one line naming the key(s) at fault and what is allowed. Rules that need the manifests live in
`cellfm.preflight`. The allowed values that other modules share (protocols, readouts, channel groups) are
named here."""

from __future__ import annotations

import dataclasses
import importlib.util
import typing
from typing import Any

from cellfm.config.errors import ConfigError

if typing.TYPE_CHECKING:  # the schema imports this module for its defaults
    from cellfm.config.schema import Config, DataConfig, FeaturesConfig

# The two channel groups of C3R and of the manifest's `channel_groups` column.
CHANNEL_GROUPS = ("context", "concept")

# Evaluation protocols, in report order (cellfm.evaluate.protocols runs them).
FEATURE_AGGREGATIONS = ("mean", "median")
FEATURE_NORMALIZATIONS = ("none", "standardize", "robust_mad", "spherize")
EVAL_PROTOCOLS = ("probe", "per_plate_probe", "lopo_probe", "compound_heldout", "nn_lopo", "replicate_map", "moa_consistency", "localization_map")
# How a field's features are read out of a backbone (cellfm.features.embed.field_embedding): one embedding
# of all channels, or each channel embedded alone and the embeddings concatenated in channel order.
CHANNEL_READOUTS = ("pooled", "per_channel")
# Protocols across plates: a manifest of one plate cannot give them.
PLATE_PROTOCOLS = ("per_plate_probe", "lopo_probe", "nn_lopo")


_CHOICES = {
    "data.normalization": {"percentile", "clahe", "standardize", "none"},
    "data.field_resize": {"crop", "resize"},
    "data.transfer_dtype": {"float16", "uint8"},
    "data.bad_field_policy": {"fail", "skip"},
    "data.mixed_channels": {"pad", "group"},
    "data.z_projection": {"", "max", "mean"},
    "data.crop_mode": {"field", "cells"},
    "model.name": {"cellrep", "c3r", "vit_rgb", "channelvit", "single_channel", "dichavit", "ca_mae"},
    "ssl.objective": {"dino", "ibot", "mae"},
    "ssl.channel_sampling": {"auto", "none", "hcs", "dcs"},
    "model.input_norm": {"none", "percentile", "adaptive_hist"},
    "model.channel_mixer": {"full", "axial"},
    "model.channel_pooling": {"mean", "attention"},
    "model.size": {"tiny", "small", "base", "large"},
    "ssl.centering": {"centering", "sinkhorn_knopp"},
    "train.engine": {"ddp", "deepspeed"},
    "train.mixed_precision": {"bf16", "fp32"},
    "eval.well_normalization": {"none", "negcon"},
    "eval.embedding_map": {"auto", "pca", "umap"},
    "features.normalization": set(FEATURE_NORMALIZATIONS),
}

_POSITIVE = (
    "model.patch_size", "model.img_size", "model.pooling_ratio", "model.channel_encoder_dim",
    "model.channel_encoder_stride", "model.channel_pooling_queries",
    "ssl.head_out_dim", "ssl.head_hidden_dim", "ssl.head_bottleneck_dim", "ssl.head_nlayers",
    "ssl.global_crop_size", "ssl.local_crop_size", "ssl.student_temp", "ssl.teacher_temp",
    "ssl.warmup_teacher_temp", "ssl.supcon_temperature", "ssl.dcs_temperature", "ssl.mae_decoder_dim",
    "ssl.mae_decoder_depth", "ssl.mae_decoder_heads",
    "optim.epochs", "optim.batch_size_per_worker", "optim.base_lr", "optim.accumulate_steps", "optim.clip_grad",
    "optim.layerwise_decay", "optim.patch_embed_lr_mult", "train.gpus_per_worker",
    "train.num_workers", "train.cpus_per_worker", "train.torch_threads", "train.num_to_keep",
    "train.log_every_steps",
    "data.read_cpus", "data.read_batch_size", "data.clahe_tiles", "data.cache_max_mb",
    "eval.batch_size", "eval.embed_actors", "eval.n_splits", "eval.n_compound_splits", "eval.copairs_null_size",
    "ray.num_cpus",
    "features.batch_size", "features.cpus_per_actor", "features.torch_threads", "features.gpus_per_actor",
)

_NON_NEGATIVE = (
    "data.synthetic_seed", "data.pad_channels_to", "data.field_size", "data.object_store_limit_mb",
    "data.read_concurrency", "data.read_actors", "data.progress_interval_s", "data.shuffle_buffer",
    "data.prefetch_batches",
    "model.mixer_depth", "model.num_register_tokens", "model.n_pre",
    "ssl.ibot_loss_weight", "ssl.koleo_weight", "ssl.supcon_weight", "ssl.kl_uniform_weight",
    "ssl.token_orthogonality_weight", "ssl.mae_fourier_weight",
    "ssl.warmup_teacher_temp_epochs", "ssl.freeze_last_layer_epochs", "ssl.n_local_crops",
    "optim.min_lr", "optim.warmup_epochs", "optim.weight_decay", "optim.weight_decay_end",
    "train.max_failures", "train.seed", "train.peak_tflops",
    "eval.split_seed", "eval.random_init_seed", "eval.image_size", "eval.copairs_seed",
    "features.actors", "features.spherize_regularization", "features.stale_run_s", "features.image_size",
    "ray.pending_timeout_s",
)

# Closed interval [0, 1].
_UNIT = ("data.max_bad_fraction", "ssl.mask_sample_probability", "ssl.center_momentum",
         "ssl.ema_momentum_start", "ssl.ema_momentum_end", "ssl.blur_probability")


def config_problems(cfg: Config) -> list[str]:
    """Every rule beyond types that the config alone decides: allowed choices, ranges, and the
    cross-field rules. One line per problem, naming the key(s) and what is allowed. Rules that need
    the manifests live in `cellfm.preflight`."""
    problems = data_config_problems(cfg.data)
    for f in dataclasses.fields(cfg):
        if f.name != "data":
            problems += _table_problems(getattr(cfg, f.name), f.name)
    problems += _model_problems(cfg)
    problems += _ssl_problems(cfg)
    o, t, e = cfg.optim, cfg.train, cfg.eval
    if o.warmup_epochs > o.epochs:
        problems.append(f"optim.warmup_epochs={o.warmup_epochs} is more than optim.epochs={o.epochs}; "
                        f"the warm-up must fit in the run (0 <= optim.warmup_epochs <= optim.epochs)")
    if t.zero_stage not in (0, 1, 2, 3):
        problems.append(f"train.zero_stage must be 0, 1, 2 or 3, got {t.zero_stage!r}")
    elif t.engine == "deepspeed" and t.zero_stage not in (1, 2):
        # Stage 0 is plain data parallelism (train.engine=ddp does that); stage 3 partitions the
        # parameters themselves, which the EMA teacher update and our pickle-free checkpoints do not handle.
        problems.append(f"train.zero_stage={t.zero_stage} is not supported with train.engine=deepspeed; use 1 or 2 "
                        f"(or train.engine=ddp for unpartitioned training)")
    if cfg.model.patch_size > 0 and e.image_size % cfg.model.patch_size:
        problems.append(f"eval.image_size={e.image_size} must be 0 or a multiple of model.patch_size")
    if not 0 < e.test_fraction < 1:
        problems.append(f"eval.test_fraction must be in (0, 1), got {e.test_fraction}")
    if not e.manifests:
        problems.append("eval.manifests is empty; name at least one held-out manifest")
    for name, path in e.manifests.items():
        if not path:
            problems.append(f"eval.manifests.{name} is empty; give a manifest path or s3:// URI")
    if not e.labels:
        problems.append("eval.labels is empty; name at least one manifest column to predict (e.g. moa)")
    if len(set(e.labels)) != len(e.labels):
        problems.append(f"eval.labels names a column twice: {e.labels}")
    unknown = [p for p in e.protocols if p not in EVAL_PROTOCOLS]
    if unknown or not e.protocols or len(set(e.protocols)) != len(e.protocols):
        problems.append(f"eval.protocols={e.protocols!r} must list distinct protocols from {list(EVAL_PROTOCOLS)}")
    if not 0 < e.copairs_threshold < 1:
        problems.append(f"eval.copairs_threshold must be in (0, 1), got {e.copairs_threshold}")
    for key, value in (("eval", e.channel_readout), ("features", cfg.features.channel_readout)):
        if value not in CHANNEL_READOUTS:
            problems.append(f"{key}.channel_readout={value!r} is not one of {list(CHANNEL_READOUTS)}")
    if e.from_store and e.channel_readout != cfg.features.channel_readout:
        problems.append(f"eval.from_store reads features stored with features.channel_readout="
                        f"{cfg.features.channel_readout}, but eval.channel_readout={e.channel_readout}; set both alike")
    if e.embedding_map == "umap" and importlib.util.find_spec("umap") is None:
        problems.append("eval.embedding_map=umap needs umap-learn installed (or use auto / pca)")
    return problems + _features_problems(cfg)


def _features_problems(cfg: Config) -> list[str]:
    f = cfg.features
    problems = []
    if not f.store:
        problems.append("features.store is empty; give a local folder or an s3:// URI")
    if not f.checkpoint:
        problems.append("features.checkpoint is empty; give a checkpoint folder, an s3:// URI or 'latest'")
    for name, path in f.manifests.items():
        if not path:
            problems.append(f"features.manifests.{name} is empty; give a manifest path or s3:// URI")
    if not f.aggregations or len(set(f.aggregations)) != len(f.aggregations) or \
            not set(f.aggregations) <= set(FEATURE_AGGREGATIONS):
        problems.append(f"features.aggregations must list distinct items of {list(FEATURE_AGGREGATIONS)}, "
                        f"got {f.aggregations!r}")
    if cfg.model.patch_size > 0 and f.image_size % cfg.model.patch_size:
        problems.append(f"features.image_size={f.image_size} must be 0 or a multiple of "
                        f"model.patch_size={cfg.model.patch_size}")
    stored = stored_well_variables(f)
    if cfg.eval.from_store and cfg.eval.store_variable not in stored:
        problems.append(f"eval.store_variable={cfg.eval.store_variable!r} is not a well variable the store holds "
                        f"with these features.* settings; choose from {stored}")
    return problems


def stored_well_variables(f: FeaturesConfig) -> list[str]:
    """The well variables `cellfm refresh` stores under `f`: each aggregation and, with a normalization,
    <aggregation>_<normalization>."""
    normalized = [f"{a}_{f.normalization}" for a in f.aggregations] if f.normalization != "none" else []
    return [*f.aggregations, *normalized]


def data_config_problems(data: DataConfig) -> list[str]:
    """The rules of the `data` section that need no manifest (also checked by the pipeline itself,
    for a DataConfig built in code)."""
    problems = _table_problems(data, "data")
    if not 0 <= data.clip_low < data.clip_high <= 100:
        problems.append(f"need 0 <= data.clip_low < data.clip_high <= 100, got {data.clip_low}, {data.clip_high}")
    if not 0 < data.clahe_clip_limit <= 1:
        problems.append(f"data.clahe_clip_limit must be in (0, 1], got {data.clahe_clip_limit}")
    if data.mixed_channels == "group" and data.pad_channels_to:
        problems.append(f"data.pad_channels_to={data.pad_channels_to} pads, but data.mixed_channels=group never pads; "
                        f"set data.pad_channels_to=0 or data.mixed_channels=pad")
    if data.read_actors > 0 and data.read_concurrency > 0:
        problems.append(f"data.read_actors={data.read_actors} and data.read_concurrency={data.read_concurrency} both "
                        f"set how many reads run at once (actors or tasks); set one of them to 0")
    if data.transfer_dtype == "uint8" and data.normalization == "standardize":
        problems.append("data.transfer_dtype=uint8 holds [0, 1] values only; use data.transfer_dtype=float16 "
                        "with data.normalization=standardize")
    if data.z_plane < -1:
        problems.append(f"data.z_plane must be a z index >= 0, or -1 for none, got {data.z_plane}")
    if data.z_plane >= 0 and data.z_projection:
        problems.append(f"data.z_plane={data.z_plane} and data.z_projection={data.z_projection!r} both choose how "
                        f"z-stacks are read; set data.z_plane=-1 or data.z_projection=''")
    if data.resolution_level < 0:
        problems.append(f"data.resolution_level must be >= 0, got {data.resolution_level}")
    if data.crop_mode == "cells":
        if not data.cell_locations:
            problems.append("data.crop_mode=cells needs data.cell_locations: a Parquet table of cell centres "
                            "(plate, well, field, y, x)")
        if data.cell_crop_size < 1:
            problems.append(f"data.cell_crop_size must be > 0, got {data.cell_crop_size}")
        if data.field_size or data.resolution_level:
            problems.append(f"data.crop_mode=cells crops around centres given in full-resolution field pixels; set "
                            f"data.field_size=0 and data.resolution_level=0 (got {data.field_size}, "
                            f"{data.resolution_level})")
    if data.resolution_level > 0 and not data.field_size:
        problems.append(f"data.resolution_level={data.resolution_level} reads fields smaller than the manifest's "
                        f"height/width; set data.field_size to the edge the trainer gets")
    return problems


def _table_problems(section: Any, name: str) -> list[str]:
    """The choice and range rules of one section (the _CHOICES, _POSITIVE, _NON_NEGATIVE, _UNIT keys)."""
    problems = []

    def keys(table):
        return [(key, getattr(section, key.split(".", 1)[1])) for key in table if key.split(".", 1)[0] == name]

    for key, value in keys(_CHOICES):
        if value not in _CHOICES[key]:
            problems.append(f"{key}={value!r} is not one of {sorted(_CHOICES[key])}")
    problems += [f"{key} must be > 0, got {value!r}" for key, value in keys(_POSITIVE) if not value > 0]
    problems += [f"{key} must be >= 0, got {value!r}" for key, value in keys(_NON_NEGATIVE) if value < 0]
    problems += [f"{key} must be in [0, 1], got {value!r}" for key, value in keys(_UNIT) if not 0 <= value <= 1]
    return problems


def _model_problems(cfg: Config) -> list[str]:
    m = cfg.model
    problems = []
    if not 0 <= m.drop_path_rate < 1:
        problems.append(f"model.drop_path_rate must be in [0, 1), got {m.drop_path_rate}")
    if m.layerscale_init is not None and not m.layerscale_init > 0:
        problems.append(f"model.layerscale_init must be > 0 or null (no LayerScale), got {m.layerscale_init}")
    bad = {name: group for name, group in m.channel_groups.items() if group not in CHANNEL_GROUPS}
    if bad:
        problems.append(f"model.channel_groups values must be one of {list(CHANNEL_GROUPS)}, got {bad}")
    if len(set(m.channel_vocabulary)) != len(m.channel_vocabulary):
        problems.append(f"model.channel_vocabulary has duplicate names: {m.channel_vocabulary}")
    if m.channel_mixer != "full" and m.name != "cellrep":
        problems.append(f"model.channel_mixer={m.channel_mixer} is a CellRep setting; model.name={m.name} has no "
                        "channel mixer (use full)")
    if m.channel_pool_after is not None:
        if m.name != "cellrep":
            problems.append(f"model.channel_pool_after is a CellRep setting; model.name={m.name} has no channel "
                            "mixer (use null)")
        elif not 0 <= m.channel_pool_after <= m.mixer_depth:
            problems.append(f"model.channel_pool_after must be in [0, model.mixer_depth={m.mixer_depth}] or null "
                            f"(after every mixer layer), got {m.channel_pool_after}")
    if m.channel_pooling == "attention":
        if m.name not in ("cellrep", "c3r"):
            problems.append(f"model.channel_pooling=attention is for model.name=cellrep or c3r (the models that pool "
                            f"channels), got {m.name}")
        elif m.name == "cellrep" and m.pooling_ratio != 1:
            problems.append(f"model.channel_pooling=attention makes one token per position; it needs "
                            f"model.pooling_ratio=1, got {m.pooling_ratio}")
    if m.patch_size > 0:
        for key in ("ssl.global_crop_size", "ssl.local_crop_size", "model.img_size"):
            if _get(cfg, key) % m.patch_size:
                problems.append(f"{key}={_get(cfg, key)} is not a multiple of model.patch_size={m.patch_size}")
    return problems


def _ssl_problems(cfg: Config) -> list[str]:
    s = cfg.ssl
    problems = []
    for key in ("ssl.global_crop_scale", "ssl.local_crop_scale"):
        lo_hi = _get(cfg, key)
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
            problems.append(f"{key} must be [low, high] with 0 < low <= high <= 1, got {lo_hi!r}")
    if len(s.mask_ratio_min_max) != 2 or not 0 <= s.mask_ratio_min_max[0] <= s.mask_ratio_min_max[1] <= 1:
        problems.append(f"ssl.mask_ratio_min_max must be [min, max] with 0 <= min <= max <= 1, "
                        f"got {s.mask_ratio_min_max!r}")
    if len(s.blur_sigma) != 2 or not 0 <= s.blur_sigma[0] <= s.blur_sigma[1]:
        problems.append(f"ssl.blur_sigma must be [low, high] pixels with 0 <= low <= high, got {s.blur_sigma!r}")
    if not 0 <= s.intensity_jitter < 1:
        # >= 1 could flip a channel's sign, which is not a plausible imaging change.
        problems.append(f"ssl.intensity_jitter must be in [0, 1), got {s.intensity_jitter}")
    if any(k < 1 for k in s.mcd_keep_counts):
        problems.append(f"ssl.mcd_keep_counts must all be >= 1 (a sample keeps a context channel), "
                        f"got {s.mcd_keep_counts}")
    if s.supcon_weight > 0 and not s.supcon_label:
        problems.append("ssl.supcon_weight > 0 needs ssl.supcon_label (a manifest column, e.g. an antibody id)")
    sampling = student_channel_sampling(cfg)
    if s.mcd and sampling != "none":
        problems.append(f"ssl.mcd=true and {sampling} channel sampling (ssl.channel_sampling={s.channel_sampling} "
                        f"with model.name={cfg.model.name}) both choose the student's channels; "
                        f"set ssl.channel_sampling=none or ssl.mcd=false")
    if sampling == "dcs" and cfg.model.name != "dichavit":
        problems.append(f"ssl.channel_sampling=dcs compares learned channel embeddings, which only model.name=dichavit "
                        f"has (got {cfg.model.name})")
    if (s.objective == "mae") != (cfg.model.name == "ca_mae"):
        problems.append(f"ssl.objective=mae and model.name=ca_mae go together (the MAE decoder reconstructs CA-MAE's "
                        f"per-channel tokens); got ssl.objective={s.objective} with model.name={cfg.model.name}")
    if s.objective == "mae":
        if not 0 < s.mae_mask_ratio < 1:
            problems.append(f"ssl.mae_mask_ratio must be in (0, 1), got {s.mae_mask_ratio}")
        if s.n_local_crops:
            problems.append(f"ssl.objective=mae reconstructs the global crops only; set ssl.n_local_crops=0 "
                            f"(got {s.n_local_crops})")
        if s.mcd or sampling != "none":
            problems.append("ssl.objective=mae hides tokens, not channels: set ssl.mcd=false and "
                            "ssl.channel_sampling=none (or auto)")
        if s.mae_decoder_dim % 4 or (s.mae_decoder_heads > 0 and s.mae_decoder_dim % s.mae_decoder_heads):
            problems.append(f"ssl.mae_decoder_dim={s.mae_decoder_dim} must be a multiple of 4 (sin-cos positions) "
                            f"and of ssl.mae_decoder_heads={s.mae_decoder_heads}")
    return problems


def student_channel_sampling(cfg: Config) -> str:
    """How the training step chooses the channels the student sees, besides MCD: "hcs" (hierarchical
    channel sampling), "dcs" (diverse channel sampling) or "none". `ssl.channel_sampling: auto` means hcs for
    ChannelViT and dcs for DiChaViT (their papers train with them), none for every other model."""
    if cfg.ssl.channel_sampling == "auto":
        return {"channelvit": "hcs", "dichavit": "dcs"}.get(cfg.model.name, "none")
    return cfg.ssl.channel_sampling


def validate(cfg: Config, source: str = "<config>") -> None:
    """Raise `ConfigError` listing every `config_problems` line, each prefixed with `source`."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError([f"{source}: {p}" for p in problems])


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for k in dotted.split("."):
        node = getattr(node, k)
    return node

