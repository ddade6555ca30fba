"""Sweep files without Ray: loading, the preflight (every bad input one line naming the key, exit code 2,
before Ray starts), the search space Tune and Optuna get, the results table and outputs, and the
held-out objective on hand-made wells."""

from __future__ import annotations

import dataclasses
import functools
import json
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellfm.cli import main
from cellfm.config import CREDENTIAL_MARKER, load_config
from cellfm.tune.preflight import ClusterCapacity, check_sweep, sweep_problems
from cellfm.tune.sweep_config import load_sweep
from tests.conftest import REPO

SMOKE_SWEEP = REPO / "configs" / "sweeps" / "smoke.yaml"
PAPER_SWEEP = REPO / "configs" / "sweeps" / "paper_dimensions.yaml"
FOUR_CPUS = ClusterCapacity(cpus=4, gpus=0, described="the test cluster")


@pytest.fixture
def screen_overrides(tiny_screen, tmp_path) -> list[str]:
    return [f"data.train_manifest={tiny_screen['train']}",
            f"eval.manifests={{seen: {tiny_screen['heldout']}, unseen: {tiny_screen['unseen']}}}"]


def write_sweep(tmp_path: Path, text: str, base: str = "configs/smoke.yaml") -> Path:
    """A sweep file from YAML text with `base` filled in (relative to the repository)."""
    path = tmp_path / "sweep.yaml"
    path.write_text(textwrap.dedent(text).replace("BASE", str(REPO / base)))
    return path


def problems_of(path: Path, overrides: list[str], tmp_path: Path, capacity=FOUR_CPUS) -> list[str]:
    plan = load_sweep(str(path), overrides=overrides, storage=str(tmp_path / "sweeps"))
    return sweep_problems(plan, capacity)[0]


# ------------------------------------------------------------------------------------- the shipped sweeps


def test_smoke_sweep_passes_preflight_and_covers_the_three_dimensions(screen_overrides, tmp_path):
    plan = load_sweep(str(SMOKE_SWEEP), overrides=screen_overrides, storage=str(tmp_path))
    resources = check_sweep(plan, FOUR_CPUS)
    assert {"model.pooling_ratio", "model.n_pre", "ssl.mcd_keep_counts"} <= set(plan.swept_keys())
    assert plan.grid_size() == 6 and plan.spec.asha.enabled
    # 1 worker x 1 CPU + the driver's 0.01 per trial, one whole CPU left to Ray Data: 2 trials on 4 CPUs.
    assert (resources.cpus, resources.data_cpus, resources.concurrent) == (1.01, 1.0, 2)


def benchmark_screen_overrides(tmp_path: Path, family_screen) -> list[str]:
    """The tiny family screens as stand-ins for the benchmark's (cp5 training plates; cp5 and novel4 held-out sets
    of two plates each: the tiny screen's training and held-out plates, as the leave-one-plate-out objective needs
    two or more)."""
    from cellfm.data.manifest import read_manifest, write_manifest

    cp5, novel4 = family_screen("cp5"), family_screen("novel4", seed=1)
    two_plates = {name: write_manifest(pd.concat([read_manifest(screen["train"]), read_manifest(screen["heldout"])],
                                                 ignore_index=True), tmp_path / f"{name}.parquet")
                  for name, screen in (("cp5", cp5), ("novel4", novel4))}
    return [f"data.train_manifest={cp5['train']}",
            f"eval.manifests={{cp5: {two_plates['cp5']}, novel4: {two_plates['novel4']}}}"]


def test_paper_sweep_runs_every_setting_with_two_seeds_and_passes_preflight(tmp_path, family_screen):
    cp5, novel4 = family_screen("cp5"), family_screen("novel4", seed=1)
    one_plate = [f"data.train_manifest={cp5['train']}",
                 f"eval.manifests={{cp5: {cp5['heldout']}, novel4: {novel4['heldout']}}}"]
    plan = load_sweep(str(PAPER_SWEEP), overrides=one_plate, storage=str(tmp_path / "sweeps"))
    # Its leave-one-plate-out objective refuses the tiny screens' one held-out plate per configuration ...
    assert [p.split(": ", 1)[1].split(" needs")[0] for p in sweep_problems(plan, FOUR_CPUS)[0]] == [
        "objective.protocol=lopo_probe"] * 2
    # ... and takes two.
    plan = load_sweep(str(PAPER_SWEEP), overrides=benchmark_screen_overrides(tmp_path, family_screen),
                      storage=str(tmp_path / "sweeps"))
    check_sweep(plan, FOUR_CPUS)
    assert plan.spec.objective.protocol == "lopo_probe" and plan.base.model.img_size == 32  # the benchmark's budget
    assert plan.spec.objective.evaluate == "last_epoch"  # no ASHA: the objective once per trial
    from cellfm.tune.search import param_space

    points = param_space(plan)["grid"]["grid_search"]
    settings = [plan.values_of({"grid": p}) for p in points]
    assert len(points) == plan.grid_size() == 2 * (3 + 2 + 1 + 3 * 4)
    models = [(arm, plan.trial_config(arm, v, "t").model, v["train.seed"]) for arm, v in settings]
    cellrep = {(arm, m.pooling_ratio, m.channel_mixer, m.channel_pooling, s) for arm, m, s in models if arm != "c3r"}
    c3r = {(v["model.n_pre"], tuple(v["ssl.mcd_keep_counts"]), v["train.seed"]) for arm, v in settings if arm == "c3r"}
    assert cellrep == ({("cellrep", k, "full", "mean", s) for k in (1, 2, 4) for s in (0, 1)}
                       | {("cellrep_axial", 1, "axial", p, s) for p in ("mean", "attention") for s in (0, 1)}
                       | {("cellrep_attention_pool", 1, "full", "attention", s) for s in (0, 1)})
    assert c3r == {(n, keep, s) for n in (0, 2, 4) for keep in ((5,), (), (1,), (2,)) for s in (0, 1)}
    assert not plan.spec.asha.enabled  # every setting trains its whole budget: the comparison is the point


