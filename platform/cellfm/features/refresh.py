"""Incremental, idempotent, crash-safe feature refresh: embed every plate of `features.manifests` that the
store lacks for the current checkpoint, and nothing else.

Work is keyed by (plate content version, feature key): the plate content version is sha256 (16 hex) over
the plate store's listing (every object's path relative to the plate, size, and its S3 ETag, or locally its
modification time) plus the plate's manifest rows (every column but store_uri), so computing it lists the
plate once and reads no pixel, and any rewritten chunk, shard or metadata document, or any changed manifest
annotation gives a new version; the feature key (`cellfm.features.identity`) hashes the checkpoint and the
embedding recipe.

Everything is decided before Ray starts (`plan_refresh`): manifests and plates validated, checkpoint
resolved and hashed, the store listed once. With nothing to embed, `run_refresh` returns without
starting Ray. Otherwise the missing plates stream through Ray Data batch inference and each plate is
written as soon as its last field arrives (`FeatureStore.write_entry`: run folder, then the exclusive
marker); a crash loses at most the plates in flight.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from cellfm.config import Config, ConfigError, FeaturesConfig, saved_config_dict
from cellfm.data.cells import CELL_X, CELL_Y, CELLS_X, CELLS_Y, cells_per_field, with_cell_locations
from cellfm.data.content_version import plate_content_version
from cellfm.data.manifest import ManifestError
from cellfm.data.plate import redact
from cellfm.features.aggregate import normalize_to_controls, well_aggregates
from cellfm.features.entry import FIELD_COORDS, FIELD_ONLY, PlateFeatures
from cellfm.features.identity import checkpoint_identity, code_version, embedding_recipe, feature_key, resolve_checkpoint
from cellfm.features.store import FeatureStore, KeyState
from cellfm.progress import format_duration, log_line

ENCODER = "checkpoint"  # the FieldEmbedder column is embedding_<ENCODER>
ROW = "feature_row"  # a field's position in the plan's manifest, carried through Ray Data




# ------------------------------------------------------------------------------------ planning


@dataclass
class RefreshPlan:
    """What a refresh will do, decided before Ray starts."""

    cfg: Config
    store: FeatureStore
    key: str
    checkpoint: str
    checkpoint_hash: str
    model: dict
    recipe: dict
    manifest: pd.DataFrame  # every field of every plate of the manifests (ROW = position)
    sources: dict[str, str]  # manifest name -> path
    manifests: dict[str, list[str]]  # plate -> the manifests listing it
    versions: dict[str, str]  # plate -> content version
    state: KeyState
    started: float  # time.monotonic() when planning began
    todo: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)


def _check_manifest(df: pd.DataFrame, cfg: Config) -> None:
    """Store-specific manifest rules, each failure naming the plate/well at fault."""
    repeated = df.duplicated(subset=["plate", "well", "field"], keep=False)
    if repeated.any():
        p, w, f = df.loc[repeated, ["plate", "well", "field"]].iloc[0]
        raise ManifestError(f"plate {p!r} well {w} field {f} is listed by two manifests with different annotations")
    stores = df.groupby("plate")["store_uri"].nunique()
    if (stores > 1).any():
        raise ManifestError(f"plate {stores[stores > 1].index[0]!r} is stored at several store_uri values; "
                            f"plate names must be unique across features.manifests")
    well_columns = [c for c in FIELD_COORDS if c in df.columns and c not in FIELD_ONLY + ("plate", "well")]
    hashable = df[["plate", "well"]].assign(**{c: df[c].map(str) for c in well_columns})
    varying = hashable.groupby(["plate", "well"])[well_columns].nunique()
    bad = varying[(varying > 1).any(axis=1)]
    if len(bad):
        (plate, well), row = bad.index[0], bad.iloc[0]
        raise ManifestError(f"plate {plate!r} well {well}: fields disagree on {list(row[row > 1].index)}; a well's "
                            f"annotations must be the same for all its fields")
    if cfg.features.channel_readout == "per_channel":
        lists = df.assign(_names=df["channel_names"].map(tuple)).groupby("plate")["_names"].nunique()
        if (lists > 1).any():
            raise ManifestError(f"plate {lists[lists > 1].index[0]!r} holds fields of several channel lists; "
                                f"features.channel_readout=per_channel needs one per plate (a feature's block says "
                                f"which stain it is)")
    if cfg.features.normalization != "none":
        controls = df[df["is_control"]].groupby("plate")["well"].nunique().reindex(df["plate"].unique(), fill_value=0)
        few = controls[controls < 2]
        if len(few):
            raise ManifestError(f"plate {few.index[0]!r} has {few.iloc[0]} negative-control well(s); "
                                f"features.normalization={cfg.features.normalization} needs at least 2 per plate")
    from cellfm.data.layout import field_layout_problems

    problems = field_layout_problems(df, inference_data_config(cfg), source="features.manifests")
    if problems:
        raise ConfigError("\n".join(problems))


def inference_data_config(cfg: Config, use_gpu: bool = False):
    """The data section as the embedding stream uses it: no padding (blocks of one channel count), one read
    block = one inference batch of features.batch_size fields, and on CPU read tasks asking for what an
    inference actor asks for, so Ray Data fuses reading into the actors: each reads, normalizes and embeds
    its blocks (only embeddings cross the object store, and a refresh's actors never wait on read tasks
    that other work on the cluster keeps from starting). GPU actors are fed by separate read tasks."""
    read_cpus = cfg.data.read_cpus if use_gpu else cfg.features.cpus_per_actor
    return dataclasses.replace(cfg.data, mixed_channels="group", pad_channels_to=0, read_batch_size=cfg.features.batch_size,
                               read_cpus=read_cpus)


def plan_refresh(cfg: Config, manifests: dict[str, str] | None = None, checkpoint: str | None = None) -> RefreshPlan:
    """Validate everything and list what is missing; reads plate listings and metadata, the checkpoint's
    weights and the store's listing of the key. Starts nothing."""
    from cellfm.data.pipeline.dataset import load_manifests

    started = time.monotonic()
    manifests = manifests if manifests is not None else cfg.features.manifests
    if not manifests:
        raise ConfigError("features.manifests is empty: name the manifests whose plates the store keeps embedded")
    from cellfm.paths import folder_problem
    from cellfm.runtime import local_resource_problems

    if problem := folder_problem("features.store", cfg.features.store):
        raise ConfigError(problem)
    options = cfg.data.storage_options or None
    frames, listed_by = [], {}
    for name, path in manifests.items():
        frame = load_manifests([path], check_plates=True, storage_options=options)
        for plate in frame["plate"].unique():
            listed_by.setdefault(str(plate), []).append(str(path))
        frames.append(frame)
    manifest = pd.concat(frames, ignore_index=True)
    # A plate listed by two manifests with the same rows is one plate.
    manifest = manifest[~manifest.astype(str).apply("\x1f".join, axis=1).duplicated()]
    _check_manifest(manifest, cfg)
    if problems := local_resource_problems(cfg, "features"):
        raise ConfigError("\n".join(problems))
    manifest = manifest.sort_values(["plate", "well", "field"], ignore_index=True)
    manifest[ROW] = np.arange(len(manifest))

    resolved = resolve_checkpoint(cfg, checkpoint)
    checkpoint_hash, model = checkpoint_identity(resolved, options)
    recipe = embedding_recipe(cfg)
    key = feature_key(model["name"], checkpoint_hash, recipe)
    store = FeatureStore(cfg.features.store, options)
    state = store.key_state(key)
    plates = [(str(plate), rows) for plate, rows in manifest.groupby("plate", sort=True)]
    # One listing per plate; threads hide an object store's per-request latency.
    with ThreadPoolExecutor(max_workers=8) as pool:
        found = pool.map(lambda item: plate_content_version(item[1]["store_uri"].iloc[0], item[1].drop(columns=[ROW]),
                                                            options), plates)
        versions = dict(zip([plate for plate, _ in plates], found))
    # data.crop_mode=cells: each field's centres (after the versions: those hash the manifest's own rows).
    manifest = with_cell_locations(manifest, cfg.data, "features.manifests")
    plan = RefreshPlan(cfg, store, key, resolved, checkpoint_hash, model, recipe, manifest, dict(manifests),
                       listed_by, versions, state, started)
    for plate, version in versions.items():
        (plan.up_to_date if (plate, version) in state.markers else plan.todo).append(plate)
    return plan


