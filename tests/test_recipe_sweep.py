"""benchmarks/recipe_sweep.py: the confirmation sweep it writes, and the winner on fresh seeds against the base
recipe's trials of the committed paper sweep."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.recipe_sweep import (  # noqa: E402
    CONFIRM_SEEDS, OBJECTIVE, PAPER_SWEEP_RESULTS, SWEEPS, confirm_sweep, markdown, summarize)

WELLS = {"cp5": 280, "novel4": 280}
SWEPT = ["optim.base_lr", "ssl.teacher_temp", "ssl.global_crop_scale", "ssl.local_crop_scale",
         "ssl.channel_sampling", "ssl.kl_uniform_weight"]
WINNER = {"optim.base_lr": 0.008, "ssl.teacher_temp": 0.07, "ssl.global_crop_scale": [0.5, 1.0],
          "ssl.local_crop_scale": [0.15, 0.5], "ssl.channel_sampling": "hcs", "ssl.kl_uniform_weight": 0.0}


def parquet(rows: list[dict], path: Path) -> pd.DataFrame:
    pd.DataFrame(rows).to_parquet(path)
    return pd.read_parquet(path)


def trial(trial_id: str, cp5: float, novel4: float, epochs=8, status="completed", **values) -> dict:
    return {"rank": 0, "trial": trial_id, **values, "objective": (cp5 + novel4) / 2, "objective/cp5": cp5,
            "objective/novel4": novel4, "loss": 1.0, "images_per_s": 30.0, "gflops_per_image": 0.1,
            "epochs": epochs, "status": status}


def test_the_winner_is_retrained_on_fresh_seeds_with_the_search_files_settings(tmp_path):
    from cellfm.tune.sweep_config import load_sweep

    path = confirm_sweep(SWEEPS / "recipe_cellrep.yaml", {**WINNER, "train.seed": 0}, tmp_path)
    plan = load_sweep(str(path))
    search = load_sweep(str(SWEEPS / "recipe_cellrep.yaml"))
    assert plan.spec.name == "recipe_cellrep_confirm" and plan.sweep_dir != search.sweep_dir
    assert not plan.spec.asha.enabled and plan.spec.objective.evaluate == "last_epoch"
    assert plan.spec.objective.protocol == "lopo_probe" and plan.objective_manifests() == search.objective_manifests()
    assert plan.grid_size() == len(CONFIRM_SEEDS) and 0 not in CONFIRM_SEEDS  # seed 0 is the search's
    cfg = plan.trial_config(*plan.values_of({"grid": {"train.seed": CONFIRM_SEEDS[0]}}), run_name="t")
    assert (cfg.optim.base_lr, cfg.ssl.teacher_temp, cfg.ssl.global_crop_scale, cfg.ssl.local_crop_scale,
            cfg.ssl.channel_sampling, cfg.ssl.kl_uniform_weight) == tuple(WINNER.values())
    assert (cfg.train.seed, cfg.model.name, cfg.model.img_size, cfg.optim.epochs) == (CONFIRM_SEEDS[0], "cellrep", 32, 8)


def test_winner_against_the_base_recipe_with_standard_errors(tmp_path):
    search = parquet([{**trial("s1", 0.70, 0.55), **WINNER, "rank": 1},
                      {**trial("s2", 0.40, 0.30, epochs=2, status="stopped early"), **WINNER, "rank": 2,
                       "optim.base_lr": 0.03}], tmp_path / "search.parquet")
    confirm = parquet([trial("c1", 0.70, 0.50, **{"train.seed": 1}), trial("c2", 0.60, 0.50, **{"train.seed": 2})],
                      tmp_path / "confirm.parquet")
    best = {"trial": "s1", "values": WINNER, "objective": 0.625}
    summary = summarize("cellrep", search, best, confirm, WELLS, SWEPT)

    # The base recipe: CellRep k = 1 of the committed paper sweep, both seeds.
    base = [r for r in json.loads(PAPER_SWEEP_RESULTS.read_text())["per_trial"]
            if r["arm"] == "cellrep" and r["values"]["model.pooling_ratio"] == 1]
    assert len(base) == 2 and sorted(summary["baseline"]["trials"]) == sorted(r["trial"] for r in base)
    base_cp5 = [r["scores"]["cp5"]["top1"] for r in base]
    assert summary["baseline"]["cp5"]["mean"] == pytest.approx(sum(base_cp5) / 2)

    won = summary["confirmed"]["cp5"]
    binomial = [math.sqrt(p * (1 - p) / 280) for p in (0.7, 0.6)]
    assert won["mean"] == pytest.approx(0.65) and won["n"] == 2
    assert won["se"] == pytest.approx(math.sqrt(sum(b * b for b in binomial) / 2 + 0.005 / 2))
    difference = summary["difference"]["cp5"]
    assert difference["difference"] == pytest.approx(0.65 - sum(base_cp5) / 2)
    assert difference["standard_error"] == pytest.approx(math.hypot(won["se"], summary["baseline"]["cp5"]["se"]))

    assert [r["trial"] for r in summary["search"]] == ["s1", "s2"]
    assert summary["search"][1]["values"]["ssl.global_crop_scale"] == (0.5, 1.0)  # Parquet's arrays, read back
    assert summary["search"][1]["epochs"] == 2 and summary["search"][1]["status"] == "stopped early"

    text = markdown("cellrep", summary, "configs/sweeps/recipe_cellrep.yaml")
    assert "| winner: base_lr=0.008, teacher_temp=0.07, global_crop_scale=[0.5, 1], " in text
    assert f"| winner − base | | {summary['difference']['objective']['difference']:+.3f}" in text
    assert "| 2 | base_lr=0.03, " in text and "| 2 | stopped early | 0.350 | 0.400 | 0.300 | 30.0 |" in text


def test_before_the_confirmation_runs_the_summary_says_so(tmp_path):
    search = parquet([{**trial("s1", 0.70, 0.55), **WINNER, "rank": 1}], tmp_path / "search.parquet")
    summary = summarize("c3r", search, {"trial": "s1", "values": WINNER, "objective": 0.625}, None, WELLS, SWEPT)
    assert "confirmed" not in summary and "difference" not in summary
    assert summary["baseline"]["setting"] == "paper sweep: c3r, n_pre=2, mcd_keep_counts=[]"
    assert summary["baseline"][OBJECTIVE]["n"] == 2
    assert "| winner | not confirmed yet |" in markdown("c3r", summary, "configs/sweeps/recipe_c3r.yaml")



def test_a_summary_before_the_search_has_finished_ends_in_one_line_naming_the_command(tmp_path):
    from benchmarks.recipe_sweep import main

    with pytest.raises(SystemExit) as stop:
        main(["--model", "c3r", "--summarize-only", "--storage", str(tmp_path)])
    assert str(stop.value) == (f"{tmp_path / 'recipe_c3r'}: no finished search yet "
                               "(run `python benchmarks/recipe_sweep.py --model c3r`)")


def test_the_confirmation_sweep_follows_the_storage_it_is_given(tmp_path):
    from cellfm.tune.sweep_config import load_sweep

    path = confirm_sweep(SWEEPS / "recipe_c3r.yaml", {"optim.base_lr": 0.01}, tmp_path, str(tmp_path / "sweeps"))
    assert load_sweep(str(path)).sweep_dir == str(tmp_path / "sweeps" / "recipe_c3r_confirm")
