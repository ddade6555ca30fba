"""The papers' open questions, answered by the paper-dimensions sweep (configs/sweeps/paper_dimensions.yaml) with
the model-quality instrument, beside what each paper reports.

    python benchmarks/paper_dimensions.py                   # synthesize the two screens if missing, run (or resume)
                                                            # the sweep, then summarize it (88 min quiet)
    python benchmarks/paper_dimensions.py --summarize-only  # summarize the sweep folder as it is (a partial run too)

The sweep: CellRep's pooling ratio k {1, 2, 4}; at k = 1 the channel mixer {full, axial} x the channel pooling
{mean, attention}; C3R's branch depth n_pre {0, 2, 4} x MCD keep-counts {all 5}, {1..5}, {1}, {2}; 2 seeds each
(train.seed), every trial trained for the benchmark's whole budget (configs/model_quality.yaml) on the calibrated
screen's cp5 training plates and scored once, after its last epoch, by the leave-one-plate-out probe of MoA on the
5 held-out cp5 plates and the 5 novel4 plates (two stains training never saw): `objective/cp5`, `objective/novel4`,
and `objective` their mean.

Standard errors: a trial's score on a set has the binomial standard error over that set's wells (every well is
tested once: `cellfm.evaluate.plate_probes.binomial_standard_error`, n = the wells of the held-out manifest); the
objective's is sqrt(sum of the sets' se²) / n_sets. A setting's cell is the mean over its seeds with
`benchmarks.model_quality.over_seeds` (the wells' error plus the seeds' spread). A dimension of C3R is also read
marginally, over every trial at that level (the other dimension's spread counted as noise: cautious). Each question
compares two cells with `cellfm.evaluate.metrics.compare_scores`: a direction only beyond two standard errors.

Writes benchmarks/results/paper_dimensions.{json,md} and copies the sweep's two plots beside them
(paper_dimensions_vs_dimensions.png, paper_dimensions_vs_flops.png).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.model_quality import cell_text, over_seeds  # noqa: E402
from cellfm.evaluate.metrics import compare_scores  # noqa: E402
from cellfm.evaluate.plate_probes import binomial_standard_error  # noqa: E402
from cellfm.features.aggregate import WELL_KEYS  # noqa: E402
from cellfm.storage import write_file  # noqa: E402
from cellfm.tune.results import COMPLETED  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SWEEP_FILE = REPO / "configs" / "sweeps" / "paper_dimensions.yaml"
SEED_KEY = "train.seed"
STORAGE_HELP = "folder holding the sweeps (default: the sweep file's storage, demo_output/sweeps)"
OBJECTIVE = "objective"


@dataclass(frozen=True)
class Level:
    """The trials of one arm whose swept values include `values` (a setting, or a marginal level)."""

    arm: str
    values: tuple[tuple[str, object], ...] = ()

    def label(self) -> str:
        return self.arm + "".join(f", {key.split('.')[-1]}={_text(value)}" for key, value in self.values)


@dataclass(frozen=True)
class Question:
    """One of the papers' questions: its comparisons (a vs b) and what the paper reports."""

    name: str
    paper: str
    comparisons: tuple[tuple[Level, Level], ...]


def _level(arm: str, **values) -> Level:
    # Keyword names stand for the config keys of this sweep's dimensions.
    keys = {"k": "model.pooling_ratio", "pooling": "model.channel_pooling", "n_pre": "model.n_pre",
            "keep": "ssl.mcd_keep_counts"}
    return Level(arm, tuple((keys[name], tuple(value) if isinstance(value, list) else value)
                            for name, value in values.items()))