# ------------------------------------------------------------------------------------ running


@dataclass
class RefreshSummary:
    key: str
    store: str
    embedded: list[str]  # plates this refresh made visible
    written_by_other: list[str]  # plates embedded here but marked first by a concurrent refresh
    up_to_date: list[str]
    removed_runs: list[str]
    fields: int
    seconds: float  # the whole refresh, planning included
    started_ray: bool
    startup_s: float = 0.0  # from the start of planning to the first embeddings (Ray, actors, first reads)
    sustained_fields_per_s: float = 0.0  # fields after the first batch / the time they took


def build_plate_features(fields: pd.DataFrame, embeddings: np.ndarray, features: FeaturesConfig, model_name: str,
                         plate_version: str, lineage: dict) -> PlateFeatures:
    """One plate's entry from its fields (manifest rows sorted by well and field) and their embeddings:
    the well aggregates of features.aggregations and, with features.normalization, their per-plate
    normalization against the plate's negative-control wells."""
    meta = fields[[c for c in FIELD_COORDS if c in fields.columns]].reset_index(drop=True)
    well_columns = tuple(c for c in meta.columns if c not in FIELD_ONLY + ("plate", "well"))
    wells, well_features = well_aggregates(meta, embeddings, tuple(features.aggregations), well_columns)
    if features.normalization != "none":
        for aggregation in features.aggregations:
            well_features[f"{aggregation}_{features.normalization}"] = normalize_to_controls(
                well_features[aggregation], wells, method=features.normalization,
                spherize_regularization=features.spherize_regularization)
    return PlateFeatures(str(meta["plate"].iloc[0]), plate_version, meta, embeddings.astype(np.float32), wells,
                         well_features, [f"{model_name}_{i}" for i in range(embeddings.shape[1])], lineage)


