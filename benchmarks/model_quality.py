"""The seed papers' model comparisons in miniature: CellRep, C3R and the baselines they beat, trained on one
budget and scored with one protocol on seen and unseen channel configurations of the synthetic family, beside
the known ceilings of each configuration.

    python benchmarks/model_quality.py                      # clear screen: every model x 3 seeds, ceilings, 5 held-out plates
    python benchmarks/model_quality.py --difficulty subtle  # the original screen -> model_quality_subtle.{json,md,png}
    python benchmarks/model_quality.py --models cellrep vit_rgb --seeds 0 --epochs 2    # a quick look
    python benchmarks/model_quality.py --models cellrep --seeds 0 --epochs 1 --heldout-plates 2 --ceilings  # smoke
    python benchmarks/model_quality.py --resume --models cellrep ...   # add runs to an existing result

Screen (`--difficulty`, default `clear`: the calibrated one of docs/screens.md; results record its revision): per
configuration 3 training plates and --heldout-plates (default 5) held-out plates of 56 wells (8 controls + 12
compounds x 4; hpa4: 24 proteins x 4), 4 fields of 96 px a well, wells restricted to the labels the
configuration's stains can reveal.

Training: every model gets configs/model_quality.yaml (same optimizer steps, batch, crops, image size,
schedules) plus its own objective (MODELS: CellRep DINO; C3R iBOT + Masked Context Distillation; ChannelViT
iBOT + hierarchical channel sampling; DiChaViT iBOT + diverse channel sampling; CA-MAE masked reconstruction;
vit_rgb (RGB composite, hues evenly spaced) and single_channel iBOT), on the `cp5` training plates (5 Cell
Painting stains), single-process on fields held in memory, through the one training step
(`cellfm.train.in_memory.train_in_memory` -> `SSLMetaArch`). Seeds are train.seed: the init, every augmentation
draw and the field order. `vit_rgb_finetuned` is the CellRep paper's "DINOv2 Finetuned": the same seed's vit_rgb
continued (`train.init_from`, fresh optimizer) for the same epochs on novel4's training plates, so it saw the
assay it is evaluated on (other plates), which no other encoder did. `cellrep_mixed` / `c3r_mixed` pre-train on
the training plates of cp5, hpa4 and brightfield1 in one padded stream (5-, 4- and 1-channel fields with a
channel mask; `cellfm.train.in_memory.pad_field_sets`) for the same optimizer steps as cp5 alone (MIXES).

Evaluation (`score_features`: the probes across plates of `cellfm.evaluate.protocols`): the teacher backbone
embeds every held-out field (CLS + mean patch token of the whole field resized to eval.image_size), fields are
averaged per well, and a standardized logistic regression of MoA is scored two ways: within each plate on
eval.n_splits fixed stratified splits (mean ± standard error over plates), and leave one plate out (features
z-scored per plate, trained on the other plates, every well tested once; ± the binomial standard error over
wells). Configurations: `cp5` held-out wells (seen configuration), `novel4` (Golgi, Mito, DNA, Tubulin: two stains
never seen, another count and order), `brightfield1` (one label-free channel) and protein localization on
`hpa4` (Microtubules, Protein, Nucleus, ER). Where a model cannot take a configuration (ChannelViT has no
embedding for a stain it never saw), the cell is "n/a" with the reason.

Readouts (`eval.channel_readout`): every model pooled (its one embedding of all channels); the models that pool
over channels (CellRep, C3R, single_channel) also per channel (each channel embedded alone, the embeddings
concatenated in channel order), since pooling hides which stain a feature came from. Beside each trained
encoder, its architecture at random init (same seed) read out the same way (a finetuned or mixed row shares its
source model's, scored once); per-channel intensity statistics;
and (`--ceilings`) the oracle (the generator's per-cell parameters per well, `cellfm.evaluate.ceilings`), a
supervised CNN trained on each configuration's own training plates (`cellfm.evaluate.supervised_cnn`,
--cnn-epochs) and the CellProfiler-style baseline (cp-measure on the generator's masks,
`cellfm.features.morphology`), all scored with the same protocol. Share of headroom: (score - intensity) /
(oracle - intensity).

Each cell is the mean over seeds with a standard error that adds the seeds' spread to the wells' sampling error:
sqrt(mean over seeds of se² + var over seeds (ddof=1) / n_seeds). Claims compare two cells with
`cellfm.evaluate.metrics.compare_scores`: a direction only where the difference exceeds two standard errors.

Writes benchmarks/results/model_quality.{json,md,png} (subtle: model_quality_subtle.*) after every run, so a run
that dies keeps what it measured (continue it with --resume), and prints progress with an ETA.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from cellfm.config import Config, ModelConfig, load_config
from cellfm.data.manifest import read_manifest
from cellfm.data.synthetic.catalog import (DIFFICULTIES, FAMILY_CONFIGS, LAYOUTS, ScreenLayout, revealed_labels,
                                          screen_difficulty)
from cellfm.data.synthetic.screens import generate_family_screen
from cellfm.evaluate.ceilings import oracle_features
from cellfm.evaluate.metrics import compare_scores
from cellfm.evaluate.protocols import lopo_probe, per_plate_probe, split_seeds
from cellfm.evaluate.supervised_cnn import CNNSettings, cnn_well_features, train_supervised_cnn
from cellfm.evaluate.wells import well_profiles
from cellfm.features.embed import IntensityStatistics, embed_fields
from cellfm.features.morphology import well_morphology
from cellfm.models.registry import VOCABULARY_BACKBONES, build_backbone
from cellfm.storage import replacing, write_file
from cellfm.train.in_memory import load_normalized_fields, pad_field_sets, train_in_memory
from cellfm.train.inputs import record_channel_metadata

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
CONFIG = REPO / "configs" / "model_quality.yaml"
FORMAT = 3  # of the results JSON: 3 = a screen difficulty, training plates per configuration, ceilings, finetuning

IBOT = ["ssl.objective=ibot", "ssl.kl_uniform_weight=0.0"]
# name -> overrides on configs/model_quality.yaml: the model and the objective its paper trains it with.
MODELS = {
    "cellrep": ["model.name=cellrep", "ssl.objective=dino"],
    "c3r": ["model.name=c3r", *IBOT, "ssl.mcd=true"],
    "vit_rgb": ["model.name=vit_rgb", *IBOT],
    "channelvit": ["model.name=channelvit", *IBOT, "ssl.channel_sampling=hcs"],
    "single_channel": ["model.name=single_channel", *IBOT],
    "dichavit": ["model.name=dichavit", *IBOT, "ssl.channel_sampling=dcs"],
    "ca_mae": ["model.name=ca_mae", "ssl.objective=mae", "ssl.n_local_crops=0"],
    "vit_rgb_finetuned": ["model.name=vit_rgb", *IBOT],
    # CellRep at 1.26x ViT-S/16's FLOPs (attention across channels per patch position; docs/models.md), and the
    # pooling that keeps which stain showed what (learned content-chosen queries), for CellRep and C3R.
    "cellrep_axial": ["model.name=cellrep", "ssl.objective=dino", "model.channel_mixer=axial"],
    "cellrep_attention_pool": ["model.name=cellrep", "ssl.objective=dino", "model.channel_pooling=attention"],
    "c3r_attention_pool": ["model.name=c3r", *IBOT, "ssl.mcd=true", "model.channel_pooling=attention"],
}
# Pre-training on a mix of configurations (imaging-modality diversity, as CHAMMI-75 recommends): the training
# plates of these configurations in one padded stream (`pad_field_sets`; 5-, 4- and 1-channel fields in each
# batch with a channel mask), for the same number of optimizer steps as cp5 alone. novel4 stays unseen: its
# Golgi never appears in training (its Tubulin does, as hpa4's "Microtubules" — another name, the same stain).
MIXES = {f"{model}_mixed": ("cp5", "hpa4", "brightfield1") for model in ("cellrep", "c3r")}
MODELS |= {name: MODELS[name.removesuffix("_mixed")] for name in MIXES}  # the same model and objective
# The CellRep paper's "DINOv2 Finetuned" row: a model pre-trained on cp5 (the same seed's run of FINETUNED[m][0]),
# then continued (`train.init_from`: its student, teacher and centers; a fresh optimizer and schedules) for the
# same number of epochs on the training plates of FINETUNED[m][1], which the evaluation's held-out plates are not.
FINETUNED = {"vit_rgb_finetuned": ("vit_rgb", "novel4")}
# Models whose one embedding pools over channels (a mean after the mixer, per group, or of per-channel
# embeddings): read out both ways. vit_rgb fuses stains at the input and ChannelViT keeps a token per channel.
CHANNEL_POOLING = ("cellrep", "c3r", "single_channel", "cellrep_axial", "cellrep_attention_pool", "c3r_attention_pool",
                   "cellrep_mixed", "c3r_mixed")
READOUTS = ("pooled", "per_channel")
TRAIN_CONFIG = "cp5"
PROTOCOLS = {"lopo": "leave-one-plate-out probe (features z-scored per plate; ± standard error over wells)",
             "per_plate": "probe within each plate (fixed splits; mean ± standard error over plates)"}


@dataclass(frozen=True)
class Evaluation:
    """One evaluated configuration of the synthetic family: its held-out plates and what it tests."""

    config: str
    title: str


EVALUATIONS = (
    Evaluation("cp5", "cp5 held-out wells (seen stains), MoA"),
    Evaluation("novel4", "novel4 (2 unseen stains, 4 channels), MoA"),
    Evaluation("brightfield1", "brightfield1 (1 label-free channel), MoA"),
    Evaluation("hpa4", "hpa4 protein localization"),
)

# Every configuration: 3 training plates (cp5's train every encoder; the others' train only the supervised CNN
# ceiling and the finetuned row) + the held-out plates the probes score. Per plate 8 control wells + 12 compounds
# x 4 wells (hpa4: 24 proteins x 4 wells), 4 fields of 96 px a well; wells restricted to the labels the
# configuration's stains can reveal (`revealed_labels`: brightfield shows no ER or mitochondria).
N_HELDOUT_PLATES = LAYOUTS["benchmark"].n_heldout_plates
DIFFICULTY = "clear"  # the calibrated screen (docs/screens.md); "subtle" is the original one


def layout(n_heldout_plates: int = N_HELDOUT_PLATES) -> ScreenLayout:
    """The family's `benchmark` layout (the paper-dimensions sweep's screens) with this many held-out plates."""
    return replace(LAYOUTS["benchmark"], n_heldout_plates=n_heldout_plates)


def training(config: str) -> str:
    """The Screens key of a configuration's training plates (the configuration's own name keys its held-out plates)."""
    return f"{config}/train"


def readouts(model: str) -> tuple[str, ...]:
    return READOUTS if model in CHANNEL_POOLING else ("pooled",)


def unsupported_reason(model: ModelConfig, channels: Sequence[str]) -> str | None:
    """Why an encoder of `model` (its vocabulary filled from the training manifest) cannot embed fields with
    these channels, or None if it can. ChannelViT learns one embedding per training stain and has none for
    another (so does DiChaViT); every other model takes any stains (C3R once each stain has a context/concept
    group)."""
    if model.name in VOCABULARY_BACKBONES:
        unknown = [c for c in channels if c not in model.channel_vocabulary]
        if unknown:
            return f"{model.name} has no channel embedding for {', '.join(unknown)} (never seen in training)"
    return None


def over_seeds(cells: Sequence[dict]) -> dict:
    """One protocol's scores of several seeds (each {"top1", "top1_se"}) -> mean, the standard error
    sqrt(mean se² + var(ddof=1) / n) (the wells' sampling error plus the seeds' spread) and the values."""
    values = np.asarray([c["top1"] for c in cells], dtype=float)
    wells_var = float(np.mean([c["top1_se"] ** 2 for c in cells]))
    seeds_var = float(values.var(ddof=1)) / len(values) if len(values) > 1 else 0.0
    return {"mean": float(values.mean()), "se": math.sqrt(wells_var + seeds_var), "n": len(values),
            "values": values.tolist()}


def cell_text(cell: dict) -> str:
    """A table cell: "0.412 ± 0.031" (mean ± standard error), or "n/a" with its footnote reason."""
    if "unsupported" in cell:
        return "n/a"
    return f"{cell['mean']:.3f} ± {cell['se']:.3f}"


def log(message: str) -> None:
    print(f"[model_quality {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Screens:
    """The family's plates at one difficulty (generated into `root` once): per configuration (`configs`, default
    every evaluated one) its training and held-out plates, wells restricted to the labels its stains can reveal; their manifests, and normalized fields
    in memory (loaded on first use)."""

    def __init__(self, root: Path, cfg: Config, seed: int, n_heldout_plates: int = N_HELDOUT_PLATES,
                 difficulty: str = DIFFICULTY, configs: Sequence[str] | None = None):
        self.manifests: dict[str, pd.DataFrame] = {}
        self._fields: dict[str, torch.Tensor] = {}
        self._data = cfg.data
        for name in configs or [e.config for e in EVALUATIONS]:
            paths = generate_family_screen(root / name, name, layout(n_heldout_plates), seed=seed, difficulty=difficulty)
            labels = revealed_labels(FAMILY_CONFIGS[name].channels)
            for split, key in (("train", training(name)), ("heldout", name)):
                manifest = read_manifest(paths[split])
                self.manifests[key] = manifest[manifest["moa"].isin(labels)].reset_index(drop=True)

    def fields(self, name: str) -> torch.Tensor:
        if name not in self._fields:
            self._fields[name] = load_normalized_fields(self.manifests[name], self._data)
        return self._fields[name]

    def channels(self, name: str) -> list[str]:
        return list(self.manifests[name]["channel_names"].iloc[0])

    def groups(self, name: str) -> dict[str, str]:
        return dict(zip(self.channels(name), self.manifests[name]["channel_groups"].iloc[0]))


def training_configs(model: str) -> tuple[str, ...]:
    """The configurations whose training plates `model` trains on (a finetuned model: the ones it continues on)."""
    if model in FINETUNED:
        return (FINETUNED[model][1],)
    return MIXES.get(model, (TRAIN_CONFIG,))


def model_config(model: str, seed: int, screens: Screens, extra: Sequence[str],
                 configs: Sequence[str] = (TRAIN_CONFIG,)) -> Config:
    """configs/model_quality.yaml + the model's objective + the seed, with the channel metadata the training
    driver records from the manifest of the `configs`' training plates (C3R's groups, ChannelViT's vocabulary)."""
    cfg = load_config(CONFIG, [*MODELS[model], f"train.seed={seed}", *extra])
    record_channel_metadata(cfg, pd.concat([screens.manifests[training(c)] for c in configs], ignore_index=True))
    return cfg