K1 = _level("cellrep", k=1)
QUESTIONS = (
    Question(
        "CellRep: pooling ratio k (k pooled channel slots, k x the trunk's tokens)",
        "CellRep (Phillips & Donovan-Maiye, CVPR 2025 Workshops) asks how the pooling ratio trades performance "
        "against computation and uses mean pooling (k = 1); we found no public copy of its numbers to set beside ours.",
        ((_level("cellrep", k=2), K1), (_level("cellrep", k=4), K1))),
    Question(
        "CellRep: channel mixer (axial: attention across the channels at each patch position)",
        "Not a paper dimension: the cheaper mixer of this project (1.26x a ViT-S/16's FLOPs at 5 channels, 224 px, "
        "instead of 2.07x; docs/models.md).",
        ((_level("cellrep_axial", pooling="mean"), K1),)),
    Question(
        "CellRep: channel pooling (attention: content-chosen slots that keep which stain showed what)",
        "Not a paper dimension: this project's pooling that keeps stain identity (docs/models.md); the paper pools "
        "by the mean.",
        ((Level("cellrep_attention_pool"), K1),
         (_level("cellrep_axial", pooling="attention"), _level("cellrep_axial", pooling="mean")))),
    Question(
        "C3R: branch depth n_pre (joint depth 4 - ceil(n_pre / 2) at size tiny)",
        "C3R uses n_pre = 2 (2 branch + 11 joint blocks at ViT-S/B; the official code's default); a reviewer of its "
        "ICLR 2026 submission reads its depth figure as best at 2. In its component ablation (CVPR 2026, Table 5, "
        "ViT-B, as a published paper note reports it) adding the branch encoders raises JUMP-Ret mAP .344 -> .358 "
        "and HPA-Loc mAP .529 -> .531.",
        ((_level("c3r", n_pre=2), _level("c3r", n_pre=0)), (_level("c3r", n_pre=4), _level("c3r", n_pre=0)),
         (_level("c3r", n_pre=4), _level("c3r", n_pre=2)))),
    Question(
        "C3R: MCD keep-counts (context channels the student keeps; [5] = all, no MCD; [] = k ~ U{1..5})",
        "C3R: MCD with k ~ U{1..C1} against none: CHAMMI CPS 0.338 -> 0.543 (ViT-S), HPA-Loc .531 -> .548, "
        "JUMP-Ret .358 -> .363 (CVPR 2026, Table 6b, as a published paper note reports it); the official code keeps "
        "k in {1, 2, 3} of 3 context channels. We found no public table of a fixed k against U{1..C1}.",
        tuple((_level("c3r", keep=keep), _level("c3r", keep=[5])) for keep in ([], [1], [2]))),
)


def _text(value) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    return str(value)


def plain_value(value):
    """A results.parquet cell as a plain, hashable value: tuples for lists (Parquet gives arrays), ints for whole
    floats (a key only some arms have is a float column), None for NaN."""
    if isinstance(value, (np.ndarray, list, tuple)):
        return tuple(plain_value(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value))
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else (int(value) if float(value).is_integer() else float(value))
    if isinstance(value, np.integer):
        return int(value)
    return value


def wells_per_set(manifests: dict[str, str]) -> dict[str, int]:
    """Held-out set -> its wells (each tested once by the leave-one-plate-out probe)."""
    return {name: len(pd.read_parquet(path, columns=WELL_KEYS).drop_duplicates()) for name, path in manifests.items()}


def trial_rows(table: pd.DataFrame, wells: dict[str, int], swept_keys: Sequence[str]) -> list[dict]:
    """The completed trials of a sweep's results table, each with its scores and their standard errors:
    {"trial", "arm", "values" (swept key -> value, the seed included), "gflops", "images_per_s",
    "scores": {set or "objective": {"top1", "top1_se"}}}."""
    rows = []
    for _, r in table[table["status"] == COMPLETED].iterrows():
        scores = {name: {"top1": float(r[f"objective/{name}"]),
                         "top1_se": binomial_standard_error(float(r[f"objective/{name}"]), n)}
                  for name, n in wells.items()}
        scores[OBJECTIVE] = {"top1": float(r[OBJECTIVE]),
                             "top1_se": math.sqrt(sum(s["top1_se"] ** 2 for s in scores.values())) / len(wells)}
        values = {key: plain_value(r[key]) for key in swept_keys if key in r and plain_value(r[key]) is not None}
        rows.append({"trial": r["trial"], "arm": r.get("arm", ""), "values": values, "scores": scores,
                     "gflops": float(r["gflops_per_image"]), "images_per_s": float(r["images_per_s"])})
    return rows


