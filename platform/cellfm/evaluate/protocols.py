"""The evaluation seam: features of several models on one channel configuration in, every protocol's
scores out. Whatever produced the features (`cellfm.evaluate.run` embedding a manifest, or the
feature store), the numbers are computed here and only here.

    block = evaluate_features({"trained": (meta, X), "random_init": (meta, X0)}, cfg.eval)

`meta` holds plate, well, perturbation_id, moa, is_control and the `eval.labels` columns (+ field for
per-field rows, + optional localization); `X` is (rows, D). The result is JSON-ready: per-model
headline metrics (`metrics`, their spread over splits in `spread`), every protocol's details, the 2-D
map of the wells and the best model on MoA of held-out compounds. `cellfm.evaluate.report` renders
a dict of such blocks.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cellfm.config import EVAL_PROTOCOLS, EvalConfig
from cellfm.evaluate.embedding_map import embedding_map, resolve_method
from cellfm.evaluate.metrics import repeated_split_scores
from cellfm.evaluate.neighbors import nn_lopo_scores
from cellfm.evaluate.plate_probes import lopo_probe_scores, per_plate_summary, too_few_plates
from cellfm.evaluate.probes import compound_held_out_scores, localization_map_scores
from cellfm.evaluate.retrieval import moa_consistency, replicate_retrieval
from cellfm.evaluate.wells import REQUIRED_COLUMNS, WellProfiles, well_profiles
from cellfm.features.aggregate import WELL_KEYS

# The label the compound-held-out probe and MoA consistency use, and the HPA-style label column.
MOA_COLUMN, LOCALIZATION_COLUMN = "moa", "localization"
# Protocols whose result holds one entry per eval.labels column.
PER_LABEL_PROTOCOLS = ("probe", "per_plate_probe", "lopo_probe", "nn_lopo")


@dataclass(frozen=True)
class MetricSpec:
    """A headline metric: where its value (and spread over splits) sits in a protocol's result."""

    key: str
    title: str
    protocol: str
    path: tuple[str, ...]
    spread: tuple[str, ...] | None = None
    # Chance level from the result (a probe guessing uniformly), drawn on the bar charts.
    chance_from_classes: bool = False


def metric_specs(labels: list[str]) -> list[MetricSpec]:
    """Headline metrics in report order."""
    specs = []
    for label in labels:
        specs += [MetricSpec(f"probe_{label}_top1", f"probe top-1, {label} (fixed well splits)", "probe",
                             (label, "top1"), (label, "top1_sd"), True),
                  MetricSpec(f"probe_{label}_weighted_precision", f"probe weighted precision, {label} (fixed splits)",
                             "probe", (label, "weighted_precision"), (label, "weighted_precision_sd")),
                  MetricSpec(f"per_plate_probe_{label}_top1",
                             f"probe top-1, {label} (within each plate; ± standard error over plates)",
                             "per_plate_probe", (label, "top1"), (label, "top1_se"), True),
                  MetricSpec(f"lopo_probe_{label}_top1",
                             f"probe top-1, {label} (leave one plate out; ± standard error over wells)",
                             "lopo_probe", (label, "top1"), (label, "top1_se"), True)]
    specs += [MetricSpec("heldout_moa_top1", "MoA top-1, held-out compounds", "compound_heldout", ("top1",),
                         ("top1_sd",), True),
              MetricSpec("heldout_moa_weighted_precision", "MoA weighted precision, held-out compounds",
                         "compound_heldout", ("weighted_precision",), ("weighted_precision_sd",))]
    specs += [MetricSpec(f"nn_lopo_{label}_macro_f1", f"1-NN macro-F1, {label} (leave one plate out)", "nn_lopo",
                         (label, "macro_f1"), None, True) for label in labels]
    specs += [MetricSpec("replicate_map", "replicate-retrieval mAP vs controls", "replicate_map", ("map",)),
              MetricSpec("replicate_fraction_retrieved", "fraction of perturbations retrieved", "replicate_map",
                         ("fraction_retrieved",)),
              MetricSpec("moa_consistency_map", "MoA-consistency mAP", "moa_consistency", ("map",)),
              MetricSpec("moa_consistency_fraction_retrieved", "fraction of MoAs retrieved", "moa_consistency",
                         ("fraction_retrieved",)),
              MetricSpec("localization_map", "localization mAP, held-out proteins", "localization_map", ("map",),
                         ("map_sd",))]
    return specs


