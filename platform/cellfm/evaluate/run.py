"""Evaluate one or more checkpoints side by side, with a random-init encoder (the first checkpoint's
architecture) and intensity statistics as baselines, on every held-out manifest named in
`eval.manifests`: embed the fields with Ray Data, then score them with
`cellfm.evaluate.protocols.evaluate_features` and write the report."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cellfm.config import Config, ConfigError
from cellfm.data.pipeline import load_manifests
from cellfm.evaluate.protocols import evaluate_features, evaluation_settings
from cellfm.evaluate.report import write_report
from cellfm.evaluate.wells import OPTIONAL_COLUMNS
from cellfm.features.embed import METADATA_COLUMNS, EncoderSpec, embed_manifest
from cellfm.runtime import init_ray
from cellfm.train.checkpoint import load_inference_backbone
from cellfm.train.storage import is_remote

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
    meta = fields[METADATA_COLUMNS]
    if optional:
        keys = ["plate", "well", "field"]
        meta = meta.merge(manifest[keys + optional], on=keys, how="left", validate="one_to_one")
    return meta, np.stack(fields[embedding_column].to_numpy())


def run_evaluation(cfg: Config, checkpoints: str | Path | Mapping[str, str | Path]) -> tuple[dict, dict[str, Path]]:
    """`checkpoints`: one checkpoint (reported as 'trained') or {model name: checkpoint}; each a local
    folder or an s3:// URI (read with `data.storage_options`). Returns the report dict and the paths
    of the written JSON / Markdown / PNG files."""
    if not isinstance(checkpoints, Mapping):
        checkpoints = {DEFAULT_MODEL_NAME: checkpoints}
    clash = [name for name in checkpoints if name in BASELINES]
    if clash or not checkpoints:
        raise ConfigError(f"model names {clash} are baseline names" if clash else "no checkpoint to evaluate")
    storage_options = cfg.data.storage_options or None
    resolved = {name: str(path) if is_remote(path) else str(Path(path).resolve()) for name, path in checkpoints.items()}
    trained_cfgs = {name: load_inference_backbone(path, storage_options)[1] for name, path in resolved.items()}
    first = next(iter(trained_cfgs.values()))
    encoders = [
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
    manifests = {name: load_manifests([path], storage_options=storage_options)
                 for name, path in cfg.eval.manifests.items()}
    init_ray(cfg.ray)
    report = {
        "checkpoint": next(iter(resolved.values())),
        "model": first.to_dict()["model"],
        "checkpoints": resolved,
        "model_configs": {name: c.to_dict()["model"] for name, c in trained_cfgs.items()},
        "baselines": list(BASELINES),
        "image_size": cfg.eval.image_size or "native",
        **evaluation_settings(cfg.eval),
        "results": {},
    }
    for name, manifest in manifests.items():
        manifest_path = cfg.eval.manifests[name]
        print(f"[cellfm] embedding {len(manifest)} fields of '{name}' ({manifest_path}) with "
              f"{len(encoders)} models", flush=True)
        started = time.perf_counter()
        fields = embed_manifest(manifest, cfg.data, encoders, batch_size=cfg.eval.batch_size,
                                actors=cfg.eval.embed_actors, image_size=cfg.eval.image_size)
        seconds = time.perf_counter() - started
        print(f"[cellfm] embedded {len(fields)} fields of '{name}' with {len(encoders)} models in {seconds:.0f} s "
              f"({len(fields) / max(seconds, 1e-9):.1f} fields/s)", flush=True)
        block = evaluate_features({spec.name: field_features(fields, manifest, f"embedding_{spec.name}",
                                                             cfg.eval.labels)
                                   for spec in encoders}, cfg.eval)
        report["results"][name] = {"manifest": str(manifest_path), "channels": list(manifest["channel_names"].iloc[0]),
                                   **block}
    return report, write_report(report, cfg.eval.output_dir)