def select(rows: list[dict], level: Level) -> list[dict]:
    return [r for r in rows if r["arm"] == level.arm and all(r["values"].get(k) == v for k, v in level.values)]


def cell(rows: list[dict], level: Level, sets: Sequence[str]) -> dict | None:
    """`over_seeds` of the level's trials per set (and the objective), with their mean cost; None if none ran."""
    chosen = select(rows, level)
    if not chosen:
        return None
    out = {name: over_seeds([r["scores"][name] for r in chosen]) for name in (OBJECTIVE, *sets)}
    out["gflops"] = float(np.mean([r["gflops"] for r in chosen]))
    out["images_per_s"] = float(np.mean([r["images_per_s"] for r in chosen]))
    out["trials"] = [r["trial"] for r in chosen]
    return out


def settings(rows: list[dict]) -> list[Level]:
    """Every setting the trials ran (arm + swept values less the seed), in the order Tune generated them (trial
    ids count up through the grid: the sweep file's arms and values)."""
    return list(dict.fromkeys(Level(r["arm"], tuple((k, v) for k, v in r["values"].items() if k != SEED_KEY))
                              for r in sorted(rows, key=lambda r: r["trial"])))


def answer(rows: list[dict], sets: Sequence[str]) -> list[dict]:
    """Each question's comparisons: both cells and compare_scores of a vs b per set and on the objective."""
    out = []
    for question in QUESTIONS:
        comparisons = []
        for a, b in question.comparisons:
            ca, cb = cell(rows, a, sets), cell(rows, b, sets)
            entry = {"a": a.label(), "b": b.label(), "cell_a": ca, "cell_b": cb}
            if ca is not None and cb is not None:
                entry["difference"] = {name: compare_scores(ca[name]["mean"], ca[name]["se"], cb[name]["mean"],
                                                            cb[name]["se"]) for name in (OBJECTIVE, *sets)}
                entry["gflops_ratio"] = ca["gflops"] / cb["gflops"]
            comparisons.append(entry)
        out.append({"question": question.name, "paper": question.paper, "comparisons": comparisons})
    return out


def summarize(table: pd.DataFrame, wells: dict[str, int], swept_keys: Sequence[str], n_trials: int) -> dict:
    rows = trial_rows(table, wells, swept_keys)
    sets = list(wells)
    return {
        "trials_completed": len(rows), "trials": n_trials, "sets": sets, "wells": wells,
        "per_trial": rows,
        "settings": [{"setting": level.label(), **cell(rows, level, sets)} for level in settings(rows)],
        "questions": answer(rows, sets),
    }


def table_header(columns: Sequence[str]) -> list[str]:
    """A markdown table's header and rule lines."""
    return ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]


def difference_text(d: dict) -> str:
    return f"{d['difference']:+.3f} ± {d['standard_error']:.3f} ({d['direction']})"