@pytest.mark.parametrize("model", ["cellrep", "c3r"])
def test_recipe_sweeps_search_around_the_benchmark_recipe_and_pass_preflight(model, tmp_path, family_screen):
    import optuna

    from cellfm.config import student_channel_sampling, validate
    from cellfm.tune.search import OptunaSpace

    plan = load_sweep(str(REPO / "configs" / "sweeps" / f"recipe_{model}.yaml"),
                      overrides=benchmark_screen_overrides(tmp_path, family_screen), storage=str(tmp_path / "sweeps"))
    check_sweep(plan, FOUR_CPUS)
    base = plan.base
    assert (base.model.name, base.model.img_size, plan.epochs) == (model, 32, 8)  # the benchmark's budget
    assert plan.spec.search.algorithm == "optuna" and plan.spec.objective.protocol == "lopo_probe"
    assert (plan.spec.asha.grace_period, plan.spec.asha.reduction_factor) == (2, 3)  # rungs at epochs 2 and 6
    # The base recipe is one point of the space, so the search can find it again.
    (arm,) = plan.arms
    for dim in arm.dimensions:
        here = functools.reduce(getattr, dim.key.split("."), base)
        if dim.key == "ssl.channel_sampling":
            here = student_channel_sampling(base)  # "auto": none for CellRep
        if dim.kind == "loguniform":
            assert dim.values[0] <= here <= dim.values[1], dim.key
        else:
            assert here in [list(v) if isinstance(v, (list, tuple)) else v for v in dim.values], dim.key
    # Every proposal is a valid training config of that model.
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0), direction="maximize")
    space = OptunaSpace(plan)
    for _ in range(12):
        trial = study.ask()
        space(trial)
        cfg = plan.trial_config(*plan.values_of(dict(trial.params)), run_name="t")
        validate(cfg)
        assert cfg.model.name == model
        study.tell(trial, cfg.optim.base_lr)


# ------------------------------------------------------------------------------------- bad sweep files


BAD_SWEEPS = [
    ("unknown key in the space",
     "space: {model.pooling_ration: {grid: [1, 2]}}",
     "space.model.pooling_ration: unknown config key 'model.pooling_ration'; valid keys under model:"),
    ("empty choice",
     "space: {model.pooling_ratio: {choice: []}}",
     "space.model.pooling_ratio: choice is empty; give at least one value"),
    ("more CPUs per trial than the cluster",
     "resources: {num_workers: 8, cpus_per_worker: 1}",
     "resources: a trial needs 9.01 CPUs (resources.num_workers=8 x resources.cpus_per_worker=1 + 0.01 for its "
     "driver + 1 left to Ray Data) but the embedded Ray (ray.num_cpus=4, 0 local GPU(s)) has 4"),
    ("GPUs the cluster does not have",
     "resources: {num_workers: 2, gpus_per_worker: 1}",
     "resources: a trial needs 2 GPUs (resources.num_workers=2 x resources.gpus_per_worker=1) but the embedded "
     "Ray (ray.num_cpus=4, 0 local GPU(s)) has 0"),
    ("more trials at once than fit",
     "search: {max_concurrent_trials: 3}\nresources: {num_workers: 1, cpus_per_worker: 1}",
     "search.max_concurrent_trials=3: trials at once take 1.01 CPUs each and must leave 1 CPU to Ray Data"),
    ("a dimension of another model",
     "space: {model.n_pre: {grid: [0, 2]}}",
     "space.model.n_pre: model.n_pre does not apply to trials with model.name=cellrep, ssl.objective=dino, "
     "ssl.mcd=false; it needs model.name=c3r"),
    ("a key that cannot vary",
     "space: {optim.epochs: {grid: [1, 2]}}",
     "space.optim.epochs: optim.epochs cannot vary between trials: ASHA divides one epoch budget"),
    ("a value of the wrong type",
     "space: {model.pooling_ratio: {grid: [1, 1.5]}}",
     "model.pooling_ratio must be int, got 1.5 (float)"),
    ("a range on an integer key",
     "space: {model.pooling_ratio: {uniform: [1, 4]}}",
     "space.model.pooling_ratio: uniform draws floats but model.pooling_ratio is int; use grid, choice or randint"),
    ("a grid under Optuna",
     "search: {algorithm: optuna}\nspace: {model.pooling_ratio: {grid: [1, 2]}}",
     "space.model.pooling_ratio: search.algorithm=optuna proposes every value itself and cannot enumerate a grid"),
    ("a typo in the sweep file itself",
     "serach: {algorithm: random}",
     "unknown config key(s) serach; valid keys under top level:"),
    ("an objective set that does not exist",
     "objective: {manifests: [seen, unsen]}",
     "objective.manifests names ['unsen'], which are not in eval.manifests ['seen', 'unseen']"),
    ("an unknown probe protocol",
     "objective: {protocol: lopo}",
     "objective.protocol='lopo' is not one of ['probe', 'per_plate_probe', 'lopo_probe']"),
    ("an unknown time for the objective",
     "objective: {evaluate: end}",
     "objective.evaluate='end' is not one of ['every_epoch', 'last_epoch']"),
    ("the objective at the last epoch only under ASHA",
     "objective: {evaluate: last_epoch}",
     "objective.evaluate=last_epoch needs asha.enabled=false: ASHA compares trials by the objective at its rungs"),
    ("leave one plate out on a one-plate held-out set",
     "objective: {protocol: lopo_probe, manifests: [seen]}",
     "objective.protocol=lopo_probe needs two or more plates (a standard error over plates, or plates to leave out), "
     "but eval.manifests.seen="),
]