def split_seeds(cfg: EvalConfig, n: int) -> list[int]:
    return list(range(cfg.split_seed, cfg.split_seed + n))


def evaluation_settings(cfg: EvalConfig) -> dict:
    """What a report states about how it was computed (beside the per-manifest blocks)."""
    return {
        "protocols": [p for p in EVAL_PROTOCOLS if p in cfg.protocols],
        "labels": list(cfg.labels),
        "well_normalization": cfg.well_normalization,
        "channel_readout": cfg.channel_readout,
        "test_fraction": cfg.test_fraction,
        "split_seeds": split_seeds(cfg, cfg.n_splits),
        "compound_split_seeds": split_seeds(cfg, cfg.n_compound_splits),
        "copairs": {"null_size": cfg.copairs_null_size, "threshold": cfg.copairs_threshold, "seed": cfg.copairs_seed},
        "embedding_map": resolve_method(cfg.embedding_map),
        "metric_titles": {spec.key: spec.title for spec in metric_specs(list(cfg.labels))
                          if spec.protocol in cfg.protocols},
    }


def fixed_split_probe(profiles: WellProfiles, label: str, cfg: EvalConfig) -> dict:
    """The well-level logistic-regression probe of `label` over eval.n_splits fixed stratified splits, or
    {"skipped": reason} when the wells cannot be split so."""
    counts = profiles.meta[label].astype(str).value_counts()
    if counts.min() < 2:
        return {"skipped": f"{label} {counts.idxmin()!r} has one well; stratified splits need two per class"}
    n_test = int(np.ceil(cfg.test_fraction * counts.sum()))  # scikit-learn's rounding
    if min(n_test, counts.sum() - n_test) < len(counts):
        return {"skipped": f"{counts.sum()} wells split {counts.sum() - n_test}/{n_test} cannot hold all "
                           f"{len(counts)} {label} classes on both sides"}
    return repeated_split_scores(profiles.features, profiles.meta[label].astype(str).to_numpy(), cfg.test_fraction,
                                 split_seeds(cfg, cfg.n_splits))


def per_plate_probe(profiles: WellProfiles, label: str, cfg: EvalConfig) -> dict:
    """`fixed_split_probe` within each plate alone, summarized over plates (mean +- standard error,
    `cellfm.evaluate.plate_probes.per_plate_summary`); {"skipped": reason} with one plate or a plate the
    splits cannot hold."""
    plates = profiles.meta["plate"].to_numpy()
    reason = too_few_plates(plates)
    if reason:
        return {"skipped": f"per-plate probe {reason} (a standard error over plates)"}
    runs = {}
    for plate in sorted(set(plates)):
        rows = plates == plate
        result = fixed_split_probe(WellProfiles(profiles.meta[rows].reset_index(drop=True), profiles.features[rows],
                                                profiles.n_fields), label, cfg)
        if "skipped" in result:
            return {"skipped": f"plate {plate!r}: {result['skipped']}"}
        runs[plate] = result
    return per_plate_summary(runs)


def lopo_probe(profiles: WellProfiles, label: str) -> dict:
    """`cellfm.evaluate.plate_probes.lopo_probe_scores` of `label` on these wells."""
    return lopo_probe_scores(profiles.features, profiles.meta[label].to_numpy(), profiles.meta["plate"].to_numpy())


# The well-level probes, each one result per label: (wells, label, eval config) -> result. The sweep
# objective scores one of them (objective.protocol).
PROBE_PROTOCOLS = {"probe": fixed_split_probe, "per_plate_probe": per_plate_probe,
                   "lopo_probe": lambda profiles, label, cfg: lopo_probe(profiles, label)}


def protocol_scores(profiles: WellProfiles, cfg: EvalConfig) -> dict:
    """Every protocol in `cfg.protocols` on one model's wells: {protocol: result}; a protocol the data
    cannot support (one plate for the protocols across plates, no controls for replicate retrieval, no
    localization labels) gives {"skipped": reason}."""
    meta, x = profiles.meta, profiles.features
    compound_seeds = split_seeds(cfg, cfg.n_compound_splits)
    copairs_args = {"null_size": cfg.copairs_null_size, "threshold": cfg.copairs_threshold, "seed": cfg.copairs_seed}

    def per_label(probe):
        return lambda: {label: probe(profiles, label, cfg) for label in cfg.labels}

    run = {
        **{protocol: per_label(probe) for protocol, probe in PROBE_PROTOCOLS.items()},
        "compound_heldout": lambda: compound_held_out_scores(x, meta, MOA_COLUMN, cfg.test_fraction, compound_seeds),
        "nn_lopo": lambda: {label: nn_lopo_scores(x, meta[label].to_numpy(), meta["plate"].to_numpy())
                            for label in cfg.labels},
        "replicate_map": lambda: replicate_retrieval(meta, x, **copairs_args),
        "moa_consistency": lambda: moa_consistency(meta, x, **copairs_args),
        "localization_map": lambda: localization_map_scores(x, meta, LOCALIZATION_COLUMN, cfg.test_fraction,
                                                            compound_seeds),
    }
    return {protocol: run[protocol]() for protocol in EVAL_PROTOCOLS if protocol in cfg.protocols}


