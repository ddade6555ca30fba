"""Evaluation on the feature store (`eval.from_store`): the well features `cellfm refresh` / `cellfm embed`
stored for each checkpoint, read for the plates of every `eval.manifests` entry and scored by
`cellfm.evaluate.protocols.evaluate_features`, with nothing embedded and no Ray.

Each checkpoint's store key comes from `resolve_feature_key` (its weights and the embedding recipe of this
config's data.* / features.* / model.channel_groups settings), so the features read are the ones this
config would compute. A plate counts as stored only if the store's newest entry for it has the plate's
current content version (its files and its manifest rows, `plate_content_version`): features of a plate
that changed since it was embedded are never scored. `stored_problems` says what is missing, one line per
key or plate, before anything is read.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from cellfm.config import Config, PreflightError
from cellfm.data.content_version import plate_content_version
from cellfm.evaluate.wells import OPTIONAL_COLUMNS, REQUIRED_COLUMNS
from cellfm.features.aggregate import WELL_KEYS
from cellfm.features.identity import resolve_feature_key
from cellfm.features.store import FeatureStore, read_features

REFILL = "run `cellfm refresh` (or `cellfm embed`) with this config first"


def stored_keys(cfg: Config, checkpoints: Mapping[str, str]) -> dict[str, str]:
    """{model name: the store key of its checkpoint's features under `cfg`}."""
    return {name: resolve_feature_key(cfg, str(path)) for name, path in checkpoints.items()}


def stored_problems(cfg: Config, keys: Mapping[str, str], manifests: Mapping[str, pd.DataFrame]) -> list[str]:
    """One line per model whose key the store lacks entirely, and per (model, plate of `manifests`) the store
    lacks, holds for older content, or holds without `eval.store_variable`. Lists the store and the plates
    (no pixel read)."""
    options = cfg.data.storage_options or None
    store = FeatureStore(cfg.features.store, options)
    # Per manifest: a plate's version covers its rows there (two manifests may annotate it differently).
    versions = {name: {str(plate): plate_content_version(str(rows["store_uri"].iloc[0]), rows, options)
                       for plate, rows in manifest.groupby("plate", sort=True)} for name, manifest in manifests.items()}
    variable = cfg.eval.store_variable
    problems = []
    for model, key in keys.items():
        newest = {marker["plate"]: marker for marker in store.entries(key)}  # completion order: newest last
        if not newest:
            problems.append(f"feature store {store.uri} has no features of model {model!r} (key {key}, from this "
                            f"config and its checkpoint); {REFILL}")
            continue
        for name, plate_versions in versions.items():
            for plate, version in plate_versions.items():
                where = f"eval.manifests.{name}: plate {plate!r}: feature store {store.uri} key {key} ({model})"
                marker = newest.get(plate)
                if marker is None:
                    problems.append(f"{where} has no features of it; {REFILL}")
                elif marker["plate_version"] != version:
                    problems.append(f"{where} holds content version {marker['plate_version']}, but the plate and its "
                                    f"manifest rows are now version {version} (changed since embedded); {REFILL}")
                elif variable not in marker["well_variables"]:
                    problems.append(f"{where} has no well variable eval.store_variable={variable!r}; stored: "
                                    f"{marker['well_variables']}")
    return problems


def stored_well_features(cfg: Config, key: str, manifest: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """The (metadata, features) of `manifest`'s wells that `evaluate_features` takes: the stored well
    variable `eval.store_variable` of key `key`, metadata per well from the manifest (as the embedding path
    takes it), rows in the store's order (plate, well)."""
    plates = sorted(map(str, manifest["plate"].unique()))
    stored, features = read_features(cfg.features.store, key, level="well", variable=cfg.eval.store_variable,
                                     plates=plates, storage_options=cfg.data.storage_options or None)
    columns = [c for c in dict.fromkeys([*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS, *cfg.eval.labels]) if c in manifest.columns]
    wells = manifest.groupby(WELL_KEYS, sort=False)[[c for c in columns if c not in WELL_KEYS]].first().reset_index()
    keys = stored[WELL_KEYS].astype(str)
    meta = keys.merge(wells.astype({"plate": str, "well": str}), on=WELL_KEYS, how="left", validate="one_to_one",
                      indicator=True)
    # Only wells of the manifest are scored; a plate whose version matches holds exactly those.
    mine = (meta.pop("_merge") == "both").to_numpy()
    return meta[mine].reset_index(drop=True), features[mine]


class StoredFeatures:
    """`run_evaluation`'s source of features with eval.from_store: checks every model and manifest when
    built (`PreflightError`, one line per missing key or plate), then per manifest reads every model's
    stored well features."""

    def __init__(self, cfg: Config, checkpoints: Mapping[str, str], manifests: Mapping[str, pd.DataFrame]):
        self.cfg = cfg
        self.keys = stored_keys(cfg, checkpoints)
        problems = stored_problems(cfg, self.keys, manifests)
        if problems:
            raise PreflightError(problems)

    def __call__(self, name: str, manifest: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, np.ndarray]]:
        print(f"[cellfm] reading the stored well features ({self.cfg.eval.store_variable}) of "
              f"{manifest['plate'].nunique()} plate(s) of '{name}' from {self.cfg.features.store}", flush=True)
        return {model: stored_well_features(self.cfg, key, manifest) for model, key in self.keys.items()}