@pytest.mark.parametrize("text,expected", [case[1:] for case in BAD_SWEEPS], ids=[case[0] for case in BAD_SWEEPS])
def test_bad_sweep_file_fails_before_ray_with_one_line_naming_the_key(text, expected, screen_overrides, tmp_path,
                                                                       monkeypatch, capsys):
    import ray

    import cellfm.tune.driver

    def started(*_, **__):
        raise AssertionError("the sweep started despite a bad sweep file")

    monkeypatch.setattr(cellfm.tune.driver, "run_sweep", started)
    path = write_sweep(tmp_path, f"base: BASE\n{text}\n")
    code = main(["sweep", "--config", str(path), "--storage", str(tmp_path / "sweeps"), *screen_overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"error: {path}") and expected in err[0], err
    assert not ray.is_initialized()


def test_every_problem_is_reported_at_once(screen_overrides, tmp_path):
    path = write_sweep(tmp_path, """
        base: BASE
        asha: {grace_period: 0}
        objective: {mode: maximum, metric: accuracy}
        resources: {num_workers: 8}
        arms:
          c3r:
            overrides: {model.name: c3r}
            space: {model.n_pre: {grid: [2, 10]}}
    """)
    problems = problems_of(path, screen_overrides, tmp_path)
    text = "\n".join(problems)
    assert len(problems) == 5, text
    for part in ("asha.grace_period=0", "objective.mode='maximum'", "objective.metric='accuracy'",
                 "resources: a trial needs 9.01 CPUs",
                 # only the n_pre=10 trial config has it: the line names that trial
                 "(arm c3r: model.n_pre=10): model.n_pre=10 leaves no joint block at model.size=tiny"):
        assert part in text


def test_dimension_applies_only_where_its_model_is(screen_overrides, tmp_path):
    """pooling_ratio in the shared space of a CellRep and a C3R arm: wrong for the C3R trials only."""
    path = write_sweep(tmp_path, """
        base: BASE
        space: {model.pooling_ratio: {grid: [1, 2]}}
        arms:
          cellrep: {}
          c3r: {overrides: {model.name: c3r}}
    """)
    problems = problems_of(path, screen_overrides, tmp_path)
    assert problems == [f"{path} + overrides (arm c3r: model.pooling_ratio=1): space.model.pooling_ratio: "
                        f"model.pooling_ratio does not apply to trials with model.name=c3r, ssl.objective=dino, "
                        f"ssl.mcd=false; it needs model.name=cellrep (a CellRep setting) [and 1 more trial config(s)]"]


def test_mcd_keep_counts_need_mcd_and_ibot(screen_overrides, tmp_path):
    path = write_sweep(tmp_path, """
        base: BASE
        arms:
          c3r:
            overrides: {model.name: c3r, ssl.objective: ibot}
            space: {ssl.mcd_keep_counts: {grid: [[1], [2]]}}
    """)
    (problem,) = problems_of(path, screen_overrides, tmp_path)
    assert "it needs ssl.mcd=true with ssl.objective=ibot" in problem


def test_a_sweep_of_cell_crops_is_refused(screen_overrides, tmp_path):
    """The in-trial objective embeds whole held-out fields: trials trained on cell crops would be scored on
    something else, so the sweep stops before Ray with the key named."""
    locations = tmp_path / "cells.parquet"
    pd.DataFrame({"plate": ["P"], "well": ["A01"], "field": [0], "y": [5.0], "x": [5.0]}).to_parquet(locations)
    path = write_sweep(tmp_path, f"""
        base: BASE
        arms:
          cellrep: {{overrides: {{data.crop_mode: cells, data.cell_locations: {locations}}}}}
    """)
    problems = problems_of(path, screen_overrides, tmp_path)
    assert any("data.crop_mode=cells: a sweep's objective scores whole fields" in p for p in problems), problems
    assert not any("crop_mode" in p for p in problems_of(write_sweep(tmp_path, """
        base: BASE
        arms:
          cellrep: {}
    """), screen_overrides, tmp_path))


def test_a_changed_sweep_is_refused_in_the_old_sweeps_folder(screen_overrides, tmp_path):
    from cellfm.tune.driver import record_sweep

    first = load_sweep(str(SMOKE_SWEEP), overrides=screen_overrides, storage=str(tmp_path))
    record_sweep(first)
    assert sweep_problems(first, FOUR_CPUS)[0] == []
    changed = load_sweep(str(SMOKE_SWEEP), overrides=[*screen_overrides, "optim.base_lr=0.01"], storage=str(tmp_path))
    (problem,) = sweep_problems(changed, FOUR_CPUS)[0]
    assert "holds another sweep of this name (it differs in base.optim.base_lr)" in problem
    # More trials at once is not another sweep.
    assert sweep_problems(dataclasses.replace(
        first, spec=dataclasses.replace(first.spec, search=dataclasses.replace(first.spec.search,
                                                                              max_concurrent_trials=1))),
        FOUR_CPUS)[0] == []


def test_cluster_size_comes_from_the_sweep_file_when_given(screen_overrides, tmp_path):
    from cellfm.tune.preflight import cluster_capacity

    path = write_sweep(tmp_path, """
        base: BASE
        cluster: {cpus: 64, gpus: 8}
        resources: {num_workers: 2, cpus_per_worker: 8, gpus_per_worker: 1}
    """)
    plan = load_sweep(str(path), overrides=screen_overrides, storage=str(tmp_path))
    capacity = cluster_capacity(plan)
    assert (capacity.cpus, capacity.gpus) == (64, 8)
    resources = check_sweep(plan, capacity)
    assert plan.base.train.use_gpu and plan.base.train.gpus_per_worker == 1
    # (64 - 1 for Ray Data) // 16.01 = 3 by CPUs, 8 // 2 = 4 by GPUs; 1 trial in the whole (empty) space.
    assert resources.concurrent == 1 and resources.gpus == 2


# ------------------------------------------------------------------------------------- search space


ARMS = """
    base: BASE
    space: {optim.base_lr: {loguniform: [1.0e-4, 1.0e-2]}, train.seed: {grid: [0, 1]}}
    arms:
      cellrep:
        space: {model.pooling_ratio: {choice: [1, 2, 4]}}
      c3r:
        overrides: {model.name: c3r, ssl.objective: ibot, ssl.mcd: true}
        space: {model.n_pre: {grid: [0, 2]}, ssl.mcd_keep_counts: {choice: [[5], [], [1]]}}
"""
# ARMS as Optuna can search it: every dimension drawn (Optuna proposes values; it enumerates no grid).
OPTUNA_ARMS = ARMS.replace("train.seed: {grid: [0, 1]}", "train.seed: {choice: [0, 1]}").replace(
    "{grid: [0, 2]}", "{randint: [0, 5]}")


def test_random_search_enumerates_the_grid_per_arm_and_draws_the_rest(screen_overrides, tmp_path):
    from ray import tune

    from cellfm.tune.search import param_space

    plan = load_sweep(str(write_sweep(tmp_path, ARMS)), overrides=screen_overrides, num_samples=3)
    space = param_space(plan)
    points = space["grid"]["grid_search"]
    assert points == [{"arm": "cellrep", "train.seed": 0}, {"arm": "cellrep", "train.seed": 1},
                      *({"arm": "c3r", "train.seed": s, "c3r/model.n_pre": n} for s in (0, 1) for n in (0, 2))]
    assert plan.grid_size() == 3 * 6
    assert isinstance(space["optim.base_lr"], tune.search.sample.Float)
    assert space["cellrep/model.pooling_ratio"].categories == [1, 2, 4]
    assert space["c3r/ssl.mcd_keep_counts"].categories == [[5], [], [1]]
    # A resolved trial config: the arm's keys only, each at its config key.
    arm, values = plan.values_of({"grid": points[3], "optim.base_lr": 0.001, "cellrep/model.pooling_ratio": 4,
                                  "c3r/ssl.mcd_keep_counts": [1]})
    assert (arm, values) == ("c3r", {"optim.base_lr": 0.001, "train.seed": 0, "model.n_pre": 2,
                                     "ssl.mcd_keep_counts": [1]})
    cfg = plan.trial_config(arm, values, run_name="trial-x")
    assert (cfg.model.name, cfg.model.n_pre, cfg.ssl.mcd_keep_counts, cfg.optim.base_lr) == ("c3r", 2, [1], 0.001)
    assert cfg.train.run_name == "trial-x" and cfg.train.storage_path == plan.runs_dir


def test_grid_search_enumerates_choices_too(screen_overrides, tmp_path):
    from cellfm.tune.search import param_space

    text = ARMS.replace("optim.base_lr: {loguniform: [1.0e-4, 1.0e-2]}, ", "")
    plan = load_sweep(str(write_sweep(tmp_path, text + "    search: {algorithm: grid}\n")), overrides=screen_overrides)
    assert len(param_space(plan)["grid"]["grid_search"]) == plan.grid_size() == 2 * 3 + 2 * 2 * 3


def test_optuna_suggests_the_arm_then_only_its_dimensions(screen_overrides, tmp_path):
    import optuna

    from cellfm.tune.search import OptunaSpace

    plan = load_sweep(str(write_sweep(tmp_path, OPTUNA_ARMS + "    search: {algorithm: optuna, num_samples: 30}\n")),
                      overrides=screen_overrides)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0), direction="maximize")
    define = OptunaSpace(plan)
    seen = set()
    for _ in range(30):
        trial = study.ask()
        define(trial)
        arm, values = plan.values_of(dict(trial.params))
        seen.add(arm)
        expected = {"optim.base_lr", "train.seed"} | ({"model.pooling_ratio"} if arm == "cellrep" else
                                                     {"model.n_pre", "ssl.mcd_keep_counts"})
        assert set(values) == expected
        assert 1e-4 <= values["optim.base_lr"] <= 1e-2
        if arm == "c3r":
            # Lists are suggested by index and read back as the listed value; randint excludes its high end.
            assert values["ssl.mcd_keep_counts"] in ([5], [], [1]) and 0 <= values["model.n_pre"] <= 4
        study.tell(trial, float(values["train.seed"]))
    assert seen == {"cellrep", "c3r"}



