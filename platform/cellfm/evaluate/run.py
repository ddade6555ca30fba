"""Evaluate one or more checkpoints side by side, with a random-init encoder (the first checkpoint's
architecture) and intensity statistics as baselines, on every held-out manifest named in
`eval.manifests`: embed the fields with Ray Data (or, with `eval.from_store`, read the features the
feature store holds: `cellfm.evaluate.stored`), then score them with
`cellfm.evaluate.protocols.evaluate_features` and write the report."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cellfm.config import Config, ConfigError
from cellfm.data.cells import CELL_X, CELL_Y
from cellfm.data.pipeline.dataset import load_manifests
from cellfm.evaluate.protocols import evaluate_features, evaluation_settings
from cellfm.evaluate.report import write_report
from cellfm.evaluate.stored import StoredFeatures
from cellfm.evaluate.wells import OPTIONAL_COLUMNS
from cellfm.features.embed import METADATA_COLUMNS, EncoderSpec, embed_manifest
from cellfm.runtime import init_ray, resource_need
from cellfm.train.checkpoint import load_inference_backbone
from cellfm.storage import is_remote

BASELINES = ("random_init", "intensity_stats")
# The name a lone checkpoint is reported under.
DEFAULT_MODEL_NAME = "trained"
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def checkpoints_from_args(values: Sequence[str]) -> dict[str, str]:
    """`--checkpoint` values -> {model name: checkpoint}. One bare PATH is named 'trained'; several
    must each be NAME=PATH with distinct names that are not a baseline's."""
    if len(values) == 1 and not _named(values[0]):
        return {DEFAULT_MODEL_NAME: values[0]}
    out: dict[str, str] = {}
    for value in values:
        if not _named(value):
            raise ConfigError(f"--checkpoint {value!r}: with several checkpoints each must be NAME=PATH")
        name, _, path = value.partition("=")
        if name in out or name in BASELINES:
            raise ConfigError(f"--checkpoint {value!r}: model name {name!r} is "
                              f"{'used twice' if name in out else 'a baseline name'}")
        out[name] = path
    return out


def _named(value: str) -> bool:
    name, sep, _ = value.partition("=")
    return bool(sep) and _MODEL_NAME.fullmatch(name) is not None


def field_features(fields: pd.DataFrame, manifest: pd.DataFrame, embedding_column: str,
                   label_columns: Sequence[str] = ()) -> tuple[pd.DataFrame, np.ndarray]:
    """The per-field (metadata, features) that `evaluate_features` takes, from `embed_manifest`'s
    output; `label_columns` (eval.labels) and the optional columns (localization) come from the manifest."""
    optional = [c for c in dict.fromkeys([*OPTIONAL_COLUMNS, *label_columns])
                if c in manifest.columns and c not in METADATA_COLUMNS]
    # With data.crop_mode=cells a row is a cell: its centre tells it from its field's other cells.
    meta = fields[METADATA_COLUMNS + [c for c in (CELL_Y, CELL_X) if c in fields.columns]]
    if optional:
        keys = ["plate", "well", "field"]
        meta = meta.merge(manifest[keys + optional], on=keys, how="left", validate="many_to_one")
    return meta, np.stack(fields[embedding_column].to_numpy())


