"""The typed config: one section per stage, every key a field with its type and default.

The comment lines directly above a field are its documentation: `docs/configuration.md` and
`configs/defaults.yaml` are generated from them (`cellfm.config_reference`), and a test fails when a field
has none. Loading (`cellfm.config.files`), the typed-YAML rules (`cellfm.config.typed_yaml`), the rules
beyond types (`cellfm.config.rules`) and credential handling (`cellfm.config.credentials`) live beside it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from cellfm.config.credentials import drop_credential_markers
from cellfm.config.rules import EVAL_PROTOCOLS, FEATURE_AGGREGATIONS, validate
from cellfm.config.typed_yaml import typed_from_mapping


@dataclass
class DataConfig:
    """Plates and manifests, per-image normalization, and the Ray Data pipeline that streams fields to training and evaluation."""

    # Where `cellfm demo` generates the synthetic demo screen (skipped when its manifests exist).
    screen_dir: str = "demo_output/screen"
    # Layout of the generated demo screen: one of cellfm.data.synthetic.catalog.LAYOUTS with unseen plates (tiny | demo).
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
    # Training batches a background thread of each worker assembles ahead of its step (0 = none). CPU workers
    # with train.torch_threads > 1 take none: the thread would stall their intra-op threads.
    prefetch_batches: int = 2
    # Training only: read and normalize every field once, before the first epoch, and keep them in Ray's
    # object store (cellfm.data.pipeline.cache.FieldCache); every epoch then takes its fields from memory
    # instead of the plates, in the training worker itself (no Ray Data execution per epoch). For screens that
    # fit: the run refuses one above cache_max_mb.
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
        cfg = typed_from_mapping(cls, raw, source)  # rules need well-typed values: type problems come first
        drop_credential_markers(cfg)
        if check_rules:
            validate(cfg, source)
        return cfg
