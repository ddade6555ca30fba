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

import math
from typing import Mapping

import pandas as pd

from cellfm.config import PLATE_PROTOCOLS, Config, ConfigError, DataConfig, PreflightError, config_problems
from cellfm.data.layout import field_layout_problems
from cellfm.paths import folder_problem, path_problem
from cellfm.runtime import local_resource_problems

# Problem lines shown per job; the rest are counted.
MAX_PROBLEMS = 50


def preflight(cfg: Config, *, train: bool = False, evaluate: bool = False, checkpoint: str | None = None,
              manifests: Mapping[str, str] | None = None, outputs: Mapping[str, str] | None = None,
              source: str = "") -> dict[str, pd.DataFrame]:
    """Raise `PreflightError` listing every problem `preflight_problems` finds; else return the manifests it
    loaded with their plates checked (key -> manifest, e.g. "data.train_manifest"), so the job reads each
    plate's metadata once."""
    problems, loaded = _preflight(cfg, train=train, evaluate=evaluate, checkpoint=checkpoint,
                                  manifests=manifests, outputs=outputs, source=source)
    if problems:
        from cellfm.data.manifest import first_problems

        raise PreflightError(first_problems(problems, MAX_PROBLEMS))
    return loaded


def preflight_problems(cfg: Config, *, train: bool = False, evaluate: bool = False, checkpoint: str | None = None,
                       manifests: Mapping[str, str] | None = None, outputs: Mapping[str, str] | None = None,
                       source: str = "") -> list[str]:
    """Every problem of `preflight` as lines, raising nothing."""
    return _preflight(cfg, train=train, evaluate=evaluate, checkpoint=checkpoint, manifests=manifests,
                      outputs=outputs, source=source)[0]


def _preflight(cfg: Config, *, train: bool, evaluate: bool, checkpoint: str | None, manifests: Mapping[str, str] | None,
               outputs: Mapping[str, str] | None, source: str) -> tuple[list[str], dict[str, pd.DataFrame]]:
    """(every problem, the manifests loaded). Every problem of `cfg` (loaded from `source`, which prefixes its own rules' lines) for a job that
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
        from cellfm.train.inputs import training_input_problems

        problems += training_input_problems(cfg, loaded["data.train_manifest"])
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
    return problems, loaded


def load_checked_manifest(path: str, storage_options: dict | None) -> tuple[pd.DataFrame | None, list[str]]:
    """A manifest with its plates checked (`load_manifests`), or the problem lines why not."""
    from cellfm.data.manifest import ManifestError
    from cellfm.data.pipeline.dataset import load_manifests
    from cellfm.data.plate import PlateError

    try:
        return load_manifests([path], storage_options=storage_options), []
    except (ManifestError, PlateError) as exc:
        return None, str(exc).splitlines()


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
