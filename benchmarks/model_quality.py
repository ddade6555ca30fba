"""The seed papers' model comparisons in miniature: CellRep, C3R and the baselines they beat, trained on one
budget and scored with one protocol on seen and unseen channel configurations of the synthetic family.

    python benchmarks/model_quality.py                  # 5 models x 3 seeds, ~35 min on 2 cores
    python benchmarks/model_quality.py --models cellrep vit_rgb --seeds 0 --epochs 2    # a quick look

Training: every model gets configs/model_quality.yaml (same optimizer steps, batch, crops, image size,
schedules) plus its own objective (MODELS: CellRep DINO; C3R iBOT + Masked Context Distillation; ChannelViT
iBOT + hierarchical channel sampling; vit_rgb (RGB composite, hues evenly spaced) and single_channel iBOT),
on the `cp5` training plates (5 Cell Painting stains), single-process on fields held in memory, through the
one training step (`cellfm.train.in_memory.train_in_memory` -> `SSLMetaArch`). Seeds are train.seed: the
init, every augmentation draw and the field order.

Evaluation (one protocol, `cellfm.evaluate.protocols.fixed_split_probe`): the teacher backbone embeds every field of one
held-out plate per configuration (CLS + mean patch token of the whole field resized to eval.image_size), fields
are averaged per well, and a standardized logistic regression is scored on eval.n_splits fixed stratified
well splits (the same splits for every encoder): top-1 of MoA on held-out `cp5` wells (seen configuration),
`novel4` (Golgi, Mito, DNA, Tubulin: two stains never seen, another count and order), `brightfield1` (one
label-free channel) and protein localization on `hpa4` (Microtubules, Protein, Nucleus, ER). Where a model
cannot take a configuration (ChannelViT has no embedding for a stain it never saw), the cell is "n/a" with
the reason. Beside the trained encoders: each architecture at random init (same seeds) and per-channel
intensity statistics. Each cell is mean +- sd (ddof=1) over seeds of the mean over splits.

Writes benchmarks/results/model_quality.{json,md,png} (after every run, so a run that dies keeps what it
measured) and prints progress with an ETA.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from cellfm.config import Config, ModelConfig, load_config
from cellfm.data.manifest import read_manifest
from cellfm.data.synthetic import FAMILY_CONFIGS, ScreenLayout, generate_family_screen
from cellfm.evaluate.protocols import fixed_split_probe, split_seeds
from cellfm.evaluate.wells import well_profiles
from cellfm.features.embed import IntensityStatistics, embed_fields
from cellfm.models.registry import build_backbone
from cellfm.train.in_memory import load_normalized_fields, train_in_memory
from cellfm.train.trainer import record_channel_metadata

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
CONFIG = REPO / "configs" / "model_quality.yaml"

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
}
TRAIN_CONFIG = "cp5"


@dataclass(frozen=True)
class Evaluation:
    """One evaluated configuration of the synthetic family: its held-out plate and what it tests."""

    config: str
    title: str


EVALUATIONS = (
    Evaluation("cp5", "cp5 held-out wells (seen stains), MoA"),
    Evaluation("novel4", "novel4 (2 unseen stains, 4 channels), MoA"),
    Evaluation("brightfield1", "brightfield1 (1 label-free channel), MoA"),
    Evaluation("hpa4", "hpa4 protein localization"),
)
UNSEEN = ("novel4", "brightfield1", "hpa4")  # configurations the models never trained on

# cp5: 3 training plates + 1 held-out plate; every other configuration: its held-out plate only.
# Per plate 8 control wells + 12 compounds x 4 wells (hpa4: 24 proteins x 4 wells), 4 fields of 96 px a well.
TRAIN_LAYOUT = ScreenLayout(n_train_plates=3, n_heldout_plates=1, n_unseen_plates=0, replicates_per_plate=4,
                            controls_per_plate=8, fields_per_well=4, field_size=96)
EVAL_LAYOUT = ScreenLayout(**{**TRAIN_LAYOUT.__dict__, "n_train_plates": 0})


def unsupported_reason(model: ModelConfig, channels: Sequence[str]) -> str | None:
    """Why an encoder of `model` (its vocabulary filled from the training manifest) cannot embed fields with
    these channels, or None if it can. ChannelViT learns one embedding per training stain and has none for
    another; every other model takes any stains (C3R once each stain has a context/concept group)."""
    if model.name == "channelvit":
        unknown = [c for c in channels if c not in model.channel_vocabulary]
        if unknown:
            return f"ChannelViT has no channel embedding for {', '.join(unknown)} (never seen in training)"
    return None


def mean_sd(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (ddof=1; 0 for one value) over seeds."""
    array = np.asarray(values, dtype=float)
    sd = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "sd": sd, "n": len(array), "values": [float(v) for v in array]}