def score_features(meta: pd.DataFrame, features: np.ndarray, cfg: Config, source: str) -> dict:
    """The benchmark's protocol on one configuration's field (or well) features: the per-plate probe and the
    leave-one-plate-out probe of eval.labels[0], each {"top1", "top1_se", "top1_per_plate"}. Every row of the
    table, ceilings included (`extra_rows`), is scored here."""
    label = cfg.eval.labels[0]
    profiles = well_profiles(meta, features, cfg.eval.well_normalization, [label], source=source)
    out = {}
    for protocol, result in (("per_plate", per_plate_probe(profiles, label, cfg.eval)),
                             ("lopo", lopo_probe(profiles, label))):
        if "skipped" in result:
            raise ValueError(f"{source}: {protocol} probe: {result['skipped']}")
        out[protocol] = {key: result[key] for key in ("top1", "top1_se", "top1_per_plate")}
    out["n_wells"], out["n_plates"] = len(profiles.meta), int(profiles.meta["plate"].nunique())
    return out


def score(backbone: torch.nn.Module, model: ModelConfig | None, screens: Screens, cfg: Config,
          readout: str = "pooled") -> dict:
    """`score_features` of the backbone's `readout` per evaluated configuration, or the reason it is n/a."""
    out = {}
    for evaluation in EVALUATIONS:
        name = evaluation.config
        channels = screens.channels(name)
        reason = unsupported_reason(model, channels) if model is not None else None
        if reason is not None:
            out[name] = {"unsupported": reason}
            continue
        if hasattr(backbone, "set_channel_groups"):  # C3R: the evaluated stains' groups (as cellfm evaluate)
            backbone.set_channel_groups({**cfg.model.channel_groups, **screens.groups(name)})
        embedding = embed_fields(backbone, screens.fields(name), channels, cfg.eval.image_size, readout=readout)
        out[name] = score_features(screens.manifests[name], embedding, cfg, source=f"{name} ({readout})")
    return out