def test_optuna_searcher_survives_tunes_experiment_checkpoint(screen_overrides, tmp_path):
    # Tune pickles the searcher, its define-by-run space included, into every experiment checkpoint; a space
    # that cannot be pickled stopped the first Optuna sweep a minute in. The restored searcher goes on proposing.
    from cellfm.tune.search import search_algorithm

    plan = load_sweep(str(write_sweep(tmp_path, OPTUNA_ARMS + "    search: {algorithm: optuna, num_samples: 4}\n")),
                      overrides=screen_overrides)
    searcher = search_algorithm(plan, concurrent=2)
    first = searcher.suggest("trial-1")
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = search_algorithm(plan, concurrent=2)
    restored.restore(str(tmp_path / "searcher.pkl"))
    arm, values = plan.values_of(restored.suggest("trial-2"))
    assert plan.values_of(first)[0] in ("cellrep", "c3r") and arm in ("cellrep", "c3r")
    assert 1e-4 <= values["optim.base_lr"] <= 1e-2 and values["train.seed"] in (0, 1)


# ------------------------------------------------------------------------------------- results


def smoke_plan(screen_overrides, tmp_path, extra: list[str] = ()):
    return load_sweep(str(SMOKE_SWEEP), overrides=[*screen_overrides, *extra], storage=str(tmp_path / "sweeps"))