class _PlateWriter:
    """Collects streamed field (or, with data.crop_mode=cells, cell) embeddings per plate and writes each plate
    once its rows are all in."""

    def __init__(self, plan: RefreshPlan, rows: pd.DataFrame, run_id: str):
        self.plan, self.rows, self.run_id = plan, rows, run_id
        self.cells = CELLS_Y in rows.columns
        per_field = cells_per_field(rows) if self.cells else np.ones(len(rows), dtype=np.int64)
        self.expected = pd.Series(per_field).groupby(rows["plate"].to_numpy()).sum().to_dict()
        self.parts: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]] = {}
        self.received: dict[str, int] = {}
        self.embedded: list[str] = []
        self.written_by_other: list[str] = []
        self.fields_done = 0
        self.t0 = time.monotonic()
        self.first_batch: tuple[float, int] | None = None  # (time, fields) of the first embeddings
        self.last_batch = self.t0
        self.plates_done = 0

    def add(self, positions: np.ndarray, embeddings: np.ndarray, centres: np.ndarray | None = None) -> None:
        """A batch's rows: their fields' positions in `rows`, embeddings, and with cells (n, 2) centres (y, x)."""
        self.last_batch = time.monotonic()
        if self.first_batch is None:
            self.first_batch = (self.last_batch, len(positions))
        plates = self.rows["plate"].to_numpy()[positions]
        for plate in pd.unique(plates):
            mine = plates == plate
            self.parts.setdefault(plate, []).append((positions[mine], embeddings[mine],
                                                     None if centres is None else centres[mine]))
            self.received[plate] = self.received.get(plate, 0) + int(mine.sum())
            self.fields_done += int(mine.sum())
            if self.received[plate] == self.expected[plate]:
                self.write(plate)

    def sustained_rate(self) -> float:
        """Fields/s after the first batch arrived: what a long stream sees once actors are up."""
        if self.first_batch is None or self.last_batch <= self.first_batch[0]:
            return 0.0
        return (self.fields_done - self.first_batch[1]) / (self.last_batch - self.first_batch[0])

    def finish(self) -> None:
        """After a complete stream: plates short of fields lost them to data.bad_field_policy=skip."""
        for plate in list(self.parts):
            self.write(plate)

    def write(self, plate: str) -> None:
        plan, cfg = self.plan, self.plan.cfg
        parts = self.parts.pop(plate)
        positions = np.concatenate([p for p, _, _ in parts])
        embeddings = np.concatenate([e for _, e, _ in parts])
        # Positions follow (plate, well, field): the stored order; a field's cells keep their table order.
        order = np.argsort(positions, kind="stable")
        positions, embeddings = positions[order], embeddings[order].astype(np.float32)
        plate_rows = self.rows[self.rows["plate"] == plate]
        fields = self.rows.iloc[positions]
        if self.cells:
            centres = np.concatenate([c for _, _, c in parts])[order]
            fields = fields.drop(columns=[CELLS_Y, CELLS_X]).assign(**{CELL_Y: centres[:, 0], CELL_X: centres[:, 1]})
            plate_rows = plate_rows[cells_per_field(plate_rows) > 0]  # a field without cells gives no row
        skipped = plate_rows.loc[~plate_rows[ROW].isin(fields[ROW]), ["well", "field"]]
        lineage = {
            "key": plan.key,
            "plate": {"name": plate, "content_version": plan.versions[plate],
                      "store_uri": redact(str(plate_rows["store_uri"].iloc[0]), cfg.data.storage_options),
                      "manifests": plan.manifests[plate]},
            "checkpoint": {"uri": redact(plan.checkpoint, cfg.data.storage_options), "hash": plan.checkpoint_hash,
                           "model": plan.model},
            "recipe": plan.recipe,
            "channel_readout": cfg.features.channel_readout,
            "crop_mode": cfg.data.crop_mode,
            "config": saved_config_dict(cfg),
            "code": code_version(),
            "run": self.run_id,
            "skipped_fields": skipped.to_dict("records"),
        }
        entry = build_plate_features(fields, embeddings, cfg.features, plan.model["name"], plan.versions[plate], lineage)
        won = plan.store.write_entry(plan.key, entry, self.run_id)
        (self.embedded if won else self.written_by_other).append(plate)
        self.plates_done += 1
        total = sum(self.expected.values())
        unit = "cells" if self.cells else "fields"
        rate = self.fields_done / max(time.monotonic() - self.t0, 1e-9)
        eta = (total - self.fields_done) / max(rate, 1e-9)
        how = "stored" if won else "already stored by another refresh (identical; this copy discarded)"
        extra = f", {len(skipped)} bad field(s) skipped" if len(skipped) else ""
        log_line(f"features: plate {self.plates_done}/{len(self.expected)} {plate} {how} ({len(entry.meta)} {unit}, "
             f"{len(entry.wells)} wells{extra}); {self.fields_done}/{total} {unit}, {rate:.1f} {unit}/s, "
             f"ETA {format_duration(eta)}")