# Rows beside the encoders, each a function of the screens giving every evaluated configuration's (well metadata,
# well features), scored by `score_features` like every encoder: the known ceilings (an oracle of the generator's
# parameters, a supervised CNN per configuration) and the field's baseline (CellProfiler measurements).
ExtraRow = Callable[[Screens], Mapping[str, tuple[pd.DataFrame, np.ndarray]]]


def oracle_row(screens: Screens) -> dict[str, tuple[pd.DataFrame, np.ndarray]]:
    return {e.config: oracle_features(screens.manifests[e.config]) for e in EVALUATIONS}


def morphology_row(screens: Screens) -> dict[str, tuple[pd.DataFrame, np.ndarray]]:
    return {e.config: well_morphology(screens.manifests[e.config]) for e in EVALUATIONS}


def cnn_row(settings: CNNSettings) -> ExtraRow:
    """A small CNN trained on each configuration's own training plates and labels; its penultimate features of the
    held-out fields, averaged per well."""
    def features(screens: Screens) -> dict[str, tuple[pd.DataFrame, np.ndarray]]:
        out = {}
        for e in EVALUATIONS:
            train = training(e.config)
            cnn, _ = train_supervised_cnn(screens.fields(train), screens.manifests[train]["moa"].tolist(), settings)
            out[e.config] = cnn_well_features(cnn, screens.fields(e.config), screens.manifests[e.config])
        return out
    return features