def markdown(summary: dict, sweep_file: str) -> str:
    sets = summary["sets"]
    lines = [
        "# The papers' dimensions on the calibrated screen",
        "",
        f"`python benchmarks/paper_dimensions.py` ({sweep_file}): {summary['trials_completed']} of "
        f"{summary['trials']} trials completed. MoA top-1 of the leave-one-plate-out probe on held-out wells "
        f"({', '.join(f'{name}: {n}' for name, n in summary['wells'].items())}); mean over seeds ± standard error "
        "(the wells' binomial error plus the seeds' spread); `objective` is the mean of the sets. A direction is "
        "stated only beyond two standard errors.",
        "",
        "## Every setting",
        "",
        *table_header(["setting", "objective", *sets, "GFLOPs / image", "images/s", "seeds"]),
    ]
    for s in summary["settings"]:
        lines.append(f"| {s['setting']} | {cell_text(s[OBJECTIVE])} | "
                     + " | ".join(cell_text(s[name]) for name in sets)
                     + f" | {s['gflops']:.3f} | {s['images_per_s']:.1f} | {s[OBJECTIVE]['n']} |")
    lines += ["", "## The questions, beside the papers", ""]
    for q in summary["questions"]:
        lines += [f"### {q['question']}", "", f"The paper: {q['paper']}", "",
                  *table_header(["a vs b", "objective", *sets, "GFLOPs a / b"])]
        for c in q["comparisons"]:
            if "difference" not in c:
                lines.append(f"| {c['a']} vs {c['b']} | not run | " + " | ".join("-" for _ in sets) + " | - |")
                continue
            d = c["difference"]
            lines.append(f"| {c['a']} vs {c['b']} | {difference_text(d[OBJECTIVE])} | "
                         + " | ".join(difference_text(d[name]) for name in sets) + f" | {c['gflops_ratio']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def ensure_screens(plan) -> None:
    """Synthesize the held-out and training screens a sweep of the calibrated screen names, if missing."""
    from cellfm.cli import main as cellfm

    # Each manifest lies in its screen's folder, named after its family (the sweep files' headers).
    for manifest in [*plan.objective_manifests().values(), plan.base.data.train_manifest]:
        screen = Path(manifest).parent
        if not Path(manifest).exists():
            if cellfm(["synth", str(screen), "--family", screen.name, "--layout", "benchmark", "--difficulty",
                       "clear", "--seed", "0"]) != 0:
                raise SystemExit(f"cellfm synth {screen} failed")


def run_sweep(sweep_file: Path, storage: str | None = None) -> None:
    """Run or resume a sweep (`cellfm sweep --config`), under `storage` instead of the file's if given."""
    from cellfm.cli import main as cellfm

    if cellfm(["sweep", "--config", str(sweep_file), *(["--storage", storage] if storage else [])]) != 0:
        raise SystemExit(f"cellfm sweep --config {sweep_file} failed (rerun this command to resume it)")


def write_results(output: Path, results: dict, text: str, sweep_dir: Path) -> None:
    """The summary as `output` (JSON) and its .md, with the sweep's two plots copied beside them."""
    write_file(str(output), json.dumps(results, indent=2).encode())
    write_file(str(output.with_suffix(".md")), text.encode())
    for plot in ("dimensions", "flops"):
        shutil.copyfile(sweep_dir / f"objective_vs_{plot}.png", output.with_name(f"{output.stem}_vs_{plot}.png"))


def main(argv: list[str] | None = None) -> dict:
    from cellfm.tune.sweep_config import load_sweep

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--summarize-only", action="store_true",
                        help="summarize the sweep folder as it is; run nothing")
    parser.add_argument("--output", default=str(RESULTS / "paper_dimensions.json"))
    parser.add_argument("--storage", help=STORAGE_HELP)
    args = parser.parse_args(argv)
    plan = load_sweep(str(SWEEP_FILE), storage=args.storage)
    if not args.summarize_only:
        ensure_screens(plan)
        run_sweep(SWEEP_FILE, args.storage)
    sweep_dir = Path(plan.sweep_dir)
    table_path = sweep_dir / "results.parquet"
    if not table_path.exists():
        raise SystemExit(f"{table_path}: no results yet (run `python benchmarks/paper_dimensions.py`)")
    summary = summarize(pd.read_parquet(table_path), wells_per_set(plan.objective_manifests()), plan.swept_keys(),
                        plan.grid_size())
    sweep_file = str(SWEEP_FILE.relative_to(REPO))
    results = {"benchmark": "the papers' dimensions (CellRep pooling; C3R n_pre x MCD) on the calibrated screen",
               "format": 1, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "sweep_file": sweep_file, **summary}
    output = Path(args.output)
    write_results(output, results, markdown(summary, sweep_file), sweep_dir)
    print(f"[paper_dimensions] {summary['trials_completed']}/{summary['trials']} trials -> {output}, "
          f"{output.with_suffix('.md')}")
    return results


if __name__ == "__main__":
    main()