def compare(a: Sequence[float], b: Sequence[float]) -> dict:
    """a - b over seeds: the difference of means, its standard error (Welch) and the direction, "higher" or
    "lower" when the difference exceeds two standard errors, else "within seed noise"."""
    a_stats, b_stats = mean_sd(a), mean_sd(b)
    diff = a_stats["mean"] - b_stats["mean"]
    se = math.sqrt(a_stats["sd"] ** 2 / len(a) + b_stats["sd"] ** 2 / len(b))
    direction = "within seed noise" if abs(diff) <= 2 * se else ("higher" if diff > 0 else "lower")
    return {"difference": diff, "standard_error": se, "direction": direction}


def cell_text(cell: dict) -> str:
    """A table cell: "0.412 ± 0.031" (mean ± sd over seeds), or "n/a" with its footnote reason."""
    if "unsupported" in cell:
        return "n/a"
    if cell["n"] == 1:
        return f"{cell['mean']:.3f}"
    return f"{cell['mean']:.3f} ± {cell['sd']:.3f}"


def log(message: str) -> None:
    print(f"[model_quality {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Screens:
    """The family's plates (generated into `root` once), their manifests and normalized fields in memory."""

    def __init__(self, root: Path, cfg: Config, seed: int):
        self.manifests: dict[str, pd.DataFrame] = {}
        self.fields: dict[str, torch.Tensor] = {}
        cp5 = generate_family_screen(root / TRAIN_CONFIG, TRAIN_CONFIG, TRAIN_LAYOUT, seed=seed)
        self._add("train", read_manifest(cp5["train"]), cfg)
        self._add(TRAIN_CONFIG, read_manifest(cp5["heldout"]), cfg)
        for evaluation in EVALUATIONS:
            if evaluation.config != TRAIN_CONFIG:
                paths = generate_family_screen(root / evaluation.config, evaluation.config, EVAL_LAYOUT, seed=seed)
                self._add(evaluation.config, read_manifest(paths["heldout"]), cfg)

    def _add(self, name: str, manifest: pd.DataFrame, cfg: Config) -> None:
        self.manifests[name] = manifest
        self.fields[name] = load_normalized_fields(manifest, cfg.data)

    def channels(self, name: str) -> list[str]:
        return list(self.manifests[name]["channel_names"].iloc[0])

    def groups(self, name: str) -> dict[str, str]:
        return dict(zip(self.channels(name), self.manifests[name]["channel_groups"].iloc[0]))


def model_config(model: str, seed: int, screens: Screens, extra: Sequence[str]) -> Config:
    """configs/model_quality.yaml + the model's objective + the seed, with the channel metadata the training
    driver records from the manifest (C3R's groups, ChannelViT's vocabulary)."""
    cfg = load_config(CONFIG, [*MODELS[model], f"train.seed={seed}", *extra])
    record_channel_metadata(cfg, screens.manifests["train"])
    return cfg


def score(backbone: torch.nn.Module, model: ModelConfig | None, screens: Screens, cfg: Config) -> dict:
    """Top-1 (mean over the fixed splits) per evaluated configuration, or the reason it is n/a."""
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
        embedding = embed_fields(backbone, screens.fields[name], channels, cfg.eval.image_size)
        label_column = cfg.eval.labels[0]
        profiles = well_profiles(screens.manifests[name], embedding, cfg.eval.well_normalization, [label_column],
                                 source=name)
        label = fixed_split_probe(profiles, label_column, cfg.eval)
        if "skipped" in label:
            raise ValueError(f"{name}: {label['skipped']}")
        out[name] = {"top1": label["top1"], "top1_sd_over_splits": label["top1_sd"], "n_classes": label["n_classes"],
                     "n_test_wells": label["n_test_wells"]}
    return out


def aggregate(runs: list[dict]) -> dict:
    """Per evaluated configuration: mean ± sd over the runs' top-1, or the first run's n/a reason."""
    out = {}
    for evaluation in EVALUATIONS:
        cells = [run[evaluation.config] for run in runs]
        if "unsupported" in cells[0]:
            out[evaluation.config] = {"unsupported": cells[0]["unsupported"]}
        else:
            out[evaluation.config] = mean_sd([c["top1"] for c in cells])
    return out


def claims(summary: dict) -> list[str]:
    """The seed papers' claims, each with the direction measured here (whichever way it comes out)."""
    trained = summary["trained"]
    lines = []

    def values(model: str, config: str) -> list[float] | None:
        cell = trained.get(model, {}).get(config)
        return None if cell is None or "unsupported" in cell else cell["values"]

    def sentence(a: str, b: str, config: str) -> str:
        va, vb = values(a, config), values(b, config)
        if va is None or vb is None:
            missing = a if va is None else b
            cell = trained.get(missing, {}).get(config, {})
            return f"{config}: {missing} n/a ({cell.get('unsupported', 'not run')})"
        c = compare(va, vb)
        return (f"{config}: {a} {np.mean(va):.3f} vs {b} {np.mean(vb):.3f}, difference {c['difference']:+.3f} "
                f"(standard error {c['standard_error']:.3f}): {a} {c['direction']}")

    for title, a, b in (("CellRep vs vit_rgb (RGB composite) on unseen configurations (seed paper: CellRep "
                         "ahead, most on unseen channel sets)", "cellrep", "vit_rgb"),
                        ("C3R vs ChannelViT out of distribution (seed paper: C3R ahead)", "c3r", "channelvit"),
                        ("C3R vs single_channel out of distribution (seed paper: C3R ahead)", "c3r",
                         "single_channel")):
        if a in trained and b in trained:
            lines.append(f"- **{title}.** " + "; ".join(sentence(a, b, config) for config in UNSEEN)
                         + f". On the seen configuration: {sentence(a, b, TRAIN_CONFIG)}.")
    return lines


def summarize(results: dict) -> dict:
    runs = results["runs"]
    models = list(dict.fromkeys(r["model"] for r in runs))
    return {
        "trained": {m: aggregate([r["trained"] for r in runs if r["model"] == m]) for m in models},
        "random_init": {m: aggregate([r["random_init"] for r in runs if r["model"] == m]) for m in models},
        "intensity_stats": aggregate([results["intensity_stats"]]) if results.get("intensity_stats") else {},
    }


def markdown(results: dict) -> str:
    summary = results["summary"]
    header = "| encoder | " + " | ".join(e.title for e in EVALUATIONS) + " |"
    runs_per_model = {m: sum(r["model"] == m for r in results["runs"]) for m in summary["trained"]}
    incomplete = any(n != len(results["seeds"]) for n in runs_per_model.values())
    seeds_note = (" Incomplete run: seeds trained per model " + ", ".join(f"{m} {n}" for m, n in runs_per_model.items())
                  + "." if incomplete else "")
    lines = [
        "# Model quality on one budget (benchmarks/model_quality.py)", "",
        f"Written by `python benchmarks/model_quality.py` on {results['date']} ({results['machine']}, "
        f"torch threads {'/'.join(str(t) for t in sorted({r.get('threads', results['threads']) for r in results['runs']}))}, "
        f"{results['runtime_s'] / 60:.1f} min). Top-1 of a well-level logistic "
        f"regression on held-out wells, mean ± sd over {len(results['seeds'])} seeds "
        f"({', '.join(map(str, results['seeds']))}) of the mean over {len(results['split_seeds'])} fixed well "
        f"splits. Every model: {results['budget']}.{seeds_note}", "",
        header, "|" + "---|" * (len(EVALUATIONS) + 1),
    ]
    notes: dict[str, int] = {}

    def row(label: str, cells: dict) -> str:
        texts = []
        for e in EVALUATIONS:
            cell = cells[e.config]
            text = cell_text(cell)
            if "unsupported" in cell:
                number = notes.setdefault(cell["unsupported"], len(notes) + 1)
                text += f" [{number}]"
            texts.append(text)
        return f"| {label} | " + " | ".join(texts) + " |"

    for model, cells in summary["trained"].items():
        lines.append(row(f"{model} (trained)", cells))
    for model, cells in summary["random_init"].items():
        lines.append(row(f"{model} (random init)", cells))
    if summary["intensity_stats"]:
        lines.append(row("intensity statistics", summary["intensity_stats"]))
    lines.append("| chance (largest class) | " + " | ".join(f"{results['chance'][e.config]:.3f}"
                                                            for e in EVALUATIONS) + " |")
    lines.append("")
    lines += [f"[{n}] n/a: {reason}." for reason, n in notes.items()]
    lines += ["", "## The seed papers' claims, as measured here", "",
              "Direction: \"higher\"/\"lower\" when the difference of seed means exceeds two standard errors "
              "(Welch, over seeds), else \"within seed noise\".", "", *claims(summary), ""]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    models = list(summary["trained"])
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / (len(models) + 1)
    for i, model in enumerate(models):
        for j, e in enumerate(EVALUATIONS):
            x = j + (i - len(models) / 2) * width
            cell = summary["trained"][model][e.config]
            if "unsupported" in cell:
                ax.text(x, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=8, color=f"C{i}")
                continue
            ax.bar(x, cell["mean"], width, yerr=cell["sd"], color=f"C{i}", capsize=2,
                   label=model if j == 0 else None)
            ax.plot(x, summary["random_init"][model][e.config]["mean"], "kx", markersize=5,
                    label="random init (same model)" if i == 0 and j == 0 else None)
    if summary["intensity_stats"]:
        for j, e in enumerate(EVALUATIONS):
            x = j + (len(models) / 2) * width
            ax.bar(x, summary["intensity_stats"][e.config]["mean"], width, color="0.7",
                   label="intensity statistics" if j == 0 else None)
    for j, e in enumerate(EVALUATIONS):
        ax.hlines(results["chance"][e.config], j - 0.45, j + 0.45, colors="k", linestyles=":",
                  label="chance" if j == 0 else None)
    ax.set_xticks(range(len(EVALUATIONS)), [e.title.replace(", ", "\n", 1) for e in EVALUATIONS], fontsize=8)
    ax.set_ylabel("held-out top-1 (mean ± sd over seeds)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=4, loc="upper right")
    ax.set_title("Trained on cp5, one budget; evaluated on seen and unseen channel configurations")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, output: Path) -> None:
    """JSON, Markdown and PNG, each written then renamed."""
    results["summary"] = summarize(results)
    output.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(results, indent=2) + "\n"), (".md", markdown(results))):
        tmp = output.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(output.with_suffix(suffix))
    tmp_png = output.with_name(output.stem + ".tmp.png")
    plot(results, tmp_png)
    tmp_png.replace(output.with_suffix(".png"))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="override optim.epochs (default: the config's)")
    parser.add_argument("--screen-seed", type=int, default=0, help="seed of the synthetic plates")
    parser.add_argument("--screen-dir", default=None, help="where the plates go (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(RESULTS / "model_quality.json"),
                        help="the JSON path; the .md and .png go beside it")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in --output (same budget) and train only the missing ones")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    extra = [] if args.epochs is None else [f"optim.epochs={args.epochs}"]
    base = load_config(CONFIG, extra)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cellfm-model-quality-") as tmp:
        root = Path(args.screen_dir or tmp).resolve()
        screens = Screens(root, base, args.screen_seed)
        log(f"plates ready in {time.perf_counter() - started:.0f} s: "
            + ", ".join(f"{k} {len(v)} fields" for k, v in screens.fields.items()))
        steps_per_epoch = len(screens.fields["train"]) // base.optim.batch_size_per_worker
        results = {
            "benchmark": "cellfm model quality on one budget",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, python {sys.version.split()[0]}, torch {torch.__version__}",
            "threads": args.threads, "config": str(CONFIG.relative_to(REPO)), "models": {m: MODELS[m] for m in args.models},
            "seeds": args.seeds, "screen_seed": args.screen_seed, "split_seeds": split_seeds(base.eval, base.eval.n_splits),
            "train_layout": TRAIN_LAYOUT.__dict__, "eval_layout": EVAL_LAYOUT.__dict__,
            "budget": (f"{base.optim.epochs * steps_per_epoch} optimizer steps of batch "
                       f"{base.optim.batch_size_per_worker} ({base.optim.epochs} epochs of "
                       f"{len(screens.fields['train'])} cp5 fields of {TRAIN_LAYOUT.field_size} px), 2 global "
                       f"{base.ssl.global_crop_size}-px + {base.ssl.n_local_crops} local {base.ssl.local_crop_size}-px "
                       f"crops, ViT {base.model.size}/{base.model.patch_size}, evaluated on whole fields at "
                       f"{base.eval.image_size} px"),
            "chance": {e.config: float(screens.manifests[e.config].groupby(["plate", "well"])["moa"].first()
                                       .value_counts(normalize=True).max()) for e in EVALUATIONS},
            "intensity_stats": score(IntensityStatistics(), None, screens, base),
            "runs": [], "runtime_s": 0.0,
        }
        output = Path(args.output)
        previous_s = 0.0
        if args.resume and output.exists():
            previous = json.loads(output.read_text())
            if previous["budget"] != results["budget"] or any(previous["models"].get(m, o) != o
                                                               for m, o in results["models"].items()):
                parser.error(f"--resume: {output} was written with another budget or objectives; remove it")
            results["runs"] = [{"threads": previous["threads"], **r} for r in previous["runs"]
                               if r["model"] in args.models and r["seed"] in args.seeds]
            previous_s = previous["runtime_s"]
            log(f"resuming: {len(results['runs'])} runs kept from {output}")
        done = {(r["seed"], r["model"]) for r in results["runs"]}
        planned = [(seed, model) for seed in args.seeds for model in args.models if (seed, model) not in done]
        seconds: dict[str, list[float]] = {}
        for index, (seed, model) in enumerate(planned):
            cfg = model_config(model, seed, screens, extra)
            run_started = time.perf_counter()
            total_steps = cfg.optim.epochs * steps_per_epoch

            last_loss: list[float] = []

            def on_step(epoch: int, step: int, losses, model=model, seed=seed, total_steps=total_steps,
                        last_loss=last_loss) -> None:
                last_loss[:] = [losses.total.item()]
                if (step + 1) % steps_per_epoch == 0:
                    log(f"  {model} seed {seed}: epoch {epoch + 1}/{cfg.optim.epochs}, step {step + 1}/{total_steps}, "
                        f"loss {last_loss[0]:.3f}")

            torch.manual_seed(seed)
            random_init = build_backbone(cfg.model).eval()
            meta_arch = train_in_memory(cfg, screens.fields["train"], screens.channels("train"), on_step=on_step)
            train_s = time.perf_counter() - run_started
            run = {"model": model, "seed": seed, "threads": args.threads, "train_seconds": round(train_s, 1),
                   "final_loss": round(last_loss[0], 4),
                   "trained": score(meta_arch.teacher.backbone.eval(), cfg.model, screens, cfg),
                   "random_init": score(random_init, cfg.model, screens, cfg)}
            run["seconds"] = round(time.perf_counter() - run_started, 1)
            seconds.setdefault(model, []).append(run["seconds"])
            results["runs"].append(run)
            results["runtime_s"] = previous_s + time.perf_counter() - started
            write(results, output)
            # ETA: each remaining run at its model's mean so far (a model not yet run: the mean of all runs).
            overall = float(np.mean([s for v in seconds.values() for s in v]))
            eta = sum(float(np.mean(seconds.get(m, [overall]))) for _, m in planned[index + 1:])
            log(f"run {index + 1}/{len(planned)} {model} seed {seed} in {run['seconds']:.0f} s: "
                + ", ".join(f"{k} {v['top1']:.3f}" for k, v in run["trained"].items() if "top1" in v)
                + f"; ETA {eta / 60:.1f} min")
    log(f"wrote {output} and its .md / .png in {(time.perf_counter() - started) / 60:.1f} min")
    return results


if __name__ == "__main__":
    main()
