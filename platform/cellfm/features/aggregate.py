"""Field embeddings -> well profiles: per-well aggregation (mean, median) and per-plate normalization
against the plate's negative-control wells (standardize, robust MAD, spherize), the steps pycytominer
calls aggregate and normalize, on a metadata table plus a feature matrix."""

from __future__ import annotations

import numpy as np
import pandas as pd

WELL_KEYS = ["plate", "well"]
# Well metadata carried by default (what the evaluation's probe needs).
WELL_LABELS = ("perturbation_id", "moa", "is_control")
# MAD of normally distributed values times this is their standard deviation (pycytominer's scale).
MAD_TO_SD = 1.4826


def well_aggregates(meta: pd.DataFrame, features: np.ndarray, methods: tuple[str, ...] = ("mean",),
                    well_columns: tuple[str, ...] = WELL_LABELS) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Rows of `features` (one per field, described by `meta`) grouped by (plate, well), wells sorted.

    Returns the well metadata (plate, well and `well_columns`, taken from each well's first field) and
    one (n_wells, D) matrix per method: "mean" or "median" over the well's fields, per feature."""
    unknown = sorted(set(methods) - {"mean", "median"})
    if unknown:
        raise ValueError(f"unknown well aggregation(s) {unknown}; choose from mean, median")
    groups = meta.groupby(WELL_KEYS, sort=True).indices
    reduce = {"mean": np.mean, "median": np.median}
    out = {m: np.stack([reduce[m](features[idx], axis=0) for idx in groups.values()]) for m in methods}
    first = [idx[0] for idx in groups.values()]
    well_meta = meta.iloc[first][WELL_KEYS + list(well_columns)].reset_index(drop=True)
    return well_meta, out


def aggregate_wells(fields: pd.DataFrame, embedding_column: str, label_columns: list[str] = (),
                    method: str = "mean") -> tuple[pd.DataFrame, np.ndarray]:
    """Mean (or median) field embedding per (plate, well) of a frame holding one embedding array per
    row in `embedding_column`; returns the well metadata (perturbation, MoA, control flag and
    `label_columns`) and an (n_wells, D) matrix."""
    well_columns = tuple(dict.fromkeys([*WELL_LABELS, *label_columns]))
    meta, matrices = well_aggregates(fields, np.stack(fields[embedding_column].to_numpy()), (method,), well_columns)
    return meta, matrices[method]


def normalize_to_controls(features: np.ndarray, meta: pd.DataFrame, eps: float = 1e-6, method: str = "standardize",
                          spherize_regularization: float = 0.1) -> np.ndarray:
    """Per plate, each row of `features` expressed relative to the plate's negative-control rows
    (`meta.is_control`); removes plate effects that would otherwise leak into any comparison.

    standardize: (x - control mean) / (control sd + eps), sd with ddof 0 (pycytominer 'standardize').
    robust_mad:  (x - control median) / (1.4826 * control MAD + eps) (pycytominer 'mad_robustize').
    spherize:    ZCA whitening fitted on the controls: (x - control mean) @ U diag(1/sqrt(s + r)) U^T with
                 s, U the eigenvalues/vectors of the control covariance (ddof 1) and r =
                 spherize_regularization * mean(s) + eps (controls then have identity covariance when r = 0).
    """
    fit = {"standardize": _standardize, "robust_mad": _robust_mad,
           "spherize": lambda c, e: _spherize(c, e, spherize_regularization)}
    if method not in fit:
        raise ValueError(f"unknown normalization {method!r}; choose from {sorted(fit)}")
    out = np.empty(features.shape, dtype=np.float64)
    is_control = meta["is_control"].to_numpy(dtype=bool)
    for plate, idx in meta.groupby("plate").indices.items():
        controls = features[idx][is_control[idx]].astype(np.float64)
        if len(controls) < 2:
            raise ValueError(f"plate {plate}: need at least 2 negative-control wells to normalize, found {len(controls)}")
        out[idx] = fit[method](controls, eps)(features[idx].astype(np.float64))
    return out


def _standardize(controls: np.ndarray, eps: float):
    mu, sd = controls.mean(axis=0), controls.std(axis=0)
    return lambda x: (x - mu) / (sd + eps)


def _robust_mad(controls: np.ndarray, eps: float):
    median = np.median(controls, axis=0)
    mad = np.median(np.abs(controls - median), axis=0)
    return lambda x: (x - median) / (MAD_TO_SD * mad + eps)


def _spherize(controls: np.ndarray, eps: float, regularization: float):
    mu = controls.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(np.atleast_2d(np.cov(controls - mu, rowvar=False)))
    eigenvalues = np.clip(eigenvalues, 0.0, None)  # round-off can make a null direction slightly negative
    shrink = regularization * eigenvalues.mean() + eps
    whiten = (eigenvectors / np.sqrt(eigenvalues + shrink)) @ eigenvectors.T
    return lambda x: (x - mu) @ whiten