def new_run_id() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def run_refresh(plan: RefreshPlan, dry_run: bool = False) -> RefreshSummary:
    """Embed and store the plan's missing plates (none: return at once, Ray never started); remove stale
    run folders; bring the key's index up to date. Prints progress lines with an ETA and a summary."""
    cfg, store = plan.cfg, plan.store
    t0 = plan.started
    log_line(f"features: key {plan.key} (checkpoint {redact(plan.checkpoint, cfg.data.storage_options)}); "
         f"{len(plan.versions)} plate(s) in {len(plan.sources)} manifest(s): "
         f"{len(plan.up_to_date)} up to date, {len(plan.todo)} to embed")
    summary = RefreshSummary(plan.key, store.uri, [], [], list(plan.up_to_date), [], 0, 0.0, False)
    if dry_run:
        for plate in plan.todo:
            log_line(f"features: would embed {plate} (version {plan.versions[plate]}, "
                 f"{int((plan.manifest['plate'] == plate).sum())} fields)")
        summary.seconds = time.monotonic() - t0
        return summary
    summary.removed_runs = store.collect_garbage(plan.key, cfg.features.stale_run_s, plan.state)
    if plan.todo:
        writer = _embed(plan)
        summary.embedded, summary.written_by_other = writer.embedded, writer.written_by_other
        summary.fields, summary.started_ray = writer.fields_done, True
        if writer.first_batch is not None:
            summary.startup_s = writer.first_batch[0] - plan.started
        summary.sustained_fields_per_s = writer.sustained_rate()
        store.update_index(plan.key)
    else:
        store.update_index(plan.key, plan.state)
    summary.seconds = time.monotonic() - t0
    if not plan.todo:
        log_line(f"features: nothing to do: all {len(plan.up_to_date)} plate(s) are stored for key {plan.key} "
             f"({summary.seconds:.1f} s, no embedding)")
    else:
        unit = "cells" if cfg.data.crop_mode == "cells" else "fields"
        log_line(f"features: embedded {len(summary.embedded)} plate(s) ({summary.fields} {unit}) in "
             f"{format_duration(summary.seconds)} ({summary.fields / max(summary.seconds, 1e-9):.1f} {unit}/s; first "
             f"embeddings after {summary.startup_s:.0f} s, then {summary.sustained_fields_per_s:.1f} {unit}/s); "
             f"{len(summary.written_by_other)} stored first by a concurrent refresh; {len(plan.up_to_date)} up to date; "
             f"{len(summary.removed_runs)} stale run folder(s) removed; store {store.uri}, key {plan.key}")
    return summary