CEILINGS = {"oracle": "oracle (generator's per-cell parameters)",
            "cnn": "supervised CNN (the configuration's training plates)",
            "cp_measure": "CellProfiler-style (cp-measure on the known masks)"}
ORACLE = CEILINGS["oracle"]


def ceiling_rows(names: Sequence[str], cnn: CNNSettings) -> dict[str, ExtraRow]:
    functions = {"oracle": oracle_row, "cnn": cnn_row(cnn), "cp_measure": morphology_row}
    return {CEILINGS[name]: functions[name] for name in names}


def score_extra_rows(extra_rows: Mapping[str, ExtraRow], screens: Screens, cfg: Config) -> dict:
    """{row name: {configuration: scores}} of the extra rows; a configuration a row gives no features for is n/a."""
    out = {}
    for name, features_of in extra_rows.items():
        started = time.perf_counter()
        features = features_of(screens)
        out[name] = {e.config: (score_features(*features[e.config], cfg, source=f"{e.config} ({name})")
                                if e.config in features else {"unsupported": f"{name} gives no features here"})
                     for e in EVALUATIONS}
        log(f"{name} in {time.perf_counter() - started:.0f} s: LOPO top-1 "
            + ", ".join(f"{c} {v['lopo']['top1']:.3f}" for c, v in out[name].items() if "lopo" in v))
    return out


def aggregate(runs: list[dict]) -> dict:
    """Per evaluated configuration and protocol: `over_seeds` of the runs' scores, or the first run's n/a reason."""
    out = {}
    for evaluation in EVALUATIONS:
        cells = [run[evaluation.config] for run in runs]
        if "unsupported" in cells[0]:
            out[evaluation.config] = {p: {"unsupported": cells[0]["unsupported"]} for p in PROTOCOLS}
        else:
            out[evaluation.config] = {p: over_seeds([c[p] for c in cells]) for p in PROTOCOLS}
    return out


def row_name(model: str, readout: str, kind: str = "trained") -> str:
    return f"{model} ({kind}, {readout.replace('_', '-')})"


def summarize(results: dict) -> dict:
    """{row name: {configuration: {protocol: cell}}} in table order: each model's trained rows (per readout),
    then the random-init rows, intensity statistics and the extra rows; and each row's (model, readout, kind)."""
    runs = results["runs"]
    models = list(dict.fromkeys(r["model"] for r in runs))
    rows, keys = {}, {}
    for kind in ("trained", "random_init"):
        for model in models:
            for readout in readouts(model):
                mine = [r["readouts"][readout][kind] for r in runs
                        if r["model"] == model and kind in r["readouts"].get(readout, {})]
                if mine:
                    name = row_name(model, readout, kind.replace("_", " "))
                    rows[name], keys[name] = aggregate(mine), {"model": model, "readout": readout, "kind": kind}
    if results.get("intensity_stats"):
        rows["intensity statistics"] = aggregate([results["intensity_stats"]])
    for name, scores in results.get("extra_rows", {}).items():
        rows[name] = aggregate([scores])
    return {"rows": rows, "keys": keys, "headroom": headroom(rows), "calibration": calibration(rows, results["chance"])}


# The clear screen's calibration bars (docs/screens.md), checked here under this benchmark's own protocol (LOPO
# on its held-out plates): each known ceiling must reach its floor, and intensity statistics stay near chance.
CALIBRATION_BARS = {ORACLE: ("at least", 0.9), CEILINGS["cnn"]: ("at least", 0.8),
                    "intensity statistics": ("at most chance +", 0.15)}


def calibration(rows: dict, chance: dict) -> dict:
    """{row: {configuration: {"top1", "se", "bar", "met"}}} for the rows of CALIBRATION_BARS that were scored."""
    out = {}
    for name, (rule, value) in CALIBRATION_BARS.items():
        if name not in rows:
            continue
        out[name] = {}
        for config, protocols in rows[name].items():
            cell = protocols["lopo"]
            if "unsupported" in cell:
                continue
            bar = chance[config] + value if rule.startswith("at most") else value
            met = cell["mean"] <= bar if rule.startswith("at most") else cell["mean"] >= bar
            out[name][config] = {"top1": cell["mean"], "se": cell["se"], "bar": bar, "rule": rule, "met": bool(met)}
    return out


