"""One typed config for every stage: loaded from YAML, overridden with dotted `key=value`
arguments, validated, and saved beside every run.

Unknown keys, wrong types and out-of-range values raise `ConfigError` naming the dotted key
and the file it came from, so a typo never silently falls back to a default. Every problem is
reported at once (`ConfigError.problems`, one line each), not just the first.

The comment lines directly above a field are its documentation: `docs/configuration.md` is
generated from them (`cellfm.config_reference`), and a test fails when a field has none.

Credentials never reach disk: `save_config` replaces the credential values of every
`*storage_options` mapping with `CREDENTIAL_MARKER`, and loading a config drops the marker again,
so credentials then come from the environment (AWS_ACCESS_KEY_ID, ...) or explicit overrides.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A config file or override is malformed; each line of the message (one per problem, in
    `problems`) names the dotted key at fault and what is allowed."""

    def __init__(self, problems: str | typing.Sequence[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class PreflightError(ConfigError):
    """The config, its manifests or its paths cannot run (`cellfm.preflight`); `problems` holds one line per
    problem."""


# What a saved config holds in place of a credential. Loading drops it (credentials then come from
# the environment), so the marker is never sent to a store as a credential.
CREDENTIAL_MARKER = "<redacted>"
# A storage option whose name contains one of these is a credential (s3fs: key, secret, token;
# botocore's client_kwargs: aws_access_key_id, aws_secret_access_key, aws_session_token; ...).
_CREDENTIAL_NAME_PARTS = ("secret", "token", "password", "key", "credential", "session")
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


@dataclass
class DataConfig:
    """Plates and manifests, per-image normalization, and the Ray Data pipeline that streams fields to training and evaluation."""

    # Where `cellfm demo` generates the synthetic demo screen (skipped when its manifests exist).
    screen_dir: str = "demo_output/screen"
    # Layout of the generated demo screen (cellfm.data.synthetic.LAYOUTS: tiny | demo).
    synthetic_layout: str = "demo"
    # Seed of the generated demo screen.
    synthetic_seed: int = 0
    # Parquet manifest of the training fields (local path or s3:// URI; relative store URIs in it are
    # relative to its folder).
    train_manifest: str = "demo_output/screen/train.parquet"
    # Per image and channel (cellfm.data.normalize): percentile = clip to [clip_low, clip_high]
    # percentiles -> [0, 1]; clahe = that + adaptive histogram equalization; standardize = z-score;
    # none = raw stored intensities (for models with their own input normalization).
    normalization: str = "percentile"
    # Lower clipping percentile of `normalization=percentile|clahe` (0-100).
    clip_low: float = 1.0
    # Upper clipping percentile of `normalization=percentile|clahe` (0-100, above clip_low).
    clip_high: float = 99.0
    # CLAHE clip limit: fraction of a tile's pixels per histogram bin (skimage convention), in (0, 1].
    clahe_clip_limit: float = 0.01
    # CLAHE tiles per image side.
    clahe_tiles: int = 8
    # Random channel order per training sample (the models must not depend on channel order).
    channel_permutation: bool = True
    # Mixed channel counts (e.g. 5-, 4- and 1-channel plates in one run): pad = every field is
    # zero-padded to pad_channels_to channels with a channel mask; group = no padding, each training
    # batch holds fields of one channel count.
    mixed_channels: str = "pad"
    # Channels every field is padded to with `mixed_channels=pad` (0 = the manifests' largest count;
    # never fewer than that count).
    pad_channels_to: int = 0
    # Field edge in pixels delivered to the trainer (0 = as stored; all fields must then share one
    # size).
    field_size: int = 0
    # How a field of another size is brought to `field_size`: crop = centre crop (reads only the tiles
    # it covers; smaller fields are resized up), resize = the whole field resized.
    field_resize: str = "crop"
    # What crosses Ray's object store: float16, or uint8 (256 levels of [0, 1]; half the bytes;
    # percentile/clahe normalization only).
    transfer_dtype: str = "float16"
    # Unreadable/corrupt fields (e.g. a truncated chunk), in training, embedding and evaluation: skip =
    # drop, count and name each in one line, failing (exit code 2) once more than max_bad_fraction of the
    # fields are bad; fail = stop at the first, naming its plate/well/field.
    bad_field_policy: str = "skip"
    # Largest fraction of bad fields `bad_field_policy=skip` tolerates, in [0, 1].
    max_bad_fraction: float = 0.01
    # Read with the Rust zarrs codec pipeline (optional extra cellfm[zarrs]) in the read tasks.
    use_zarrs: bool = False
    # Ray Data object-store budget for this dataset in MB (0 = Ray's default fraction).
    object_store_limit_mb: int = 0
    # Most read tasks in flight (0 = as many as CPUs allow); not together with read_actors.
    read_concurrency: int = 0
    # Reads in a pool of this many long-lived reader actors (read_cpus each, two blocks queued per
    # actor) instead of tasks (0): no scheduling gap between blocks, so a higher sustained rate on
    # long streams (benchmarks/pipeline.py), but every pass first starts the actors (seconds).
    read_actors: int = 0
    # Seconds between "[cellfm] data: ... fields/s" progress lines (0 = off).
    progress_interval_s: float = 30.0
    # Fractional CPUs per read task: on a 2-core machine whole CPUs for reads starve training.
    read_cpus: float = 0.5
    # Manifest rows per read task (consecutive fields of one plate).
    read_batch_size: int = 8
    # Rows of the local shuffle buffer of each training worker (0 = no local shuffle).
    shuffle_buffer: int = 64
    # Training only: read and normalize every field once, before the first epoch, and keep them in Ray's
    # object store (cellfm.data.pipeline.FieldCache); every epoch then takes its fields from memory
    # instead of the plates. For screens that fit: the run refuses one above cache_max_mb.
    cache_fields: bool = False
    # Largest field cache (MB of normalized fields) data.cache_fields may build.
    cache_max_mb: int = 4096
    # fsspec/s3fs options for manifests, plates and s3:// runs (endpoint_url, key, secret, token,
    # client_kwargs.region_name, ...). Saved configs hold CREDENTIAL_MARKER in place of credentials;
    # prefer the AWS environment variables for those.
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    # Z-stacks (e.g. plates registered with `cellfm ingest --layout ome-zarr`): the z-plane read from
    # every field, an index (-1 = none: a field with several planes then needs data.z_projection).
    z_plane: int = -1
    # Z-stacks: project all planes instead of choosing one: max | mean (mean is float32); "" = none.
    z_projection: str = ""
    # Multiscale level read from every field (0 = full resolution; k = the plate's k-th level, e.g. 2^k
    # times smaller), so large fields can be read downsampled; above 0 needs data.field_size.
    resolution_level: int = 0
    # What one training or embedding sample is: field = a whole field (data.field_size); cells = one
    # data.cell_crop_size crop around every cell centre of data.cell_locations, cut from the normalized
    # (and channel-permuted) field inside the read task, so crops are never written to disk.
    crop_mode: str = "field"
    # crop_mode=cells: Parquet table of cell centres (local path or s3://), one row per cell: plate, well,
    # field, y, x (pixels of the full-resolution field), or CellProfiler's Metadata_Plate, Metadata_Well,
    # Metadata_Site (or Metadata_Field), Location_Center_Y, Location_Center_X. `cellfm cells` writes one from
    # a synthetic screen's ground truth.
    cell_locations: str = ""
    # crop_mode=cells: edge in pixels of the square crop around each centre (rows round(y) - size // 2 up to
    # round(y) - size // 2 + size, columns alike); the part of a crop outside its field is zero.
    cell_crop_size: int = 48


@dataclass
class ModelConfig:
    """The backbone: architecture, size and its channel handling."""

    # Backbone: cellrep | c3r | vit_rgb | channelvit | single_channel | dichavit | ca_mae
    # (cellfm.models.registry; ca_mae trains with ssl.objective=mae).
    name: str = "cellrep"
    # Width/depth ladder: tiny | small | base | large (cellfm.models.registry.SIZES).
    size: str = "tiny"
    # Patch edge in pixels.
    patch_size: int = 8
    # Image edge the positional embedding is built for (other sizes are interpolated).
    img_size: int = 64
    # CellRep: blocks of the channel-mixing transformer over all L*C tokens.
    mixer_depth: int = 2
    # CellRep: width of the content-aware per-channel encoder.
    channel_encoder_dim: int = 64
    # CellRep: stride of the per-channel encoder's convolution.
    channel_encoder_stride: int = 2
    # CellRep: pooled channel slots kept after the mixer (k*L tokens enter the ViT).
    pooling_ratio: int = 1
    # CellRep: the mixer's layers. full: transformer blocks over all L*C tokens (2 blocks: 2.07x a ViT-S/16's
    # FLOPs at 5 channels, 224 px); axial: attention across the channels at each patch position, no MLP (an
    # MLP mixes no channels), about a third of a full block's cost per layer (2 layers: 1.27x).
    channel_mixer: str = "full"
    # CellRep: mixer layers run on the L*C per-channel tokens before the channel pooling (null: all
    # mixer_depth of them); the others run after it on the k*L pooled tokens, at 1/C of the cost.
    channel_pool_after: Optional[int] = None
    # CellRep, C3R: how channels are pooled into a fixed size. mean: the mean over channels (C3R: per group);
    # attention: the mean plus k content-chosen channel slots (learned queries pick channels by what they
    # show, not by their index), which keeps which stain showed what. Exactly invariant to channel order and
    # padding either way; CellRep's attention pooling needs pooling_ratio=1.
    channel_pooling: str = "mean"
    # channel_pooling=attention: the k learned queries (slots per position).
    channel_pooling_queries: int = 4
    # Register tokens of the ViT trunk.
    num_register_tokens: int = 0
    # Stochastic depth rate of the trunk, in [0, 1).
    drop_path_rate: float = 0.0
    # LayerScale init (null = none). DINOv2 uses 1e-5 at scale; small models trained briefly need a
    # larger value (or none) so the CLS token depends on the input from the first step (else DINO
    # collapses to uniform).
    layerscale_init: Optional[float] = 0.1
    # In-model per-channel preprocessing (CellRep): none | percentile | adaptive_hist.
    input_norm: str = "none"
    # C3R: depth of the per-group branch encoders f_c (the joint encoder gets depth - ceil(n_pre / 2) blocks:
    # even n_pre keeps the ViT's parameter budget, odd n_pre is half a block under it).
    n_pre: int = 2
    # C3R: channel name -> "context" | "concept". Overrides the manifest's channel_groups, e.g. at
    # inference for stains never seen in training.
    channel_groups: dict[str, str] = field(default_factory=dict)
    # ChannelViT / DiChaViT: the channel names that get a learned embedding (empty: the training manifest's, or
    # with train.init_from the checkpoint's).
    channel_vocabulary: list[str] = field(default_factory=list)


@dataclass
class SSLConfig:
    """The self-supervised objective: losses and their weights, heads, teacher, and multi-crop augmentation."""

    # dino: DINO CLS loss only (CellRep); ibot: DINO + masked-patch iBOT loss (C3R, baselines); mae: masked
    # autoencoding of the global crops (model.name=ca_mae; no teacher, no local crops).
    objective: str = "dino"
    # Weight of the iBOT masked-patch loss (objective ibot).
    ibot_loss_weight: float = 1.0
    # A separate iBOT patch head (DINOv2's recipes) or the DINO head shared (C3R's code).
    ibot_separate_head: bool = True
    # iBOT: [min, max] fraction of a masked crop's patches that are masked, 0 <= min <= max <= 1.
    mask_ratio_min_max: list[float] = field(default_factory=lambda: [0.1, 0.5])
    # iBOT: probability that a global crop is masked at all.
    mask_sample_probability: float = 0.5
    # Weight of the KoLeo regulariser on the student's global CLS (0 = off).
    koleo_weight: float = 0.0
    # Masked Context Distillation (C3R): the student keeps k context channels, k drawn per sample
    # from mcd_keep_counts; the teacher sees all; concept channels are never dropped.
    mcd: bool = False
    # MCD: the set k is drawn from (each >= 1; empty: {1..C1}, C1 = the sample's context channels).
    mcd_keep_counts: list[int] = field(default_factory=list)
    # Hierarchical channel sampling (ChannelViT): per sample the student sees m ~ U{1..n} of its n real
    # channels (the teacher all of them; never at evaluation). auto = hcs for model.name=channelvit, else
    # none; dcs = diverse channel sampling (DiChaViT: an anchor channel, the others drawn favouring channel
    # embeddings unlike the anchor's). auto = hcs for channelvit, dcs for dichavit, else none; hcs/dcs and ssl.mcd
    # all choose the student's channels, so they exclude each other.
    channel_sampling: str = "auto"
    # DCS temperature T: channel c is drawn with weight exp((1 - cos(anchor, c)) / T); small = strongly diverse.
    dcs_temperature: float = 0.1
    # DiChaViT: weight of the token diversification loss (patch-embedding tokens pushed to orthogonality, within
    # and across channels; the reference's JUMP-CP setting). Other models ignore it.
    token_orthogonality_weight: float = 0.001
    # MAE: fraction of a crop's L*C patch tokens hidden from the encoder (Phenom: 0.75).
    mae_mask_ratio: float = 0.75
    # MAE: weight of the Fourier-domain term (L1 between FFT magnitudes) beside the masked-patch MSE (Phenom:
    # 0.01).
    mae_fourier_weight: float = 0.01
    # MAE: width of the light decoder (a multiple of 4 and of mae_decoder_heads).
    mae_decoder_dim: int = 128
    # MAE: transformer blocks of the decoder.
    mae_decoder_depth: int = 2
    # MAE: attention heads of the decoder.
    mae_decoder_heads: int = 4
    # Weight of the weakly supervised SupCon term on the `supcon_label` column (0 = off).
    supcon_weight: float = 0.0
    # SupCon temperature.
    supcon_temperature: float = 0.1
    # Manifest column SupCon uses as the per-sample label (e.g. an antibody id); needed when
    # supcon_weight > 0.
    supcon_label: str = ""
    # Prototypes of the DINO (and iBOT) head.
    head_out_dim: int = 4096
    # Hidden width of the head's MLP.
    head_hidden_dim: int = 2048
    # Bottleneck width of the head (the input of its weight-normalized last layer).
    head_bottleneck_dim: int = 256
    # Layers of the head's MLP.
    head_nlayers: int = 3
    # BatchNorm in the head's hidden layers (DINO's option): batch statistics remove the component
    # every image shares, so the teacher's targets differ between images from the first step.
    head_use_bn: bool = False
    # Student softmax temperature.
    student_temp: float = 0.1
    # Teacher softmax temperature after its warm-up.
    teacher_temp: float = 0.07
    # Teacher softmax temperature at the start of its warm-up.
    warmup_teacher_temp: float = 0.04
    # Epochs of the linear teacher-temperature warm-up.
    warmup_teacher_temp_epochs: int = 5
    # Momentum of the teacher's centering buffer, in [0, 1].
    center_momentum: float = 0.9
    # How teacher targets are centred: centering | sinkhorn_knopp.
    centering: str = "centering"
    # Weight of the KL-to-uniform regulariser on the batch-mean distribution (CellRep).
    kl_uniform_weight: float = 0.1
    # EMA teacher momentum at the first step (cosine schedule), in [0, 1]. (ssl.objective=mae has no teacher:
    # its "teacher", whose backbone is the checkpoint's inference weights, copies the student after every step.)
    ema_momentum_start: float = 0.992
    # EMA teacher momentum at the last step, in [0, 1].
    ema_momentum_end: float = 1.0
    # Epochs during which the heads' last (prototype) layers are frozen.
    freeze_last_layer_epochs: int = 1
    # Edge of the global crops in pixels (a multiple of model.patch_size).
    global_crop_size: int = 64
    # Edge of the local crops in pixels (a multiple of model.patch_size).
    local_crop_size: int = 32
    # Local crops per image.
    n_local_crops: int = 4
    # [low, high] fraction of the field's area a global crop covers, 0 < low <= high <= 1.
    global_crop_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    # [low, high] fraction of the field's area a local crop covers, 0 < low <= high <= 1.
    local_crop_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    # Per-channel random gain/offset amplitude of the views, in [0, 1).
    intensity_jitter: float = 0.2
    # Probability that a view is Gaussian-blurred, in [0, 1].
    blur_probability: float = 0.0
    # [low, high] sigma range of the blur in pixels of the view.
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    # Random flips, drawn independently per view.
    flip: bool = True
    # Random 90-degree rotations, drawn independently per view.
    rot90: bool = True


@dataclass
class OptimConfig:
    """AdamW and its schedules (DINOv2 recipe)."""

    # Training epochs (passes over the training manifest).
    epochs: int = 10
    # Fields per worker and micro-batch.
    batch_size_per_worker: int = 32
    # Learning rate at global batch 1024; DINOv2 rule: lr = base_lr * sqrt(global_batch / 1024).
    base_lr: float = 4e-3
    # Learning rate at the end of the cosine schedule.
    min_lr: float = 1e-6
    # Epochs of linear learning-rate warm-up (at most optim.epochs).
    warmup_epochs: int = 1
    # AdamW weight decay at the first step (cosine schedule).
    weight_decay: float = 0.04
    # AdamW weight decay at the last step.
    weight_decay_end: float = 0.4
    # Gradient-norm clipping threshold (> 0).
    clip_grad: float = 3.0
    # DINOv2 parameter groups: lr of trunk block i scaled by layerwise_decay**(depth - i).
    layerwise_decay: float = 1.0
    # lr multiplier of the patch/channel embedding.
    patch_embed_lr_mult: float = 1.0
    # Micro-batches per optimizer step (global batch = batch_size_per_worker * workers * this).
    accumulate_steps: int = 1
    # With train.use_gpu: AdamW's fused CUDA step (one kernel for all parameters); CPU keeps the for-each step.
    fused_adamw: bool = True


@dataclass
class TrainConfig:
    """Ray Train: engine, workers, resources, run storage, checkpoints and logging."""

    # ddp: PyTorch DDP; deepspeed: DeepSpeed ZeRO (optimizer state, and at stage 2 gradients,
    # partitioned across workers) under the same Ray Train loop.
    engine: str = "ddp"
    # DeepSpeed ZeRO stage (train.engine=deepspeed): 1 = optimizer states, 2 = + gradients partitioned.
    zero_stage: int = 2
    # bf16 autocast on GPU (fp32 on CPU regardless): bf16 | fp32.
    mixed_precision: str = "bf16"
    # torch.compile the student's and teacher's backbones in place (weights and checkpoints unchanged); the first
    # steps pay the compilation. Off by default: eager is the reference path.
    compile: bool = False
    # GPUs per training worker (with use_gpu).
    gpus_per_worker: float = 1.0
    # Ray Train workers (one per GPU, or CPU slots).
    num_workers: int = 2
    # Train on GPUs (NCCL) instead of CPUs (gloo).
    use_gpu: bool = False
    # CPUs reserved per training worker (fractions allowed).
    cpus_per_worker: float = 1.0
    # torch intra-op threads per worker.
    torch_threads: int = 1
    # Folder (or s3://bucket/prefix) holding runs; under `ray job submit` an absolute path every node
    # sees, or s3://.
    storage_path: str = "demo_output/runs"
    # The run's folder under storage_path; relaunching with the same name resumes it.
    run_name: str = "cellrep-demo"
    # Newest checkpoints kept.
    num_to_keep: int = 2
    # Worker failures Ray Train recovers from (restarting from the last checkpoint).
    max_failures: int = 0
    # Seed of initialization, augmentation and data order.
    seed: int = 0
    # Optimizer steps between progress lines (each also has an end-of-epoch line).
    log_every_steps: int = 10
    # Peak dense bf16 FLOP/s of one GPU for the MFU estimate, in TFLOP/s (0 = from the GPU's name:
    # H100, H200, A100 known); ignored on CPU, where MFU is not reported.
    peak_tflops: float = 0.0
    # Continued pre-training: a checkpoint folder (or a run folder: its latest checkpoint; local or s3://) whose
    # student, teacher, heads and teacher centers a new run starts from, with a fresh optimizer and schedules.
    # Its model and heads must match this config's; empty = train from scratch. A resumed run ignores it.
    init_from: str = ""


@dataclass
class EvalConfig:
    """Evaluation on held-out plates: which manifests, which labels, the protocols and their splits, and the embedding run."""

    # Named held-out manifests (channel configurations, e.g. seen and unseen): each is embedded and
    # scored separately.
    manifests: dict[str, str] = field(
        default_factory=lambda: {
            "seen": "demo_output/screen/heldout.parquet",
            "unseen": "demo_output/screen/unseen.parquet",
        }
    )
    # Manifest columns the fixed-split probe and the leave-one-plate-out 1-NN classify.
    labels: list[str] = field(default_factory=lambda: ["perturbation_id", "moa"])
    # Well features normalized per plate against its negative controls (none | negcon).
    well_normalization: str = "negcon"
    # Protocols to run (docs/evaluation.md): probe (fixed well splits), per_plate_probe (the probe within
    # each plate, mean +- standard error over plates), lopo_probe (probe trained on the other plates,
    # features z-scored per plate, +- standard error over wells), compound_heldout (MoA of unseen
    # compounds), nn_lopo (CHAMMI 1-NN), replicate_map (JUMP replicate retrieval), moa_consistency
    # (JUMP), localization_map (HPA-style multi-label). Protocols across plates are skipped, with the
    # reason in the report, on a manifest of one plate.
    protocols: list[str] = field(default_factory=lambda: list(EVAL_PROTOCOLS))
    # Fraction of wells tested in each fixed probe split, and of each MoA's compounds in each
    # compound-held-out split.
    test_fraction: float = 0.5
    # Seed of the first split; split k uses split_seed + k.
    split_seed: int = 0
    # Scores are the mean over this many fixed splits (seeds split_seed, split_seed + 1, ...).
    n_splits: int = 5
    # Compound-held-out (and protein-held-out) splits per score, seeds split_seed, split_seed + 1, ...
    n_compound_splits: int = 5
    # Random rankings per (positives, total) configuration in copairs' null distribution (JUMP: 10000).
    copairs_null_size: int = 10000
    # Benjamini-Hochberg corrected p-value below which a perturbation (MoA) counts as retrieved.
    copairs_threshold: float = 0.05
    # Seed of copairs' null distributions.
    copairs_seed: int = 0
    # 2-D map of well embeddings in the report: auto (UMAP when umap-learn is installed, else PCA) | pca | umap.
    embedding_map: str = "auto"
    # Fields per batch in the embedding actors.
    batch_size: int = 32
    # Side length fields are resized to before embedding; 0 = as stored (native resolution; the
    # backbone interpolates its positional embedding).
    image_size: int = 0
    # Actors embedding fields in parallel (each holds every model).
    embed_actors: int = 1
    # Seed of the random-init baseline encoder's weights.
    random_init_seed: int = 0
    # How field features are read out of every encoder (the random-init baseline too; intensity statistics
    # are per channel anyway): pooled (the backbone's one embedding of all channels) | per_channel (each
    # channel embedded alone, the embeddings concatenated in channel order: a feature keeps its stain).
    # per_channel needs each manifest to hold one channel list (no padding). docs/evaluation.md says when
    # each is right. Also the sweep objective's readout.
    channel_readout: str = "pooled"
    # Folder the report (report.json, report.md, PNG plots) is written to.
    output_dir: str = "demo_output/report"
    # Score the well features features.store already holds for each checkpoint (filled by `cellfm refresh` /
    # `cellfm embed` with this config's features.* and data.* settings) instead of embedding eval.manifests:
    # nothing is embedded, Ray is not started, and the baselines (which the store does not hold) are left out.
    from_store: bool = False
    # The stored well variable scored with eval.from_store: an aggregation of features.aggregations (mean,
    # median) or, with features.normalization, <aggregation>_<normalization> (e.g. mean_robust_mad).
    store_variable: str = "mean"


@dataclass
class FeaturesConfig:
    """The feature store and what `cellfm embed` / `cellfm refresh` keep in it."""

    # Feature store root: a local folder or s3://bucket/prefix (s3 read and written with data.storage_options).
    store: str = "demo_output/features"
    # Named manifests whose plates the store keeps embedded (`cellfm refresh` embeds what is missing).
    manifests: dict[str, str] = field(
        default_factory=lambda: {
            "heldout": "demo_output/screen/heldout.parquet",
            "unseen": "demo_output/screen/unseen.parquet",
        }
    )
    # Checkpoint folder or s3:// URI to embed with; "latest" = the newest checkpoint of
    # train.storage_path/train.run_name, resolved at every refresh (a new checkpoint gets its own key).
    checkpoint: str = "latest"
    # Per-well aggregates of the field embeddings stored beside them: any of mean, median.
    aggregations: list[str] = field(default_factory=lambda: list(FEATURE_AGGREGATIONS))
    # Per-plate normalization of the well aggregates against the plate's negative-control wells, stored
    # as extra variables <aggregation>_<normalization>: none | standardize | robust_mad | spherize.
    normalization: str = "none"
    # Spherize (ZCA on negative controls): the control covariance's eigenvalues are raised by this
    # fraction of their mean, so plates with fewer control wells than features stay well-conditioned.
    spherize_regularization: float = 0.1
    # Fields per inference batch (also the fields per read task; a batch never spans two plates).
    batch_size: int = 32
    # Inference actors, each holding the model (on CPU each also reads and normalizes its fields); 0 = one
    # per GPU (GPU actors), else one per two CPUs of the Ray cluster (benchmarks/embed_throughput.py).
    actors: int = 0
    # CPUs Ray reserves for each inference actor.
    cpus_per_actor: float = 1.0
    # PyTorch threads each inference actor computes with.
    torch_threads: int = 1
    # Inference actors on GPUs; null = as train.use_gpu.
    use_gpu: Optional[bool] = None
    # GPUs each inference actor holds when it runs on GPUs.
    gpus_per_actor: float = 1.0
    # Side length fields are resized to before embedding; 0 = as stored.
    image_size: int = 0
    # How field features are read out of the backbone: pooled | per_channel (as eval.channel_readout). Part
    # of the feature key and of every entry's lineage; eval.from_store needs the same eval.channel_readout.
    channel_readout: str = "pooled"
    # An unmarked run folder (a refresh killed while writing a plate, or one that lost a race) none of
    # whose files changed for this many seconds is deleted by the next refresh; keep it well above the
    # time one plate takes to write.
    stale_run_s: float = 3600.0


@dataclass
class RayConfig:
    """Which Ray cluster a job uses."""

    # The cluster to join ('auto': the one `ray start` runs on this machine); null: an embedded local Ray,
    # whatever RAY_ADDRESS says, except in a `ray job submit` job (its driver joins that job's cluster).
    address: Optional[str] = None
    # true: with ray.address null, join the cluster RAY_ADDRESS names (if set) instead of the embedded Ray.
    use_env_address: bool = False
    # Logical CPUs of the embedded Ray; more than the physical cores so data tasks are never starved.
    num_cpus: int = 4
    # Seconds a placement group or actor of the run may wait for resources before the run stops with a
    # message naming it (Ray would wait forever); 0 = wait forever.
    pending_timeout_s: float = 300.0


@dataclass
class Config:
    """The whole experiment: one section per stage."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "<dict>", check_rules: bool = True) -> "Config":
        """The typed config of `raw` (`source` names it in errors). Unknown keys and wrong types always
        raise; `check_rules=False` leaves the rules (`config_problems`) to the caller, e.g. to
        `cellfm.preflight`, which reports them together with the manifests' problems."""
        problems: list[str] = []
        cfg = _build(cls, raw, prefix="", source=source, problems=problems)
        if problems:  # rules need well-typed values: report type problems first
            raise ConfigError(problems)
        _drop_credential_markers(cfg)
        if check_rules:
            validate(cfg, source)
        return cfg


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


def config_source(path: str | os.PathLike | None, overrides: typing.Sequence[str] = ()) -> str:
    """How errors name a config: its file (or <defaults>), `+ overrides` when there are any."""
    return f"{path if path is not None else '<defaults>'}{' + overrides' if overrides else ''}"


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = (),
                check_rules: bool = True, presets: typing.Mapping[str, Any] | None = None) -> Config:
    """Defaults <- YAML file <- `presets` (dotted key -> value, e.g. a sweep file's overrides) <- dotted
    `key=value` overrides (values parsed as YAML scalars/lists); `check_rules` as in `Config.from_dict`."""
    raw = read_yaml_mapping(path) if path is not None else {}
    problems = []
    for key, value in (presets or {}).items():
        try:
            _set_nested(raw, str(key).split("."), value, str(key))
        except ConfigError as exc:
            problems += exc.problems
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r} is not of the form section.key=value")
            continue
        try:
            _set_nested(raw, key.strip().split("."), yaml.safe_load(value) if value != "" else "", key.strip())
        except yaml.YAMLError:
            problems.append(f"override {key.strip()}: value is not valid YAML")
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return Config.from_dict(raw, source=config_source(path, overrides), check_rules=check_rules)