def _lookup(result: dict, path: tuple[str, ...]) -> dict | float | None:
    for key in path:
        if "skipped" in result:
            return None
        result = result[key]
    return result


def headline_metrics(details: dict, labels: list[str]) -> tuple[dict, dict, dict]:
    """(value, spread over splits, chance level) per headline metric of the protocols that ran;
    a skipped protocol's metrics are None."""
    values, spread, chance = {}, {}, {}
    for spec in metric_specs(labels):
        if spec.protocol not in details:
            continue
        values[spec.key] = _lookup(details[spec.protocol], spec.path)
        if spec.spread and values[spec.key] is not None:
            spread[spec.key] = _lookup(details[spec.protocol], spec.spread)
        if spec.chance_from_classes and values[spec.key] is not None:
            chance[spec.key] = 1.0 / _lookup(details[spec.protocol], spec.path[:-1] + ("n_classes",))
    return values, spread, chance


def _check_same_wells(profiles: Mapping[str, WellProfiles]) -> None:
    names = list(profiles)
    reference = profiles[names[0]].meta[list(REQUIRED_COLUMNS)]
    for name in names[1:]:
        other = profiles[name].meta[list(REQUIRED_COLUMNS)]
        if not reference.equals(other):
            missing = pd.concat([reference[WELL_KEYS], other[WELL_KEYS]]).drop_duplicates(keep=False)
            where = f" (first difference: plate {missing.iloc[0]['plate']} well {missing.iloc[0]['well']})" \
                if len(missing) else " (same wells, different metadata)"
            raise ValueError(f"model {name!r} has other wells than {names[0]!r}{where}; models are compared on "
                             "the same wells")


def evaluate_features(features_by_model: Mapping[str, tuple[pd.DataFrame, np.ndarray]], cfg: EvalConfig) -> dict:
    """Score every model on one channel configuration (see the module docstring for inputs/output).
    Models keep their given order; all must cover the same wells with the same metadata."""
    if not features_by_model:
        raise ValueError("evaluate_features needs at least one model")
    profiles = {name: well_profiles(meta, x, cfg.well_normalization, list(cfg.labels), source=f"model {name!r}")
                for name, (meta, x) in features_by_model.items()}
    _check_same_wells(profiles)
    details, maps = {}, {}
    started = time.perf_counter()
    for i, (name, wells) in enumerate(profiles.items()):
        details[name] = protocol_scores(wells, cfg)
        maps[name] = embedding_map(wells.features, cfg.embedding_map, seed=cfg.split_seed)
        elapsed = time.perf_counter() - started
        print(f"[cellfm] scored {name!r} ({i + 1}/{len(profiles)}) in {elapsed:.0f}s, "
              f"ETA {elapsed / (i + 1) * (len(profiles) - i - 1):.0f}s", flush=True)
    headlines = {name: headline_metrics(d, list(cfg.labels)) for name, d in details.items()}
    first = next(iter(profiles.values()))
    heldout = {name: h[0].get("heldout_moa_top1") for name, h in headlines.items()}
    ranked = [name for name in profiles if heldout[name] is not None]
    return {
        "models": list(profiles),
        "n_wells": len(first.meta),
        "n_plates": int(first.meta["plate"].nunique()),
        "n_fields": first.n_fields,
        "metrics": {name: h[0] for name, h in headlines.items()},
        "spread": {name: h[1] for name, h in headlines.items()},
        "chance": next(iter(headlines.values()))[2],
        # The model whose confusion matrix the report draws: best MoA top-1 on held-out compounds.
        "best_model": max(ranked, key=lambda name: heldout[name]) if ranked else None,
        "details": details,
        "map": {"wells": {"plate": first.meta["plate"].tolist(), "moa": first.meta[MOA_COLUMN].tolist()},
                "coordinates": maps},
    }