def run_evaluation(cfg: Config, checkpoints: str | Path | Mapping[str, str | Path]) -> tuple[dict, dict[str, Path]]:
    """`checkpoints`: one checkpoint (reported as 'trained') or {model name: checkpoint}; each a local
    folder or an s3:// URI (read with `data.storage_options`). Returns the report dict and the paths
    of the written JSON / Markdown / PNG files. With `eval.from_store` the checkpoints' features are read
    from `features.store` (`cellfm.evaluate.stored`; a missing plate or key raises `PreflightError`
    before anything is read) and scored without baselines; otherwise every model and baseline embeds
    the manifests on Ray."""
    if not isinstance(checkpoints, Mapping):
        checkpoints = {DEFAULT_MODEL_NAME: checkpoints}
    clash = [name for name in checkpoints if name in BASELINES]
    if clash or not checkpoints:
        raise ConfigError(f"model names {clash} are baseline names" if clash else "no checkpoint to evaluate")
    storage_options = cfg.data.storage_options or None
    resolved = {name: str(path) if is_remote(path) else str(Path(path).resolve()) for name, path in checkpoints.items()}
    trained_cfgs = {name: load_inference_backbone(path, storage_options)[1] for name, path in resolved.items()}
    first = next(iter(trained_cfgs.values()))
    manifests = {name: load_manifests([path], storage_options=storage_options)
                 for name, path in cfg.eval.manifests.items()}
    if cfg.eval.from_store:
        features_of, baselines = StoredFeatures(cfg, resolved, manifests), []
    else:
        features_of, baselines = EmbeddedFeatures(cfg, resolved, first), list(BASELINES)
    report = {
        "checkpoint": next(iter(resolved.values())),
        "model": first.to_dict()["model"],
        "checkpoints": resolved,
        "model_configs": {name: c.to_dict()["model"] for name, c in trained_cfgs.items()},
        "baselines": baselines,
        "image_size": (cfg.features.image_size if cfg.eval.from_store else cfg.eval.image_size) or "native",
        **evaluation_settings(cfg.eval),
        "results": {},
    }
    if cfg.eval.from_store:
        report["feature_store"] = {"store": cfg.features.store, "variable": cfg.eval.store_variable,
                                   "keys": features_of.keys}
    for name, manifest in manifests.items():
        block = evaluate_features(features_of(name, manifest), cfg.eval)
        report["results"][name] = {"manifest": str(cfg.eval.manifests[name]),
                                   "channels": list(manifest["channel_names"].iloc[0]), **block}
    return report, write_report(report, cfg.eval.output_dir)


class EmbeddedFeatures:
    """Per manifest, every model's and baseline's field features, embedded on Ray (started here)."""

    def __init__(self, cfg: Config, resolved: Mapping[str, str], first: Config):
        storage_options = cfg.data.storage_options or None
        self.cfg = cfg
        self.encoders = [
            # model.channel_groups of the evaluation config extends/overrides each checkpoint's mapping,
            # e.g. to place a stain the model never saw into the context or concept group.
            *(EncoderSpec(name, checkpoint_dir=path, channel_groups=cfg.model.channel_groups,
                          storage_options=storage_options) for name, path in resolved.items()),
            # The random baseline uses the first checkpoint's architecture, not the evaluation config's.
            EncoderSpec("random_init", model={**first.to_dict()["model"],
                                              "channel_groups": {**first.model.channel_groups, **cfg.model.channel_groups}},
                        seed=cfg.eval.random_init_seed),
            EncoderSpec("intensity_stats", intensity=True),
        ]
        init_ray(cfg.ray, need=resource_need(cfg, "evaluate"))

    def __call__(self, name: str, manifest: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, np.ndarray]]:
        cfg, encoders = self.cfg, self.encoders
        print(f"[cellfm] embedding {len(manifest)} fields of '{name}' ({cfg.eval.manifests[name]}) with "
              f"{len(encoders)} models", flush=True)
        started = time.perf_counter()
        fields = embed_manifest(manifest, cfg.data, encoders, batch_size=cfg.eval.batch_size,
                                actors=cfg.eval.embed_actors, image_size=cfg.eval.image_size,
                                channel_readout=cfg.eval.channel_readout)
        seconds = time.perf_counter() - started
        unit = "cells" if cfg.data.crop_mode == "cells" else "fields"
        print(f"[cellfm] embedded {len(fields)} {unit} of '{name}' with {len(encoders)} models in {seconds:.0f} s "
              f"({len(fields) / max(seconds, 1e-9):.1f} {unit}/s)", flush=True)
        return {spec.name: field_features(fields, manifest, f"embedding_{spec.name}", cfg.eval.labels)
                for spec in encoders}