def records(plan):
    from cellfm.tune.results import TrialRecord

    def rec(trial, point, metrics, error=None):
        return TrialRecord(trial, {"grid": point}, metrics, error)

    done = {"epochs_done": 2, "loss": 5.0, "images_per_s": 10.0, "forward_flops_per_image": 2e8}
    return [
        rec("trial-a", {"arm": "cellrep", "cellrep/model.pooling_ratio": 1}, {**done, "objective": 0.30,
            "objective/seen": 0.4, "objective/unseen": 0.2, "checkpoint_path": "/x/a"}),
        # Highest objective, but ASHA stopped it after epoch 1: not the best trial.
        rec("trial-b", {"arm": "cellrep", "cellrep/model.pooling_ratio": 2}, {**done, "epochs_done": 1,
            "objective": 0.50, "checkpoint_path": "/x/b"}),
        rec("trial-c", {"arm": "c3r", "c3r/model.n_pre": 2, "c3r/ssl.mcd_keep_counts": [1]},
            {**done, "objective": 0.40, "forward_flops_per_image": 1e8, "checkpoint_path": "/x/c"}),
        rec("trial-d", {"arm": "c3r", "c3r/model.n_pre": 0, "c3r/ssl.mcd_keep_counts": []}, {},
            error="Traceback ...\nFloatingPointError: loss is nan at epoch 0 step 3"),
    ]


def test_results_table_is_sorted_with_status_and_best_is_the_best_completed(screen_overrides, tmp_path):
    from cellfm.tune.results import best_row, results_table

    plan = smoke_plan(screen_overrides, tmp_path)
    table = results_table(plan, records(plan))
    assert list(table["trial"]) == ["trial-b", "trial-c", "trial-a", "trial-d"]
    assert list(table["rank"]) == [1, 2, 3, 4]
    assert list(table["status"]) == ["stopped early", "completed", "completed", "error"]
    assert table.loc[1, "gflops_per_image"] == pytest.approx(0.1)
    assert table.loc[1, "ssl.mcd_keep_counts"] == [1] and pd.isna(table.loc[1, "model.pooling_ratio"])
    assert table.loc[3, "error"] == "FloatingPointError: loss is nan at epoch 0 step 3"
    assert best_row(table, "objective")["trial"] == "trial-c"