def headroom(rows: dict) -> dict:
    """Each row's share of the headroom above intensity statistics, per configuration (LOPO):
    (score - intensity) / (oracle - intensity), ± the row's standard error over the same denominator (the
    intensity and oracle rows' own errors not included); None where either reference is missing or the oracle
    is within 0.05 of intensity (no headroom to share)."""
    intensity, oracle = rows.get("intensity statistics"), rows.get(ORACLE)
    out = {}
    for name, cells in rows.items():
        if name in ("intensity statistics", ORACLE):
            continue
        out[name] = {}
        for config, protocols in cells.items():
            cell = protocols["lopo"]
            refs = None if intensity is None or oracle is None else (intensity[config]["lopo"], oracle[config]["lopo"])
            if refs is None or any("unsupported" in c for c in (cell, *refs)) or refs[1]["mean"] - refs[0]["mean"] < 0.05:
                out[name][config] = None
                continue
            room = refs[1]["mean"] - refs[0]["mean"]
            out[name][config] = {"share": (cell["mean"] - refs[0]["mean"]) / room, "se": cell["se"] / room}
    return out


def _cell(summary: dict, model: str, readout: str, config: str, kind: str = "trained") -> dict | None:
    """A LOPO cell of the summary, or None when the row was not run."""
    row = summary["rows"].get(row_name(model, readout, kind.replace("_", " ")))
    return None if row is None else row[config]["lopo"]


def sentence(label_a: str, a: dict | None, label_b: str, b: dict | None, config: str) -> str:
    """One measured comparison of two LOPO cells: both values with their standard errors, the difference and
    the direction `compare_scores` gives (stated only beyond two standard errors)."""
    for label, cell in ((label_a, a), (label_b, b)):
        if cell is None or "unsupported" in cell:
            return f"{config}: {label} n/a ({'not run' if cell is None else cell['unsupported']})"
    c = compare_scores(a["mean"], a["se"], b["mean"], b["se"])
    return (f"{config}: {label_a} {a['mean']:.3f} ± {a['se']:.3f} vs {label_b} {b['mean']:.3f} ± {b['se']:.3f}, "
            f"difference {c['difference']:+.3f} (standard error {c['standard_error']:.3f}): {label_a} {c['direction']}")


def claims(summary: dict) -> list[str]:
    """The seed papers' claims and the readout's, each with the direction measured by the leave-one-plate-out
    probe (whichever way it comes out)."""
    configs = [e.config for e in EVALUATIONS]
    models = list(dict.fromkeys(k["model"] for k in summary["keys"].values()))
    lines = []

    def best_readout(model: str) -> str:
        return "per_channel" if model in CHANNEL_POOLING else "pooled"

    for title, a, b in (("CellRep vs vit_rgb (RGB composite) (seed paper: CellRep ahead, most on unseen channel "
                         "sets)", "cellrep", "vit_rgb"),
                        ("C3R vs ChannelViT (seed paper: C3R ahead out of distribution)", "c3r", "channelvit"),
                        ("C3R vs single_channel (seed paper: C3R ahead out of distribution)", "c3r", "single_channel"),
                        ("CellRep vs CA-MAE (CellRep paper: CellRep ahead of the Phenom-style channel-agnostic MAE)",
                         "cellrep", "ca_mae"),
                        ("C3R vs DiChaViT (C3R paper: C3R ahead out of distribution)", "c3r", "dichavit"),
                        ("CellRep vs vit_rgb pre-trained on cp5 and continued on novel4's training plates (CellRep "
                         "paper: CellRep, which never saw the assay, ahead of DINOv2 Finetuned, which did)", "cellrep",
                         "vit_rgb_finetuned"),
                        ("CellRep with the channel-axial mixer (1.26x ViT-S/16 FLOPs) vs today's CellRep (2.07x)",
                         "cellrep_axial", "cellrep"),
                        ("CellRep attention pooling vs mean pooling", "cellrep_attention_pool", "cellrep"),
                        ("C3R attention pooling vs mean pooling", "c3r_attention_pool", "c3r"),
                        ("CellRep pre-trained on cp5 + hpa4 + brightfield1 vs on cp5 alone (same steps; CHAMMI-75: "
                         "modality diversity generalizes; novel4 unseen by both)", "cellrep_mixed", "cellrep"),
                        ("C3R pre-trained on cp5 + hpa4 + brightfield1 vs on cp5 alone", "c3r_mixed", "c3r")):
        if a in models and b in models:
            for readout in readouts(a):
                other = readout if readout in readouts(b) else "pooled"
                la, lb = f"{a} ({readout})", f"{b} ({other})"
                lines.append(f"- **{title}, {a} {readout}.** " + "; ".join(
                    sentence(la, _cell(summary, a, readout, c), lb, _cell(summary, b, other, c), c) for c in configs)
                    + ".")
    for model in models:
        if model in CHANNEL_POOLING:
            lines.append(f"- **{model}: per-channel vs pooled readout (same weights).** " + "; ".join(
                sentence("per-channel", _cell(summary, model, "per_channel", c), "pooled",
                         _cell(summary, model, "pooled", c), c) for c in configs) + ".")
        readout = best_readout(model)
        if summary["rows"].get(row_name(model, readout, "random init")) is None:
            continue
        lines.append(f"- **{model} ({readout}): pre-training vs the same architecture at random init.** " + "; ".join(
            sentence("trained", _cell(summary, model, readout, c), "random init",
                     _cell(summary, model, readout, c, "random_init"), c) for c in configs) + ".")
        intensity = summary["rows"].get("intensity statistics")
        if intensity:
            lines.append(f"- **{model} ({readout}) vs intensity statistics.** " + "; ".join(
                sentence(model, _cell(summary, model, readout, c), "intensity", intensity[c]["lopo"], c)
                for c in configs) + ".")
    return lines