def read_yaml_mapping(path: str | os.PathLike) -> dict:
    """The top-level mapping of a YAML file (an empty file is {}); `ConfigError` naming the file when it is
    missing, not YAML, or not a mapping."""
    if not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as fh:
        try:
            loaded = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
    return loaded


def typed_from_mapping(cls: type, raw: Any, source: str, prefix: str = "") -> Any:
    """The dataclass `cls` (fields of the kinds Config's sections use: scalars, lists, mappings, nested
    dataclasses) from the mapping `raw` under `load_config`'s rules: `ConfigError` with one line per unknown
    key or badly typed value, each naming `source` and the dotted key (`prefix` + field). For other typed
    YAML files, e.g. sweep files (cellfm.tune.sweep_config)."""
    problems: list[str] = []
    built = _build(cls, raw, prefix=prefix, source=source, problems=problems)
    if problems:
        raise ConfigError(problems)
    return built


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML atomically (temp file in the same folder, then rename),
    with credential values replaced by `CREDENTIAL_MARKER` (`saved_config_dict`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".yaml", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(saved_config_dict(cfg), fh, sort_keys=False)
    os.replace(tmp, path)
    return path


def saved_config_dict(cfg: Config) -> dict:
    """`cfg.to_dict()` fit to be written or shown anywhere: in every `*storage_options` mapping the
    credential values (`is_credential_key`) are `CREDENTIAL_MARKER`, the other keys kept."""
    out = cfg.to_dict()
    for section in out.values():
        for name, value in section.items():
            if name.endswith("storage_options") and isinstance(value, dict):
                section[name] = redact_credentials(value)
    return out


def is_credential_key(name: str) -> bool:
    """Whether a storage option of this name holds a credential (key, secret, token, password,
    session token, aws_* keys, ...)."""
    lowered = str(name).lower()
    return any(part in lowered for part in _CREDENTIAL_NAME_PARTS)


def redact_credentials(options: dict) -> dict:
    """A copy of `options` (nested mappings too, e.g. client_kwargs) with credential values replaced
    by `CREDENTIAL_MARKER`."""
    return {k: redact_credentials(v) if isinstance(v, dict)
            else CREDENTIAL_MARKER if is_credential_key(k) and v not in (None, "") else v
            for k, v in options.items()}


def _without_markers(options: dict) -> dict:
    return {k: _without_markers(v) if isinstance(v, dict) else v
            for k, v in options.items() if v != CREDENTIAL_MARKER}


def _drop_credential_markers(cfg: Config) -> None:
    """A loaded saved config carries markers, not credentials: drop them, so the credentials come
    from the environment (or from explicit `data.storage_options.*` overrides)."""
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            if f.name.endswith("storage_options") and isinstance(value, dict):
                setattr(sub, f.name, _without_markers(value))


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


def _build(cls: type, raw: Any, prefix: str, source: str, problems: list[str]) -> Any:
    """`cls` from `raw`, appending one line per unknown key or badly typed value to `problems`
    (a bad value keeps the field's default so the rest is still checked)."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        problems.append(f"{source}: {where} must be a mapping, got {_shown(where, raw)}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        problems.append(f"{source}: unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                        f"valid keys under {where}: {', '.join(sorted(names))}")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], raw[name], prefix + name + ".", source, problems)
            continue
        try:
            kwargs[name] = _coerce(hints[name], raw[name], prefix + name)
        except _TypeProblem as exc:
            problems.append(f"{source}: {exc}")
    return cls(**kwargs)


class _TypeProblem(Exception):
    pass


_SCALARS = {int: int, float: float, str: str, bool: bool}


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """`value` as type `hint` (int -> float and float literals in strings accepted; list and dict
    element types checked), or `_TypeProblem` naming `key` (`key[i]` for list elements)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, key)
    if hint is Any:
        return value
    if origin is list or hint is list:
        if not isinstance(value, list):
            raise _TypeProblem(f"{key} must be a list, got {_shown(key, value)}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise _TypeProblem(f"{key} must be a mapping, got {_shown(key, value)}")
        key_hint, value_hint = typing.get_args(hint) or (Any, Any)
        return {_coerce(key_hint, k, f"{key} key {k!r}"): _coerce(value_hint, v, f"{key}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads `1e-5` (no dot) as a string; accept any float literal.
        try:
            return float(value)
        except ValueError:
            pass
    expected = _SCALARS[hint]
    if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
        raise _TypeProblem(f"{key} must be {expected.__name__}, got {_shown(key, value)}")
    return value


def _shown(key: str, value: Any) -> str:
    """A value for an error message; never the value of a storage option (it may be a credential)."""
    if "storage_options" in key:
        return f"a {type(value).__name__}"
    return f"{value!r} ({type(value).__name__})"