def test_outputs_best_config_is_ready_to_run_with_credentials_redacted(screen_overrides, tmp_path):
    from cellfm.tune.results import results_table, tidy_stopped_runs, write_outputs

    secret = "sweep-secret-value-123"
    plan = smoke_plan(screen_overrides, tmp_path, [f"data.storage_options={{key: AKIDTEST, secret: {secret}}}"])
    for trial in ("trial-a", "trial-b"):
        (Path(plan.runs_dir) / trial / "checkpoint_epoch0000").mkdir(parents=True)
    table = tidy_stopped_runs(plan, results_table(plan, records(plan)))
    outputs = write_outputs(plan, table, records(plan))
    sweep = Path(plan.sweep_dir)
    assert set(outputs) == {"results.parquet", "results.md", "best.yaml", "best.json",
                            "objective_vs_dimensions.png", "objective_vs_flops.png"}
    assert (Path(plan.runs_dir) / "trial-b" / "STOPPED_EARLY.json").is_file()
    assert not (Path(plan.runs_dir) / "trial-a" / "STOPPED_EARLY.json").exists()
    assert list(pd.read_parquet(sweep / "results.parquet")["trial"]) == ["trial-b", "trial-c", "trial-a", "trial-d"]
    markdown = (sweep / "results.md").read_text()
    assert markdown.index("| 1 | trial-b") < markdown.index("| 2 | trial-c") < markdown.index("| 4 | trial-d")
    assert "**Best:** `trial-c` (arm c3r: model.n_pre=2, ssl.mcd_keep_counts=[1]), objective 0.4" in markdown
    text = (sweep / "best.yaml").read_text()
    assert secret not in text and CREDENTIAL_MARKER in text
    best = load_config(sweep / "best.yaml")
    assert (best.model.name, best.model.n_pre, best.ssl.mcd_keep_counts, best.ssl.mcd) == ("c3r", 2, [1], True)
    assert best.train.run_name == "smoke-best" and best.train.storage_path == plan.base.train.storage_path
    assert best.optim.epochs == 2 and best.train.num_workers == 1
    assert json.loads((sweep / "best.json").read_text())["checkpoint"] == "/x/c"
    for png in ("objective_vs_dimensions.png", "objective_vs_flops.png"):
        assert (sweep / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_drawn_floats_are_plotted_on_a_numeric_axis_and_listed_values_one_tick_each(screen_overrides, tmp_path):
    import matplotlib.pyplot as plt

    from cellfm.tune.results import TrialRecord, dimensions_figure, results_table

    plan = load_sweep(str(write_sweep(tmp_path, OPTUNA_ARMS + "    search: {algorithm: optuna}\n")),
                      overrides=screen_overrides, storage=str(tmp_path / "sweeps"))
    done = {"epochs_done": 2, "loss": 1.0, "images_per_s": 1.0, "forward_flops_per_image": 1e8}
    lrs = [2e-4, 3e-3, 8e-3]
    mine = [TrialRecord(f"trial-{i}", {"arm": "cellrep", "optim.base_lr": lr, "train.seed": 0,
                                       "cellrep": {"model.pooling_ratio": k}}, {**done, "objective": 0.1 * i}, None)
            for i, (lr, k) in enumerate(zip(lrs, (1, 4, 2)))]
    fig = dimensions_figure(plan, results_table(plan, mine))
    panels = {ax.get_xlabel(): ax for ax in fig.axes}
    lr_panel, k_panel = panels["optim.base_lr"], panels["model.pooling_ratio"]
    assert lr_panel.get_xscale() == "log"   # loguniform
    assert sorted(x for c in lr_panel.collections for x, _ in c.get_offsets()) == pytest.approx(lrs)
    assert [t.get_text() for t in k_panel.get_xticklabels()] == ["1", "2", "4"]   # one tick per listed value
    plt.close(fig)


def test_outputs_of_a_sweep_with_one_named_arm(screen_overrides, tmp_path):
    # One arm: the table has no arm column, and the plots colour that arm's trials as its own.
    from cellfm.tune.results import results_table, write_outputs

    path = write_sweep(tmp_path, """
        name: one_arm
        base: BASE
        objective: {protocol: lopo_probe}
        arms:
          cellrep:
            space: {model.pooling_ratio: {grid: [1, 2]}}
        """)
    plan = load_sweep(str(path), overrides=screen_overrides, storage=str(tmp_path / "sweeps"))
    assert [a.name for a in plan.arms] == ["cellrep"]
    mine = [r for r in records(plan) if r.config["grid"]["arm"] == "cellrep"]
    table = results_table(plan, mine)
    assert "arm" not in table and list(table["trial"]) == ["trial-b", "trial-a"]
    outputs = write_outputs(plan, table, mine)
    for png in ("objective_vs_dimensions.png", "objective_vs_flops.png"):
        assert Path(outputs[png]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "top1 of `moa` (leave one plate out, every well tested once)" in Path(outputs["results.md"]).read_text()


def test_remove_deletes_stopped_runs(screen_overrides, tmp_path):
    from cellfm.tune.results import results_table, tidy_stopped_runs

    plan = smoke_plan(screen_overrides, tmp_path)
    plan.spec.asha.stopped_runs = "remove"
    for trial in ("trial-a", "trial-b"):
        (Path(plan.runs_dir) / trial / "checkpoint_epoch0000").mkdir(parents=True)
    table = tidy_stopped_runs(plan, results_table(plan, records(plan)))
    assert not (Path(plan.runs_dir) / "trial-b").exists() and (Path(plan.runs_dir) / "trial-a").exists()
    assert table.set_index("trial").loc["trial-b", "checkpoint"] == ""


# ------------------------------------------------------------------------------------- the objective


def held_out_set(name: str, informative: bool, seed: int):
    """12 wells of 3 classes (4 each), 2 fields per well, 3 channels of 16 x 16. Informative: a class sets the
    fields' brightness; otherwise the labels are shuffled against the images."""
    from cellfm.tune.objective import HeldOutFields

    rng = np.random.default_rng(seed)
    classes = np.repeat(["a", "b", "c"], 4)
    brightness = np.repeat([0.2, 0.5, 0.8], 4)
    labels = classes if informative else rng.permutation(classes)
    wells = [f"A{i:02d}" for i in range(12)]
    images = np.stack([np.clip(b + 0.02 * rng.standard_normal((3, 16, 16)), 0, 1)
                       for b in brightness for _ in range(2)]).astype(np.float16)
    fields = pd.DataFrame({"plate": "P", "well": np.repeat(wells, 2), "field": np.tile([0, 1], 12),
                           "perturbation_id": np.repeat(labels, 2), "moa": np.repeat(labels, 2),
                           "is_control": False})
    return HeldOutFields(name, images, [["DNA", "ER", "Mito"]] * 24, np.ones((24, 3), bool), fields)


def test_held_out_objective_scores_the_wells_and_counts_forward_flops():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cellfm.models.registry import build_backbone
    from cellfm.tune.objective import HeldOutObjective

    cfg = load_config(None, ["model.size=tiny", "model.img_size=16", "model.patch_size=8",
                             "eval.well_normalization=none", "eval.n_splits=3", "eval.batch_size=5"])
    torch.manual_seed(0)
    backbone = build_backbone(cfg.model).train()
    sets = {"easy": held_out_set("easy", True, 0), "shuffled": held_out_set("shuffled", False, 1)}
    metrics = HeldOutObjective(sets, cfg, label="moa", score="top1")(backbone, epoch=0)
    # Brightness separates the classes even through a random-init encoder; shuffled labels cannot be learned.
    assert metrics["objective/easy"] == 1.0
    assert metrics["objective/shuffled"] < 0.7
    assert metrics["objective"] == pytest.approx((metrics["objective/easy"] + metrics["objective/shuffled"]) / 2)
    assert backbone.training  # the trial's mode is restored
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        backbone(torch.rand(1, 3, 16, 16), channel_names=[["DNA", "ER", "Mito"]])
    assert metrics["forward_flops_per_image"] == counter.get_total_flops() > 0


def test_objective_at_the_last_epoch_only_skips_and_is_not_forwarded_before_it():
    import queue

    import torch

    from cellfm.models.registry import build_backbone
    from cellfm.tune.objective import HeldOutObjective
    from cellfm.tune.search import LAUNCH_EPOCHS_ATTR, TIME_ATTR
    from cellfm.tune.trial import SweepReportCallback

    cfg = load_config(None, ["model.size=tiny", "model.img_size=16", "model.patch_size=8", "optim.epochs=3",
                             "eval.well_normalization=none", "eval.n_splits=3", "eval.batch_size=5"])
    torch.manual_seed(0)
    backbone = build_backbone(cfg.model).eval()
    sets = {"easy": held_out_set("easy", True, 0)}
    last = HeldOutObjective(sets, cfg, label="moa", score="top1", evaluate="last_epoch")
    every = HeldOutObjective(sets, cfg, label="moa", score="top1")
    assert [last(backbone, epoch) for epoch in (0, 1)] == [{}, {}]
    assert last(backbone, 2)["objective"] == every(backbone, 0)["objective"] == every(backbone, 1)["objective"] == 1.0
    # The callback (Ray's, less its Tune-session constructor) forwards the reports that hold the objective.
    for objective, forwarded in ((last, [2]), (every, [0, 1, 2])):
        callback = SweepReportCallback.__new__(SweepReportCallback)
        callback.objective, callback._training_actor_item_queue = objective, queue.Queue()
        callback.epochs_this_launch = 0
        for epoch in range(3):
            callback.after_report(None, [{"epoch": epoch, "loss": 1.0}], None)
        sent = [callback._training_actor_item_queue.get_nowait() for _ in range(callback._training_actor_item_queue.qsize())]
        assert [m["epoch"] for m in sent] == forwarded and [m[TIME_ATTR] for m in sent] == [e + 1 for e in forwarded]
        # Every epoch trained counts towards the sweep's ETA, forwarded or not.
        assert [m[LAUNCH_EPOCHS_ATTR] for m in sent] == [e + 1 for e in forwarded]


def test_held_out_objective_can_leave_one_plate_out():
    import torch

    from cellfm.evaluate.plate_probes import lopo_probe_scores
    from cellfm.evaluate.wells import well_profiles
    from cellfm.models.registry import build_backbone
    from cellfm.tune.objective import HeldOutFields, HeldOutObjective

    cfg = load_config(None, ["model.size=tiny", "model.img_size=16", "model.patch_size=8",
                             "eval.well_normalization=none", "eval.batch_size=5"])
    torch.manual_seed(0)
    backbone = build_backbone(cfg.model).eval()
    a, b = held_out_set("a", True, 0), held_out_set("b", False, 1)
    two_plates = HeldOutFields("two", np.concatenate([a.images, b.images]), a.channel_names + b.channel_names,
                               np.concatenate([a.channel_mask, b.channel_mask]),
                               pd.concat([a.fields, b.fields.assign(plate="Q")], ignore_index=True))
    objective = HeldOutObjective({"two": two_plates}, cfg, label="moa", score="top1", protocol="lopo_probe")
    metrics = objective(backbone, epoch=0)
    profiles = well_profiles(two_plates.fields, objective._embed(backbone, two_plates), "none", ["moa"])
    expected = lopo_probe_scores(profiles.features, profiles.meta["moa"].to_numpy(), profiles.meta["plate"].to_numpy())
    assert metrics["objective"] == metrics["objective/two"] == expected["top1"]
    assert expected["n_test_wells"] == 24


def test_sweep_help_lists_its_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for flag in ("--config", "--name", "--storage", "--address", "--max-concurrent-trials", "--num-samples",
                 "section.key=value", "configs/sweeps/smoke.yaml"):
        assert flag in out


def test_sweep_file_keys_are_all_documented():
    """docs/sweeps.md names every key of the sweep file (`section.key` for the sections)."""
    from cellfm.tune.sweep_config import SweepConfig

    docs = (REPO / "docs" / "sweeps.md").read_text()
    keys = []
    for f in dataclasses.fields(SweepConfig):
        section = f.default_factory() if callable(f.default_factory) else None
        if dataclasses.is_dataclass(section):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(section)]
        else:
            keys.append(f.name)
    assert len(keys) > 20 and [key for key in keys if f"`{key}`" not in docs] == []


def test_a_restored_sweeps_progress_counts_the_trials_stopped_in_an_earlier_session(screen_overrides, tmp_path):
    """After `Tuner.restore`, the progress callback is new: the trials ASHA stopped before the restart are
    counted from their last results, not from what this session saw end."""
    from types import SimpleNamespace

    from cellfm.tune.driver import SweepProgress, stopped_early_count
    from cellfm.tune.search import TIME_ATTR

    plan = load_sweep(str(SMOKE_SWEEP), overrides=screen_overrides, storage=str(tmp_path))
    epochs = plan.epochs

    def trial(status: str, trained: int | None) -> SimpleNamespace:
        return SimpleNamespace(status=status, trial_id=f"t{trained}{status}",
                               last_result=None if trained is None else {TIME_ATTR: trained})

    trials = [trial("TERMINATED", 1), trial("TERMINATED", epochs - 1), trial("TERMINATED", epochs), trial("ERROR", 1),
              trial("RUNNING", 1), trial("PENDING", None)]
    assert stopped_early_count(trials, epochs) == 2
    line = SweepProgress(plan)._status(trials)  # a fresh callback, as after a restore
    assert "4/" in line and "(2 stopped early)" in line, line


def test_sweep_eta_counts_every_epoch_a_last_epoch_report_stands_for(screen_overrides, tmp_path):
    """With objective.evaluate=last_epoch a trial reports once, after its whole budget: the ETA counts all of
    those epochs (it once counted one, and promised 10 h for a 90-minute sweep); a trial a resumed sweep only
    re-reports (no epochs trained now) counts none."""
    import time
    from types import SimpleNamespace

    from cellfm.progress import format_duration
    from cellfm.tune.driver import SweepProgress
    from cellfm.tune.search import LAUNCH_EPOCHS_ATTR, TIME_ATTR

    plan = load_sweep(str(SMOKE_SWEEP), overrides=screen_overrides, storage=str(tmp_path))
    epochs, total = plan.epochs, plan.grid_size()
    assert total > 3
    progress = SweepProgress(plan)
    trials = [SimpleNamespace(status="PENDING", trial_id=f"t{i}", last_result=None, config={}) for i in range(total)]
    progress._describe = lambda trial: ""
    for trial, launched in ((trials[0], epochs), (trials[1], epochs), (trials[2], None)):
        trial.status, trial.last_result = "TERMINATED", {TIME_ATTR: epochs}
        report = trial.last_result if launched is None else {**trial.last_result, LAUNCH_EPOCHS_ATTR: launched}
        progress.on_trial_result(0, trials, trial, report)
    assert progress.epochs_this_session == 2 * epochs
    progress.started = time.monotonic() - 100.0   # 2 budgets in 100 s; total - 3 budgets left
    line = progress._status(trials)
    assert f"ETA {format_duration((total - 3) * 50.0)}" in line, line