def markdown(results: dict) -> str:
    summary = results["summary"]
    runs_per_model = {}
    for r in results["runs"]:
        runs_per_model[r["model"]] = runs_per_model.get(r["model"], 0) + 1
    incomplete = any(n != len(results["seeds"]) for n in runs_per_model.values())
    seeds_note = (" Incomplete run: seeds trained per model " + ", ".join(f"{m} {n}" for m, n in runs_per_model.items())
                  + "." if incomplete else "")
    threads = "/".join(str(t) for t in sorted({r.get("threads", results["threads"]) for r in results["runs"]}))
    lines = [
        f"# Model quality on one budget, {results['difficulty']} screen, revision {results.get('screen_revision', 1)} "
        "(benchmarks/model_quality.py)", "",
        f"Written by `python benchmarks/model_quality.py --difficulty {results['difficulty']}` on {results['date']} ({results['machine']}, torch threads "
        f"{threads or results['threads']}, {results['runtime_s'] / 60:.1f} min). MoA top-1 (hpa4: localization) of a "
        f"well-level logistic regression on {results['n_heldout_plates']} held-out plates per configuration, over "
        f"{len(results['seeds'])} seed(s) ({', '.join(map(str, results['seeds']))}). ± is a standard error: the "
        f"wells' (or plates') sampling error plus the spread over seeds. Every model: {results['budget']}."
        f"{seeds_note}", ""]
    notes: dict[str, int] = {}

    def row(label: str, cells: dict, protocol: str) -> str:
        texts = []
        for e in EVALUATIONS:
            cell = cells[e.config][protocol]
            text = cell_text(cell)
            if "unsupported" in cell:
                text += f" [{notes.setdefault(cell['unsupported'], len(notes) + 1)}]"
            texts.append(text)
        return f"| {label} | " + " | ".join(texts) + " |"

    for protocol, title in PROTOCOLS.items():
        lines += [f"## {title[0].upper()}{title[1:]}", "",
                  "| encoder | " + " | ".join(e.title for e in EVALUATIONS) + " |", "|" + "---|" * (len(EVALUATIONS) + 1)]
        lines += [row(name, cells, protocol) for name, cells in summary["rows"].items()]
        lines += ["| chance (largest class) | " + " | ".join(f"{results['chance'][e.config]:.3f}"
                                                             for e in EVALUATIONS) + " |", ""]
    shared = any(cell is not None for cells in summary["headroom"].values() for cell in cells.values())
    lines += [] if not shared else ["## Share of headroom (leave-one-plate-out)", "",
              "(score - intensity statistics) / (oracle - intensity statistics): 0 = no better than intensity "
              "statistics, 1 = as good as the generator's own parameters; ± the row's standard error over the same "
              "denominator. — where a reference is missing or the oracle is within 0.05 of intensity.", "",
              "| encoder | " + " | ".join(e.title for e in EVALUATIONS) + " |", "|" + "---|" * (len(EVALUATIONS) + 1)]
    for name, cells in summary["headroom"].items() if shared else ():
        lines.append(f"| {name} | " + " | ".join("—" if cells[e.config] is None else
                                                 f"{cells[e.config]['share']:.2f} ± {cells[e.config]['se']:.2f}"
                                                 for e in EVALUATIONS) + " |")
    lines += ["", *(f"[{n}] n/a: {reason}." for reason, n in notes.items())]
    if summary.get("calibration"):
        lines += ["", "## Calibration bars under this protocol (leave-one-plate-out)", "",
                  "The clear screen was tuned so that every known ceiling reaches its floor and intensity statistics "
                  "stay near chance (docs/screens.md); here is whether that holds with this benchmark's held-out "
                  "plates. **not met** marks a miss.", "",
                  "| row | bar | " + " | ".join(e.config for e in EVALUATIONS) + " |", "|" + "---|" * (len(EVALUATIONS) + 2)]
        for name, cells in summary["calibration"].items():
            rule, value = CALIBRATION_BARS[name]
            lines.append(f"| {name} | {rule} {value} | " + " | ".join(
                "n/a" if e.config not in cells else
                f"{cells[e.config]['top1']:.3f} vs {cells[e.config]['bar']:.3f}"
                + ("" if cells[e.config]["met"] else " **not met**") for e in EVALUATIONS) + " |")
    lines += ["", "## The claims, as measured here (leave-one-plate-out probe)", "",
              "Direction: \"higher\"/\"lower\" only where the difference exceeds two standard errors "
              "(`cellfm.evaluate.metrics.compare_scores`), else \"within noise\".", "", *claims(summary), ""]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["summary"]["rows"]
    names = [name for name in rows if "random init" not in name]  # the .md has them; the plot stays readable
    fig, ax = plt.subplots(figsize=(14, 7.5))
    width = 0.8 / len(names)
    palette = plt.get_cmap("tab20").colors  # 20 distinct colours: every row its own up to 20 rows
    for i, name in enumerate(names):
        colour = "0.7" if name == "intensity statistics" else palette[i % len(palette)]
        for j, e in enumerate(EVALUATIONS):
            x = j + (i - (len(names) - 1) / 2) * width
            cell = rows[name][e.config]["lopo"]
            if "unsupported" in cell:
                ax.text(x, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=7, color=colour)
                continue
            ceiling = name in CEILINGS.values()
            ax.bar(x, cell["mean"], width, yerr=cell["se"], color=colour, capsize=2, label=name if j == 0 else None,
                   hatch="//" if ceiling else None, alpha=0.55 if ceiling else 1.0)
    for j, e in enumerate(EVALUATIONS):
        ax.hlines(results["chance"][e.config], j - 0.45, j + 0.45, colors="k", linestyles=":",
                  label="chance" if j == 0 else None)
    ax.set_xticks(range(len(EVALUATIONS)), [e.title.replace(", ", "\n", 1) for e in EVALUATIONS], fontsize=8)
    ax.set_ylabel("leave-one-plate-out top-1 (± standard error)")
    ax.set_ylim(0, 1)
    # Below the axes: with a dozen rows a legend inside would cover the bars.
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    ax.set_title(f"{results['difficulty']} screen: trained on cp5 (*_mixed: cp5 + hpa4 + brightfield1), one budget; "
                 f"{results['n_heldout_plates']} held-out plates per configuration (hatched: ceilings and the "
                 "CellProfiler-style baseline)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, output: Path) -> None:
    """JSON, Markdown and PNG, each written then renamed."""
    results["summary"] = summarize(results)
    write_file(output.with_suffix(".json"), json.dumps(results, indent=2) + "\n")
    write_file(output.with_suffix(".md"), markdown(results))
    with replacing(output.with_suffix(".png")) as png:
        plot(results, png)


def resumable(previous: dict, current: dict) -> bool:
    """Whether `current`'s runs may join `previous`'s results: the same format, budget, screen (difficulty and its
    revision; results from before revisions are revision 1), held-out plates, CNN settings and objectives."""
    return (previous.get("format") == FORMAT and previous["budget"] == current["budget"]
            and previous["difficulty"] == current["difficulty"]
            and previous["n_heldout_plates"] == current["n_heldout_plates"]
            and previous.get("screen_revision", 1) == current["screen_revision"]
            and previous["cnn"] == current["cnn"]
            and all(previous["models"].get(m, o) == o for m, o in current["models"].items()))


def default_output(difficulty: str) -> Path:
    return RESULTS / ("model_quality.json" if difficulty == DIFFICULTY else f"model_quality_{difficulty}.json")


def train_run(model: str, seed: int, screens: Screens, extra: Sequence[str], checkpoints: Path,
              sources: dict[tuple[int, str], Path]) -> tuple[Config, torch.nn.Module, float]:
    """Train one (model, seed) in memory: (its config, the teacher backbone, the last loss). A FINETUNED model
    continues from the checkpoint its source model's run of the same seed saved in `checkpoints` (training
    the source first if this process has not); every run saves its checkpoint there."""
    configs = training_configs(model)
    if model in FINETUNED:
        source = FINETUNED[model][0]
        if (seed, source) not in sources:
            train_run(source, seed, screens, extra, checkpoints, sources)
        extra = [*extra, f"train.init_from={sources[(seed, source)]}"]
    cfg = model_config(model, seed, screens, extra, configs)
    fields, names = pad_field_sets([(screens.fields(training(c)), screens.channels(training(c))) for c in configs])
    # Every model takes the optimizer steps one configuration's training plates give (a mix: more samples, one budget).
    steps_per_epoch = len(screens.fields(training(configs[0]))) // cfg.optim.batch_size_per_worker
    total_steps, last_loss = cfg.optim.epochs * steps_per_epoch, [math.nan]

    def on_step(epoch: int, step: int, losses) -> None:
        last_loss[0] = losses.total.item()
        if (step + 1) % steps_per_epoch == 0:
            log(f"  {model} seed {seed}: epoch {epoch + 1}/{cfg.optim.epochs}, step {step + 1}/{total_steps}, "
                f"loss {last_loss[0]:.3f}")

    meta_arch = train_in_memory(cfg, fields, names, on_step=on_step, steps_per_epoch=steps_per_epoch)
    sources[(seed, model)] = checkpoints / f"{model}-seed{seed}"
    meta_arch.save(sources[(seed, model)], epoch=cfg.optim.epochs - 1, step=total_steps - 1)
    return cfg, meta_arch.teacher.backbone.eval(), last_loss[0]


def main(argv: list[str] | None = None) -> dict:
    """The benchmark (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", choices=list(MODELS), default=list(MODELS),
                        help="encoders to train (default: all; none with an empty list: the ceilings and intensity "
                             "statistics only)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--difficulty", choices=sorted(DIFFICULTIES), default=DIFFICULTY,
                        help="the synthetic screen (default: the calibrated 'clear' one)")
    parser.add_argument("--epochs", type=int, default=None, help="override optim.epochs (default: the config's)")
    parser.add_argument("--heldout-plates", type=int, default=N_HELDOUT_PLATES,
                        help="held-out plates per configuration (>= 2: the probes across plates need two)")
    parser.add_argument("--ceilings", nargs="*", choices=list(CEILINGS), default=list(CEILINGS),
                        help="rows beside the encoders (default: all; none with an empty list)")
    parser.add_argument("--cnn-epochs", type=int, default=30, help="epochs of the supervised CNN ceiling")
    parser.add_argument("--screen-seed", type=int, default=0, help="seed of the synthetic plates")
    parser.add_argument("--screen-dir", default=None, help="where the plates go (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=None,
                        help="the JSON path; the .md and .png go beside it (default: benchmarks/results/"
                             "model_quality.json for the clear screen, model_quality_<difficulty>.json otherwise)")
    parser.add_argument("--resume", action="store_true",
                        help="keep every run and row already in --output (same budget, screen and plates) and compute "
                             "only the missing (model, seed) runs of --models x --seeds and the missing rows")
    args = parser.parse_args(argv)
    if args.heldout_plates < 2:
        parser.error(f"--heldout-plates={args.heldout_plates}: the per-plate and leave-one-plate-out probes need two "
                     "or more plates")
    torch.set_num_threads(args.threads)
    extra = [] if args.epochs is None else [f"optim.epochs={args.epochs}"]
    base = load_config(CONFIG, extra)
    output = Path(args.output) if args.output else default_output(args.difficulty)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cellfm-model-quality-") as tmp:
        root = Path(args.screen_dir or tmp).resolve()
        screens = Screens(root, base, args.screen_seed, args.heldout_plates, args.difficulty)
        train_fields = screens.fields(training(TRAIN_CONFIG))
        log(f"plates ready in {time.perf_counter() - started:.0f} s: "
            + ", ".join(f"{k} {m[['plate', 'well', 'field']].drop_duplicates().shape[0]} fields"
                        for k, m in screens.manifests.items()))
        steps_per_epoch = len(train_fields) // base.optim.batch_size_per_worker
        plates = layout(args.heldout_plates)
        cnn = CNNSettings(epochs=args.cnn_epochs)
        results = {
            "benchmark": "cellfm model quality on one budget", "format": FORMAT, "difficulty": args.difficulty,
            "screen_revision": screen_difficulty(args.difficulty).revision,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, python {sys.version.split()[0]}, torch {torch.__version__}",
            "threads": args.threads, "config": str(CONFIG.relative_to(REPO)), "models": {m: MODELS[m] for m in args.models},
            "finetuned": {m: FINETUNED[m] for m in args.models if m in FINETUNED},
            "seeds": args.seeds, "screen_seed": args.screen_seed, "n_heldout_plates": args.heldout_plates,
            "split_seeds": split_seeds(base.eval, base.eval.n_splits), "protocols": PROTOCOLS, "layout": plates.__dict__,
            "labels": {e.config: sorted(screens.manifests[e.config]["moa"].unique()) for e in EVALUATIONS},
            "cnn": cnn.__dict__,
            "budget": (f"{base.optim.epochs * steps_per_epoch} optimizer steps of batch "
                       f"{base.optim.batch_size_per_worker} ({base.optim.epochs} epochs of "
                       f"{len(train_fields)} cp5 fields of {plates.field_size} px), 2 global "
                       f"{base.ssl.global_crop_size}-px + {base.ssl.n_local_crops} local {base.ssl.local_crop_size}-px "
                       f"crops, ViT {base.model.size}/{base.model.patch_size}, evaluated on whole fields at "
                       f"{base.eval.image_size} px"),
            "chance": {e.config: float(screens.manifests[e.config].groupby(["plate", "well"])["moa"].first()
                                       .value_counts(normalize=True).max()) for e in EVALUATIONS},
            "intensity_stats": score(IntensityStatistics(), None, screens, base),
            "extra_rows": {}, "runs": [], "runtime_s": 0.0,
        }
        previous_s = 0.0
        if args.resume and output.exists():
            previous = json.loads(output.read_text())
            if not resumable(previous, results):
                parser.error(f"--resume: {output} was written with another format, budget, screen (or revision of it), "
                             "plates or objectives; remove it")
            # Every earlier run stays (with its model's overrides); --models / --seeds say what to add.
            results["runs"] = [{"threads": previous["threads"], **r} for r in previous["runs"]]
            results["models"] = {**previous["models"], **results["models"]}
            results["finetuned"] = {**previous.get("finetuned", {}), **results["finetuned"]}
            results["seeds"] = sorted({*previous["seeds"], *args.seeds})
            results["extra_rows"] = previous["extra_rows"]
            previous_s = previous["runtime_s"]
            log(f"resuming: {len(results['runs'])} runs and {len(results['extra_rows'])} rows kept from {output}")
        missing_rows = {n: f for n, f in ceiling_rows(args.ceilings, cnn).items() if n not in results["extra_rows"]}
        results["extra_rows"].update(score_extra_rows(missing_rows, screens, base))
        results["runtime_s"] = previous_s + time.perf_counter() - started
        write(results, output)  # a resumed run keeps the rows
        done = {(r["seed"], r["model"]) for r in results["runs"]}
        planned = [(seed, model) for seed in args.seeds for model in args.models if (seed, model) not in done]
        seconds: dict[str, list[float]] = {}
        sources: dict[tuple[int, str], Path] = {}
        checkpoints = Path(tmp) / "checkpoints"
        for index, (seed, model) in enumerate(planned):
            run_started = time.perf_counter()
            torch.manual_seed(seed)
            # A finetuned or mixed model's random init is its source model's (same architecture, same seed), already
            # scored in that model's rows.
            random_init = None if model in FINETUNED or model in MIXES else build_backbone(
                model_config(model, seed, screens, extra).model).eval()
            cfg, trained, last_loss = train_run(model, seed, screens, extra, checkpoints, sources)
            train_s = time.perf_counter() - run_started
            run = {"model": model, "seed": seed, "threads": args.threads, "train_seconds": round(train_s, 1),
                   "final_loss": round(last_loss, 4),
                   # The random init is read out as the model it is compared with.
                   "readouts": {readout: {"trained": score(trained, cfg.model, screens, cfg, readout),
                                          **({} if random_init is None else
                                             {"random_init": score(random_init, cfg.model, screens, cfg, readout)})}
                                for readout in readouts(model)}}
            run["seconds"] = round(time.perf_counter() - run_started, 1)
            seconds.setdefault(model, []).append(run["seconds"])
            results["runs"].append(run)
            results["runtime_s"] = previous_s + time.perf_counter() - started
            write(results, output)
            # ETA: each remaining run at its model's mean so far (a model not yet run: the mean of all runs).
            overall = float(np.mean([s for v in seconds.values() for s in v]))
            eta = sum(float(np.mean(seconds.get(m, [overall]))) for _, m in planned[index + 1:])
            log(f"run {index + 1}/{len(planned)} {model} seed {seed} in {run['seconds']:.0f} s: LOPO top-1 "
                + "; ".join(f"{readout} " + ", ".join(f"{k} {v['lopo']['top1']:.3f}" for k, v in s["trained"].items()
                                                     if "lopo" in v) for readout, s in run["readouts"].items())
                + f"; ETA {eta / 60:.1f} min")
        if not planned:
            results["runtime_s"] = previous_s + time.perf_counter() - started
            write(results, output)
    log(f"wrote {output} and its .md / .png in {(time.perf_counter() - started) / 60:.1f} min")
    return results


if __name__ == "__main__":
    main()
