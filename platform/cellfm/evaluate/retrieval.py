"""Retrieval metrics computed with copairs, following the JUMP Cell Painting recipes.

Replicate retrieval (phenotypic activity): each treated well queries the other wells; its replicate
wells (same perturbation, any plate) are the positives, the negative-control wells of its own plate
the negatives, ranked by cosine similarity. Average precision (AP) per well, mean AP (mAP) per
perturbation, a permutation p-value per perturbation against a null of random rankings, corrected
for multiple testing (Benjamini-Hochberg); "fraction retrieved" is the share of perturbations whose
corrected p-value is below the threshold.

MoA consistency: one consensus profile per perturbation (median of its wells), each querying the
others; positives share an MoA (several MoAs per compound allowed, "|"-separated), negatives share
none. mAP and fraction retrieved per MoA as above.
"""

from __future__ import annotations

import tempfile

import numpy as np
import pandas as pd

from cellfm.evaluate.wells import label_sets

NEGCON, TREATED = "negcon", "trt"
# copairs compares pairs in batches of this many (memory, not results).
COPAIRS_BATCH_SIZE = 20000


def _map_with_pvalues(ap: pd.DataFrame, sameby: str, null_size: int, threshold: float, seed: int) -> pd.DataFrame:
    """copairs' mAP per `sameby` group with corrected p-values. Its null distributions are cached
    per (positives, total) in a folder, and which seed a configuration gets depends on the other
    configurations of the call that first wrote it: a fresh folder per call keeps the p-values a
    function of these features alone (and nothing is written to the home directory)."""
    from copairs.map import mean_average_precision

    with tempfile.TemporaryDirectory(prefix="cellfm-copairs-") as cache_dir:
        return mean_average_precision(ap, sameby=[sameby], null_size=null_size, threshold=threshold, seed=seed,
                                      progress_bar=False, cache_dir=cache_dir)


def _summary(scores: pd.DataFrame, sameby: str) -> dict:
    scores = scores.sort_values(sameby)
    return {
        "map": float(scores["mean_average_precision"].mean()),
        "fraction_retrieved": float(scores["below_corrected_p"].mean()),
        "per_group": {str(row[sameby]): {"map": float(row["mean_average_precision"]),
                                         "corrected_p_value": float(row["corrected_p_value"])}
                      for _, row in scores.iterrows()},
    }


def replicate_profiles(meta: pd.DataFrame) -> pd.DataFrame:
    """copairs metadata for replicate retrieval: plate, perturbation (each negative control its own
    id, so controls are never each other's replicates) and pert_type (negcon | trt)."""
    control = meta["is_control"].to_numpy(dtype=bool)
    ids = meta["perturbation_id"].astype(str).to_numpy().copy()
    ids[control] = [f"{NEGCON}-{i}" for i in range(int(control.sum()))]
    return pd.DataFrame({"plate": meta["plate"].astype(str).to_numpy(), "perturbation": ids,
                         "pert_type": np.where(control, NEGCON, TREATED)})


def replicate_retrieval(meta: pd.DataFrame, features: np.ndarray, null_size: int, threshold: float,
                        seed: int) -> dict:
    """JUMP's phenotypic-activity recipe (pos_sameby=[perturbation], neg_sameby=[plate],
    neg_diffby=[pert_type, perturbation]) on well profiles; mAP = mean over perturbations."""
    from copairs.map import average_precision

    profiles = replicate_profiles(meta)
    treated = profiles[profiles["pert_type"] == TREATED]
    if not (profiles["pert_type"] == NEGCON).any():
        return {"skipped": "no negative-control wells to retrieve replicates against"}
    if not treated["perturbation"].duplicated().any():
        return {"skipped": "no perturbation has two or more wells"}
    ap = average_precision(profiles, np.asarray(features, dtype=np.float64), pos_sameby=["perturbation"], pos_diffby=[],
                           neg_sameby=["plate"], neg_diffby=["pert_type", "perturbation"],
                           batch_size=COPAIRS_BATCH_SIZE, distance="cosine", progress_bar=False)
    ap = ap[ap["pert_type"] == TREATED]
    result = _summary(_map_with_pvalues(ap, "perturbation", null_size, threshold, seed), "perturbation")
    return {**result, "n_perturbations": len(result["per_group"])}


def consensus_profiles(meta: pd.DataFrame, features: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """Median profile per treated perturbation (sorted by id) with its MoA labels as a list."""
    treated = ~meta["is_control"].to_numpy(dtype=bool)
    wells = meta[treated].reset_index(drop=True)
    values = np.asarray(features, dtype=np.float64)[treated]
    moas = wells.groupby("perturbation_id", sort=True)["moa"].unique()
    mixed = moas[moas.map(len) > 1]
    if len(mixed):
        raise ValueError(f"perturbation {mixed.index[0]!r} has wells with different MoAs: {sorted(mixed.iloc[0])}")
    index = wells.groupby("perturbation_id", sort=True).indices
    consensus = np.stack([np.median(values[index[p]], axis=0) for p in moas.index])
    profiles = pd.DataFrame({"perturbation": moas.index.astype(str),
                             "moa": label_sets(pd.Series([m[0] for m in moas]))})
    return profiles, consensus


def moa_consistency(meta: pd.DataFrame, features: np.ndarray, null_size: int, threshold: float,
                    seed: int) -> dict:
    """JUMP's MoA-consistency recipe (copairs multilabel AP on consensus profiles: pos_sameby=[moa],
    pos_diffby=[perturbation], neg_diffby=[moa]); mAP = mean over MoAs."""
    from copairs.map.multilabel import average_precision

    if (~meta["is_control"].to_numpy(dtype=bool)).sum() == 0:
        return {"skipped": "no treated wells"}
    profiles, consensus = consensus_profiles(meta, features)
    shared = pd.Series([m for moas in profiles["moa"] for m in moas]).value_counts()
    if shared.empty or shared.max() < 2 or len(shared) < 2:
        return {"skipped": "needs an MoA shared by two perturbations and at least two MoAs"}
    ap = average_precision(profiles, consensus, pos_sameby=["moa"], pos_diffby=["perturbation"], neg_sameby=[],
                           neg_diffby=["moa"], multilabel_col="moa", batch_size=COPAIRS_BATCH_SIZE,
                           distance="cosine", progress_bar=False)
    result = _summary(_map_with_pvalues(ap, "moa", null_size, threshold, seed), "moa")
    return {**result, "n_moas": len(result["per_group"]), "n_perturbations": len(profiles)}