def _embed(plan: RefreshPlan) -> _PlateWriter:
    from cellfm.features.embed import EncoderSpec, embedding_dataset
    from cellfm.runtime import resource_need
    from cellfm.runtime import init_ray

    cfg, f = plan.cfg, plan.cfg.features
    rows = plan.manifest[plan.manifest["plate"].isin(plan.todo)].reset_index(drop=True)
    rows[ROW] = np.arange(len(rows))
    writer = _PlateWriter(plan, rows, new_run_id())
    init_ray(cfg.ray, need=resource_need(cfg, "features"))
    use_gpu = cfg.train.use_gpu if f.use_gpu is None else f.use_gpu
    actors = f.actors or inference_actors(use_gpu, f.gpus_per_actor, f.cpus_per_actor)
    log_line(f"features: {len(rows)} fields of {len(plan.todo)} plate(s) through {actors} inference actor(s) "
         f"({'GPU' if use_gpu else f'{f.torch_threads} thread(s)'} each"
         f"{', sized from the cluster' if not f.actors else ''})")
    spec = EncoderSpec(ENCODER, checkpoint_dir=plan.checkpoint, channel_groups=cfg.model.channel_groups or None,
                       storage_options=cfg.data.storage_options or None)
    ds = embedding_dataset(rows, inference_data_config(cfg, use_gpu), [spec], keep_columns=[ROW], batch_size=f.batch_size,
                           actors=actors, image_size=f.image_size, cpus_per_actor=f.cpus_per_actor,
                           torch_threads=f.torch_threads, gpus_per_actor=f.gpus_per_actor if use_gpu else 0.0,
                           one_batch_per_block=True, channel_readout=f.channel_readout)
    writer.t0 = time.monotonic()  # rates and ETA from here: Ray's start-up is not embedding
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        centres = np.stack([batch[CELL_Y], batch[CELL_X]], axis=1) if writer.cells else None
        writer.add(np.asarray(batch[ROW], dtype=np.int64), np.asarray(batch[f"embedding_{ENCODER}"]), centres)
    writer.finish()
    return writer


def inference_actors(use_gpu: bool, gpus_per_actor: float, cpus_per_actor: float) -> int:
    """features.actors=0: one actor per GPU share with GPU actors; else one per two of the cluster's CPUs
    (the embedded Ray counts twice the cores: one actor per core)."""
    import ray

    resources = ray.cluster_resources()
    if use_gpu:
        return max(1, int(resources.get("GPU", 0) // gpus_per_actor))
    return max(1, int(resources.get("CPU", 1) // (2 * cpus_per_actor)))


def refresh(cfg: Config, manifests: dict[str, str] | None = None, checkpoint: str | None = None,
            dry_run: bool = False) -> RefreshSummary:
    """plan_refresh + run_refresh."""
    return run_refresh(plan_refresh(cfg, manifests, checkpoint), dry_run=dry_run)

