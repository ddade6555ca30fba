"""Preflight: every check a job can make before Ray starts, on the resolved config together with the
manifests (and checkpoint) it names. All problems come back at once, one line each naming the key
(or plate/well/field) at fault and what is allowed; `cellfm` prints them and exits with code 2.

The config's own rules (types, ranges, cross-field rules) live in `cellfm.config`; this module adds
the rules that need the manifests: channel counts against `data.pad_channels_to`, field sizes and
dtypes, label columns and their classes, negative controls, steps per epoch, channel groups and
vocabularies against the checkpoint, and whether each path is one the job can see at all (under
`ray job submit --working-dir .` a git-ignored folder such as `demo_output/` is not uploaded).

A job runs it as its first step:

    preflight(cfg, train=True)                            # pretrain: data.train_manifest
    preflight(cfg, evaluate=True, checkpoint=path)        # evaluate: eval.manifests (+ the checkpoint)
    preflight(cfg, manifests={"--manifest": uri})         # any other manifest a job reads fields of
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import pandas as pd

from cellfm.config import PLATE_PROTOCOLS, Config, ConfigError, DataConfig, config_problems
from cellfm.runtime import RAY_JOB_CONFIG_ENV

# Problem lines shown per job; the rest are counted.
MAX_PROBLEMS = 50


class PreflightError(ConfigError):
    """The config, its manifests or its paths cannot run; `problems` holds one line per problem."""


def preflight(cfg: Config, *, train: bool = False, evaluate: bool = False, checkpoint: str | None = None,
              manifests: Mapping[str, str] | None = None, outputs: Mapping[str, str] | None = None,
              source: str = "") -> None:
    """Raise `PreflightError` listing every problem `preflight_problems` finds."""
    problems = preflight_problems(cfg, train=train, evaluate=evaluate, checkpoint=checkpoint,
                                  manifests=manifests, outputs=outputs, source=source)
    if problems:
        from cellfm.data.manifest import first_problems

        raise PreflightError(first_problems(problems, MAX_PROBLEMS))


def preflight_problems(cfg: Config, *, train: bool = False, evaluate: bool = False, checkpoint: str | None = None,
                       manifests: Mapping[str, str] | None = None, outputs: Mapping[str, str] | None = None,
                       source: str = "") -> list[str]:
    """Every problem of `cfg` (loaded from `source`, which prefixes its own rules' lines) for a job that
    trains (`train`: reads `data.train_manifest`, writes under `train.storage_path`), evaluates
    (`evaluate`: reads `eval.manifests` and `checkpoint`, writes `eval.output_dir`) and/or reads the
    fields of other `manifests` (name -> path) and writes other `outputs` (name -> path). Reads
    manifests and plate metadata; starts nothing."""
    # The config's own rules too: a job may have changed it since it was loaded (or loaded it without them).
    problems = [f"{source}: {p}" if source else p for p in config_problems(cfg)]
    inputs: dict[str, str] = {}
    writes: dict[str, str] = {}
    if train:
        inputs["data.train_manifest"] = cfg.data.train_manifest
        writes["train.storage_path"] = cfg.train.storage_path
    if evaluate:
        inputs.update({f"eval.manifests.{name}": path for name, path in cfg.eval.manifests.items()})
        writes["eval.output_dir"] = cfg.eval.output_dir
    inputs.update(manifests or {})
    writes.update(outputs or {})
    if checkpoint is not None:
        problems += [p for p in [path_problem("checkpoint", str(checkpoint))] if p]
    problems += [p for key, path in writes.items() if (p := path_problem(key, path, output=True) or folder_problem(key, path))]

    loaded: dict[str, pd.DataFrame] = {}
    for key, path in inputs.items():
        problem = path_problem(key, path)
        if problem:
            problems.append(problem)
            continue
        manifest, errors = load_checked_manifest(path, cfg.data.storage_options or None)
        problems += [f"{key}={path}: {line}" for line in errors]
        if manifest is not None:
            loaded[key] = manifest
    if train or evaluate:
        problems += model_size_problems(cfg)
    for job in ("train",) * train + ("evaluate",) * (evaluate and not cfg.eval.from_store):
        problems += local_resource_problems(cfg, job)
    if cfg.data.crop_mode == "cells" and cfg.data.cell_locations and loaded:
        problems += cell_location_problems(cfg, loaded)
    if train and "data.train_manifest" in loaded:
        problems += training_manifest_problems(cfg, loaded["data.train_manifest"])
    if evaluate:
        trained = None
        if checkpoint is not None:
            try:
                from cellfm.train.checkpoint import load_checkpoint_config

                trained = load_checkpoint_config(checkpoint, cfg.data.storage_options or None)
            except (ConfigError, ValueError, OSError) as exc:
                problems.append(f"checkpoint {checkpoint}: {exc}")
        for name, path in cfg.eval.manifests.items():
            key = f"eval.manifests.{name}"
            if key in loaded:
                problems += evaluation_manifest_problems(cfg, loaded[key], f"{key}={path}", trained)
    for key in manifests or {}:
        if key in loaded:
            problems += field_layout_problems(loaded[key], _evaluation_data(cfg.data), f"{key}={inputs[key]}")
    return problems


# ----------------------------------------------------------------------------------------- paths


def check_paths(inputs: Mapping[str, str | None] | None = None, outputs: Mapping[str, str | None] | None = None) -> None:
    """`PreflightError` listing every `path_problem` of the inputs and outputs (name -> path; None
    skipped): the preflight of commands that take paths rather than a config (ingest, validate)."""
    problems = [p for key, path in (inputs or {}).items() if path and (p := path_problem(key, path))]
    problems += [p for key, path in (outputs or {}).items() if path and (p := path_problem(key, path, output=True))]
    if problems:
        raise PreflightError(problems)


def folder_problem(key: str, path: str) -> str | None:
    """Why a job cannot write its output folder `path` (local paths only), or None: it is a file, or a file
    stands where one of its parent folders would be."""
    if "://" in str(path):
        return None
    for folder in (Path(path), *Path(path).parents):
        if folder.exists():
            if folder.is_dir():
                return None
            return (f"{key}={path}: {folder} is a file; this must be a folder (or a path where one can be "
                    f"created)")
    return None


def submitted_job_runtime_env() -> dict | None:
    """The runtime env of the `ray job submit` job this process is the driver of (None when it is
    not one)."""
    text = os.environ.get(RAY_JOB_CONFIG_ENV)
    if not text:
        return None
    try:
        return json.loads(text).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}


def path_problem(key: str, path: str, *, output: bool = False) -> str | None:
    """Why the job cannot use `path` (a line naming `key`), or None. Only paths a job run through
    `ray job submit` cannot see are judged here; a missing file elsewhere is reported by its reader.

    Under `ray job submit --working-dir .` the job runs in an unpacked copy of the files git does not
    ignore: a relative path into an ignored folder (demo_output/, data/, ...) points nowhere, and a
    relative output path lands in that temporary copy on one node."""
    if "://" in str(path) or Path(path).is_absolute():
        return None
    runtime_env = submitted_job_runtime_env()
    if runtime_env is None:
        return None
    instead = "use an absolute path on storage every node sees (e.g. /shared/...) or an s3:// URI"
    if output:
        return (f"{key}={path} is a relative path: under `ray job submit` it would be written into the job's "
                f"temporary working directory on one node and lost; {instead}")
    if Path(path).exists():
        return None
    uploaded = ("`--working-dir` uploaded only the files git does not ignore, so git-ignored folders such as "
                "demo_output/ are not there" if runtime_env.get("working_dir") else "the job has no working directory")
    return (f"{key}={path} is a relative path the cluster cannot see: it does not exist in the job's working "
            f"directory {os.getcwd()} ({uploaded}); {instead}")


def load_checked_manifest(path: str, storage_options: dict | None) -> tuple[pd.DataFrame | None, list[str]]:
    """A manifest with its plates checked (`load_manifests`), or the problem lines why not."""
    from cellfm.data.manifest import ManifestError
    from cellfm.data.pipeline import load_manifests
    from cellfm.data.plate import PlateError

    try:
        return load_manifests([path], storage_options=storage_options), []
    except (ManifestError, PlateError) as exc:
        return None, str(exc).splitlines()


# ----------------------------------------------------------------------------------------- resources


@dataclass(frozen=True)
class ResourceNeed:
    """What a job's Ray work asks for at once, with the config keys it comes from (for the problem line)."""

    cpus: float
    gpus: float
    cpu_keys: str  # e.g. "train.num_workers=8 x train.cpus_per_worker=1"
    gpu_keys: str


def resource_need(cfg: Config, job: str) -> ResourceNeed:
    """The CPUs and GPUs `job` ("train", "features" or "evaluate") holds at once: its training workers or
    inference actors, plus a pool of reader actors (data.read_actors) where it uses one."""
    if job == "train":
        t = cfg.train
        cpus, cpu_keys = t.num_workers * t.cpus_per_worker, f"train.num_workers={t.num_workers} x train.cpus_per_worker={t.cpus_per_worker:g}"
        gpus = t.num_workers * t.gpus_per_worker if t.use_gpu else 0.0
        gpu_keys = f"train.use_gpu with train.num_workers={t.num_workers} x train.gpus_per_worker={t.gpus_per_worker:g}"
        if cfg.data.read_actors:
            cpus += cfg.data.read_actors * cfg.data.read_cpus
            cpu_keys += f" + data.read_actors={cfg.data.read_actors} x data.read_cpus={cfg.data.read_cpus:g}"
        return ResourceNeed(cpus, gpus, cpu_keys, gpu_keys)
    if job == "features":
        f = cfg.features
        use_gpu = cfg.train.use_gpu if f.use_gpu is None else f.use_gpu
        actors = f.actors or 1  # 0: sized from the cluster, at least one
        which = "features.use_gpu" if f.use_gpu is not None else "train.use_gpu"
        return ResourceNeed(actors * f.cpus_per_actor, actors * f.gpus_per_actor if use_gpu else 0.0,
                            f"features.actors={f.actors} x features.cpus_per_actor={f.cpus_per_actor:g}",
                            f"{which} with features.actors={f.actors} x features.gpus_per_actor={f.gpus_per_actor:g}")
    if job == "evaluate":
        # One CPU per embedding actor (cellfm.features.embed.embedding_dataset's default); no GPU.
        return ResourceNeed(float(cfg.eval.embed_actors), 0.0, f"eval.embed_actors={cfg.eval.embed_actors} x 1 CPU", "")
    raise ValueError(f"unknown job {job!r}")


def resource_problems(need: ResourceNeed, cpus: float, gpus: float, described: str) -> list[str]:
    """One line per resource `need` asks more of than `described` (which has `cpus` and `gpus`) can ever give."""
    problems = []
    if need.cpus > cpus + 1e-9:
        problems.append(f"resources: {need.cpu_keys} = {need.cpus:g} CPUs, but {described} has {cpus:g}: the run "
                        f"would wait forever; lower them{', raise ray.num_cpus' if 'embedded' in described else ''} "
                        f"or join a larger cluster with --address")
    if need.gpus > gpus + 1e-9:
        problems.append(f"resources: {need.gpu_keys} = {need.gpus:g} GPUs, but {described} has {gpus:g}: the run "
                        f"would wait forever; drop --use-gpu or join a cluster with GPUs (--address)")
    return problems


def local_resource_problems(cfg: Config, job: str) -> list[str]:
    """`resource_problems` of `job` on the embedded Ray this machine would start (none when the job joins
    a cluster: `cellfm.runtime.init_ray` checks that one once connected)."""
    from cellfm.runtime import cluster_address, local_gpu_count

    if cluster_address(cfg.ray):
        return []
    need = resource_need(cfg, job)
    gpus = local_gpu_count() if need.gpus else 0
    return resource_problems(need, cfg.ray.num_cpus, gpus,
                             f"the embedded Ray (ray.num_cpus={cfg.ray.num_cpus}, {gpus} GPU(s) on this machine)")


# ----------------------------------------------------------------------------------------- rules


def model_size_problems(cfg: Config) -> list[str]:
    """Rules tying the model to its size ladder (cellfm.models.registry.SIZES)."""
    from cellfm.models.c3r import c3r_joint_depth
    from cellfm.models.registry import SIZES

    size = SIZES.get(cfg.model.size)
    problems = []
    if cfg.model.name == "c3r" and size is not None and c3r_joint_depth(size.depth, cfg.model.n_pre) < 1:
        problems.append(f"model.n_pre={cfg.model.n_pre} leaves no joint block at model.size={cfg.model.size} "
                        f"(depth {size.depth}; the joint encoder gets depth - ceil(n_pre / 2) blocks)")
    return problems


def field_layout_problems(manifest: pd.DataFrame, data: DataConfig, source: str = "") -> list[str]:
    """Whether the fields of `manifest` fit one layout under `data`: channel counts within
    `data.pad_channels_to`, one field size unless `data.field_size` sets it, one dtype when
    `data.normalization=none`. (The Ray Data pipeline checks the same before building a dataset.)"""
    where = f" (in {source})" if source else ""
    problems = []
    counts = manifest["channel_names"].map(len)
    if data.mixed_channels == "pad" and data.pad_channels_to and int(counts.max()) > data.pad_channels_to:
        row = manifest.loc[counts.idxmax()]
        problems.append(f"data.pad_channels_to={data.pad_channels_to} is smaller than the {counts.max()} channels of "
                        f"plate {row['plate']!r} well {row['well']} field {row['field']}{where}; "
                        f"set it to 0 (the largest count) or >= {counts.max()}")
    if not data.field_size:
        sizes = manifest.groupby(["height", "width"]).size()
        if len(sizes) > 1:
            examples = ", ".join(
                f"{h}x{w} (e.g. plate {manifest.loc[(manifest.height == h) & (manifest.width == w), 'plate'].iloc[0]!r})"
                for h, w in sizes.index[:4])
            problems.append(f"fields of different sizes in one dataset{where}: {examples}; set data.field_size "
                            f"(with data.field_resize crop|resize) to deliver one size")
    if data.normalization == "none":
        dtypes = sorted(set(manifest["dtype"]))
        if len(dtypes) > 1:
            problems.append(f"data.normalization=none with fields of several dtypes {dtypes}{where}; "
                            f"choose a normalization")
    return problems


def cell_location_problems(cfg: Config, loaded: Mapping[str, pd.DataFrame]) -> list[str]:
    """``data.cell_locations`` (``data.crop_mode=cells``) against the fields it may name: one line if it is
    unreadable or lacks a column, else one per plate, well or field it names that none of the job's `loaded`
    manifests nor the config's other manifests (training, evaluation, features) lists, and per centre outside
    its field. One table may serve a screen's training and held-out plates."""
    from cellfm.data.cells import LocationsError, location_problems, read_cell_locations
    from cellfm.data.manifest import ManifestError, read_manifest

    path = cfg.data.cell_locations
    if problem := path_problem("data.cell_locations", path):
        return [problem]
    try:
        locations = read_cell_locations(path, cfg.data.storage_options or None)
    except LocationsError as exc:
        return [str(exc)]
    manifests = list(loaded.values())
    for other in sorted({cfg.data.train_manifest, *cfg.eval.manifests.values(), *cfg.features.manifests.values()}):
        try:  # a manifest the job does not read is only a list of the fields the table may name
            manifests.append(read_manifest(other, cfg.data.storage_options or None))
        except (ManifestError, OSError):
            continue
    return location_problems(locations, pd.concat(manifests, ignore_index=True), path)


def training_manifest_problems(cfg: Config, manifest: pd.DataFrame) -> list[str]:
    """The training manifest against the config: layout, channel groups, the SupCon label column,
    ChannelViT's vocabulary, and at least one optimizer step per epoch."""
    from cellfm.data.cells import LocationsError, with_cell_locations
    from cellfm.data.pipeline import field_cache_problem, samples_per_rank
    from cellfm.models.registry import VOCABULARY_BACKBONES
    from cellfm.train.init_from import init_from_problems
    from cellfm.train.trainer import record_channel_metadata

    source = f"data.train_manifest={cfg.data.train_manifest}"
    problems = field_layout_problems(manifest, cfg.data, source)
    if not problems and (cache := field_cache_problem(manifest, cfg.data, source)):
        problems.append(cache)
    try:
        record_channel_metadata(copy.deepcopy(cfg), manifest)
    except ConfigError as exc:
        problems += exc.problems
    label = cfg.ssl.supcon_label if cfg.ssl.supcon_weight > 0 else ""
    if label and label not in manifest.columns:
        problems.append(f"ssl.supcon_label={label!r} is not a column of {source}; columns: "
                        f"{', '.join(map(str, manifest.columns))}")
    if cfg.model.name in VOCABULARY_BACKBONES and cfg.model.channel_vocabulary:
        unknown = sorted({n for names in manifest["channel_names"] for n in names} - set(cfg.model.channel_vocabulary))
        if unknown:
            problems.append(f"model.channel_vocabulary lacks channel(s) {unknown} of {source}; add them or leave "
                            f"model.channel_vocabulary empty (= the manifest's channels)")
    o, world = cfg.optim, cfg.train.num_workers
    # Every rank runs floor(samples / batch / accumulation) steps (train.loop; samples_per_rank: its fields,
    # or its fewest cells); sizes that are not positive are config problems already.
    samples = len(manifest) // max(world, 1)
    if cfg.data.crop_mode == "cells" and min(world, o.epochs) > 0:
        try:
            located = with_cell_locations(manifest, cfg.data, source)
            samples = samples_per_rank(located, cfg.data, seed=cfg.train.seed, epochs=o.epochs, world_size=world)
        except (LocationsError, OSError):
            pass  # cell_location_problems reports it
    if min(world, o.batch_size_per_worker, o.accumulate_steps) > 0 and \
            samples // o.batch_size_per_worker // o.accumulate_steps < 1:
        cells = f" ({samples} cells for the worker with fewest)" if cfg.data.crop_mode == "cells" else ""
        problems.append(f"{len(manifest)} training fields{cells} over train.num_workers={world} cannot fill one step of "
                        f"optim.batch_size_per_worker={o.batch_size_per_worker} x optim.accumulate_steps="
                        f"{o.accumulate_steps}; lower them or add plates")
    return problems + init_from_problems(cfg, manifest)


def evaluation_manifest_problems(cfg: Config, manifest: pd.DataFrame, source: str,
                                 trained: Config | None = None) -> list[str]:
    """One held-out manifest (`source` names it in the problem lines) against the config and the
    checkpoint's own config `trained`: layout, each `eval.labels` column and its classes against the
    fixed stratified splits, negative controls for `eval.well_normalization=negcon`, and channel
    names the checkpoint's model can place."""
    problems = field_layout_problems(manifest, _evaluation_data(cfg.data), source)
    wells = manifest.groupby(["plate", "well"], sort=False).first()
    n_wells = len(wells)
    for label in cfg.eval.labels:
        if label not in manifest.columns:
            problems.append(f"eval.labels: {label!r} is not a column of {source}; columns: "
                            f"{', '.join(map(str, manifest.columns))}")
            continue
        classes = wells[label].astype(str).value_counts()
        # sklearn's stratified split: >= 2 wells per class, and train and test sets of >= one well per class.
        n_test = math.ceil(cfg.eval.test_fraction * n_wells)
        if len(classes) < 2:
            problems.append(f"eval.labels: {label!r} has {len(classes)} class in {source}; a probe needs >= 2")
        elif (classes < 2).any():
            rare = ", ".join(repr(c) for c in classes[classes < 2].index[:5])
            problems.append(f"eval.labels: {label!r} class(es) {rare} have a single well in {source}; "
                            f"stratified splits need >= 2 wells per class")
        elif min(n_test, n_wells - n_test) < len(classes):
            problems.append(f"eval.labels: {label!r} has {len(classes)} classes but eval.test_fraction="
                            f"{cfg.eval.test_fraction} of {n_wells} wells in {source} leaves {n_test} test and "
                            f"{n_wells - n_test} training wells; each needs >= one well per class")
    if cfg.eval.well_normalization == "negcon":
        controls = wells.groupby(level="plate")["is_control"].sum()
        for plate, n in controls[controls < 2].items():
            problems.append(f"eval.well_normalization=negcon needs >= 2 negative-control wells per plate; plate "
                            f"{plate!r} of {source} has {int(n)} (set eval.well_normalization=none)")
    if cfg.eval.channel_readout == "per_channel":
        problems += _per_channel_problems(cfg, manifest, source)
    if set(cfg.eval.protocols) <= set(PLATE_PROTOCOLS):  # nothing else to score on one plate
        problem = one_plate_problem(manifest, source, f"eval.protocols={list(cfg.eval.protocols)}")
        problems += [problem] if problem else []
    if trained is not None:
        problems += _channels_the_model_places(cfg, trained, manifest, source)
    return problems


def _per_channel_problems(cfg: Config, manifest: pd.DataFrame, source: str) -> list[str]:
    """A per-channel readout concatenates each channel's embedding in channel order, so every field of a
    manifest must have the same channel list, unpadded."""
    lists = list(dict.fromkeys(tuple(names) for names in manifest["channel_names"]))
    if len(lists) > 1:
        return [f"eval.channel_readout=per_channel needs one channel list per manifest; {source} has {len(lists)} "
                f"(e.g. {list(lists[0])} and {list(lists[1])}): give each channel configuration its own "
                f"eval.manifests entry"]
    if cfg.data.pad_channels_to > len(lists[0]):
        return [f"eval.channel_readout=per_channel cannot read out padded fields: data.pad_channels_to="
                f"{cfg.data.pad_channels_to} pads the {len(lists[0])} channels of {source} (set it to 0)"]
    return []


def one_plate_problem(manifest: pd.DataFrame, source: str, requested: str) -> str | None:
    """The line for a manifest of one plate where `requested` (the key and value asking for a protocol
    across plates: per-plate or leave-one-plate-out) needs two or more; None with several plates."""
    plates = sorted(map(str, manifest["plate"].unique()))
    if len(plates) >= 2:
        return None
    return (f"{requested} needs two or more plates (a standard error over plates, or plates to leave out), but "
            f"{source} has {len(plates)} ({', '.join(plates)}); add held-out plates or use the fixed-split probe")


def _channels_the_model_places(cfg: Config, trained: Config, manifest: pd.DataFrame, source: str) -> list[str]:
    from cellfm.models.registry import VOCABULARY_BACKBONES

    names = sorted({n for row in manifest["channel_names"] for n in row})
    if trained.model.name == "c3r":
        groups = {**trained.model.channel_groups, **cfg.model.channel_groups}
        missing = [n for n in names if n not in groups]
        if missing:
            return [f"model.channel_groups: channel(s) {missing} of {source} have no context/concept group in the "
                    f"checkpoint; add them, e.g. 'model.channel_groups={{{missing[0]}: context}}'"]
    if trained.model.name in VOCABULARY_BACKBONES:
        unknown = [n for n in names if n not in trained.model.channel_vocabulary]
        if unknown:
            return [f"channel(s) {unknown} of {source} are not in the checkpoint's model.channel_vocabulary "
                    f"{trained.model.channel_vocabulary}; {trained.model.name} embeds only channels it was trained on"]
    return []


def _evaluation_data(data: DataConfig) -> DataConfig:
    # Evaluation streams float16 whatever the training transfer dtype (cellfm.data.pipeline).
    import dataclasses

    return dataclasses.replace(data, transfer_dtype="float16")
