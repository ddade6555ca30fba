"""benchmarks/paper_dimensions.py: a sweep's results table -> standard errors, settings, the papers' questions."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.paper_dimensions import (  # noqa: E402
    OBJECTIVE, QUESTIONS, SWEEP_FILE, markdown, summarize, wells_per_set)

SWEPT = ["train.seed", "model.pooling_ratio", "model.channel_pooling", "model.n_pre", "ssl.mcd_keep_counts"]
WELLS = {"cp5": 280, "novel4": 200}


def results_table(tmp_path: Path) -> pd.DataFrame:
    """A results.parquet as the sweep writes it (round-tripped through Parquet: arrays for lists, NaN for a key
    an arm lacks), for a few settings of two seeds, one trial not finished."""
    nan = float("nan")

    def row(trial, arm, seed, cp5, novel4, k=nan, pooling=None, n_pre=nan, keep=None, status="completed", gflops=1.0):
        return {"rank": 0, "trial": trial, "arm": arm, "train.seed": seed, "model.pooling_ratio": k,
                "model.channel_pooling": pooling, "model.n_pre": n_pre, "ssl.mcd_keep_counts": keep,
                "objective": (cp5 + novel4) / 2, "objective/cp5": cp5, "objective/novel4": novel4, "loss": 1.0,
                "images_per_s": 10.0, "gflops_per_image": gflops, "epochs": 8, "status": status}

    rows = [row("a0", "cellrep", 0, 0.50, 0.40, k=1), row("a1", "cellrep", 1, 0.60, 0.40, k=1),
            row("a2", "cellrep", 0, 0.80, 0.42, k=2, gflops=2.0), row("a3", "cellrep", 1, 0.80, 0.38, k=2, gflops=2.0),
            row("a4", "cellrep", 0, 0.10, 0.10, k=4, status="stopped early")]
    for i, (n_pre, keep) in enumerate([(0, [5]), (0, []), (2, [5]), (2, [])]):
        for seed in (0, 1):
            rows.append(row(f"c{i}{seed}", "c3r", seed, 0.5 + 0.1 * (keep == []), 0.4, n_pre=n_pre, keep=keep))
    path = tmp_path / "results.parquet"
    pd.DataFrame(rows).sort_values("objective", ascending=False, kind="stable").to_parquet(path)  # best first
    return pd.read_parquet(path)


def binomial(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def test_trial_and_setting_standard_errors_and_the_questions(tmp_path):
    summary = summarize(results_table(tmp_path), WELLS, SWEPT, n_trials=36)
    assert summary["trials_completed"] == 12 and summary["trials"] == 36
    t0 = next(r for r in summary["per_trial"] if r["trial"] == "a0")
    assert t0["scores"]["cp5"]["top1_se"] == pytest.approx(binomial(0.5, 280))
    assert t0["scores"][OBJECTIVE]["top1_se"] == pytest.approx(math.hypot(binomial(0.5, 280), binomial(0.4, 200)) / 2)
    assert t0["values"] == {"train.seed": 0, "model.pooling_ratio": 1}   # the C3R keys are NaN for CellRep

    settings = {s["setting"]: s for s in summary["settings"]}
    # In trial order (the results table is sorted by the objective; the table below puts k = 2 first).
    assert list(settings) == ["cellrep, pooling_ratio=1", "cellrep, pooling_ratio=2",
                              "c3r, n_pre=0, mcd_keep_counts=[5]", "c3r, n_pre=0, mcd_keep_counts=[]",
                              "c3r, n_pre=2, mcd_keep_counts=[5]", "c3r, n_pre=2, mcd_keep_counts=[]"]
    k1 = settings["cellrep, pooling_ratio=1"]["cp5"]
    # Mean over the seeds; the wells' error plus the seeds' spread: sqrt(mean se² + var(ddof=1) / n).
    assert k1["mean"] == pytest.approx(0.55) and k1["n"] == 2
    assert k1["se"] == pytest.approx(math.sqrt((binomial(0.5, 280) ** 2 + binomial(0.6, 280) ** 2) / 2 + 0.005 / 2))

    questions = {q["question"].split(":")[1].strip().split(" ")[0]: q for q in summary["questions"]}
    k2_vs_k1, k4_vs_k1 = questions["pooling"]["comparisons"]
    assert k2_vs_k1["a"] == "cellrep, pooling_ratio=2" and k2_vs_k1["b"] == "cellrep, pooling_ratio=1"
    assert k2_vs_k1["difference"]["cp5"]["difference"] == pytest.approx(0.25)
    assert k2_vs_k1["difference"]["cp5"]["direction"] == "higher"
    assert k2_vs_k1["difference"]["novel4"]["direction"] == "within noise"
    assert k2_vs_k1["gflops_ratio"] == pytest.approx(2.0)
    assert "difference" not in k4_vs_k1 and k4_vs_k1["cell_a"] is None   # its one trial did not finish
    # C3R's dimensions are read marginally: n_pre = 2 pools both keep-count settings' seeds.
    n_pre_2 = questions["branch"]["comparisons"][0]["cell_a"]
    assert sorted(n_pre_2["trials"]) == ["c20", "c21", "c30", "c31"] and n_pre_2["cp5"]["mean"] == pytest.approx(0.55)
    keep_all = questions["MCD"]["comparisons"][0]
    assert keep_all["a"] == "c3r, mcd_keep_counts=[]" and keep_all["b"] == "c3r, mcd_keep_counts=[5]"
    assert sorted(keep_all["cell_a"]["trials"]) == ["c10", "c11", "c30", "c31"]
    assert keep_all["difference"]["cp5"]["difference"] == pytest.approx(0.1)

    text = markdown(summary, "configs/sweeps/paper_dimensions.yaml")
    assert "12 of 36 trials completed" in text
    assert "| cellrep, pooling_ratio=4 vs cellrep, pooling_ratio=1 | not run |" in text
    assert "| cellrep, pooling_ratio=2 vs cellrep, pooling_ratio=1 | +0.125 ± " in text   # the objective: 0.600 vs 0.475
    assert text.count("The paper: ") == len(QUESTIONS)


def test_wells_per_set_counts_wells_not_fields(tmp_path):
    fields = pd.DataFrame({"plate": ["P1"] * 4 + ["P2"] * 2, "well": ["A01", "A01", "A02", "A02", "A01", "A01"],
                           "field": [0, 1, 0, 1, 0, 1]})
    fields.to_parquet(tmp_path / "heldout.parquet")
    assert wells_per_set({"cp5": str(tmp_path / "heldout.parquet")}) == {"cp5": 3}


def test_the_questions_name_levels_the_sweep_file_runs():
    """Every level a question compares is a setting (or a marginal level) of the sweep file's arms."""
    from cellfm.tune.sweep_config import load_sweep

    plan = load_sweep(str(SWEEP_FILE))
    arms = {arm.name: {d.key: list(d.values) for d in arm.dimensions} for arm in plan.arms}
    for question in QUESTIONS:
        for pair in question.comparisons:
            for level in pair:
                assert level.arm in arms, level
                for key, value in level.values:
                    expected = list(value) if isinstance(value, tuple) else value
                    assert expected in [list(v) if isinstance(v, (list, tuple)) else v for v in arms[level.arm][key]], \
                        (level, key)
    assert plan.grid_size() == 36 and np.isfinite(plan.epochs)


def test_a_summary_without_results_ends_in_one_line_naming_the_command(tmp_path):
    from benchmarks.paper_dimensions import main

    with pytest.raises(SystemExit) as stop:
        main(["--summarize-only", "--storage", str(tmp_path)])
    assert str(stop.value) == (f"{tmp_path / 'paper_dimensions' / 'results.parquet'}: no results yet "
                               "(run `python benchmarks/paper_dimensions.py`)")
