"""The smoke sweep end to end, as a user runs it (`jobs/sweep.py` in its own process, an embedded Ray):
its driver is SIGKILLed midway (a trial completed, one stopped by ASHA, one between two checkpoints), the
same command resumes it without retraining what had finished, the outputs are complete and right, and the
best trial's config is the one it trained with. The smoke sweep with one dimension per arm (4 trials, not 6):
each arm still sweeps the dimension whose cost the results compare, and ASHA still stops a trial."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cellfm.config import load_config
from cellfm.preflight import preflight
from tests.conftest import REPO, group_process_names, wait_until

pytestmark = pytest.mark.integration

SWEEP = REPO / "configs" / "sweeps" / "smoke.yaml"
TRIAL_STATUS = re.compile(r"sweep smoke: (trial-\w+) (completed|stopped early)")


def four_trial_sweep(path: Path) -> Path:
    """The smoke sweep less C3R's second dimension (ssl.mcd_keep_counts): 2 CellRep + 2 C3R trials."""
    spec = yaml.safe_load(SWEEP.read_text())
    spec["base"] = str((SWEEP.parent / spec["base"]).resolve())
    del spec["arms"]["c3r"]["space"]["ssl.mcd_keep_counts"]
    path.write_text(yaml.safe_dump(spec, sort_keys=False))  # the arms in their order: CellRep trials first
    return path


def sweep_command(tiny_screen, sweep: Path, storage: Path) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "sweep.py"), "--config", str(sweep), "--storage", str(storage),
            f"data.train_manifest={tiny_screen['train']}",
            f"eval.manifests={{seen: {tiny_screen['heldout']}, unseen: {tiny_screen['unseen']}}}"]


def ended(log: Path) -> dict[str, str]:
    """trial -> completed | stopped early, as the driver's progress lines said."""
    return dict(TRIAL_STATUS.findall(log.read_text()))


def registered_checkpoints(run: Path) -> list[str]:
    """The checkpoints Ray Train has registered for a run (written whole)."""
    snapshot = run / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        return []
    try:
        return [c["checkpoint_dir_name"] for c in json.loads(snapshot.read_text())["checkpoint_results"]]
    except (ValueError, KeyError):  # being rewritten
        return []


def files_with_times(run: Path) -> dict[str, float]:
    """Every checkpoint file and TensorBoard events file of a run, with its modification time."""
    return {str(p.relative_to(run)): p.stat().st_mtime for p in run.rglob("*")
            if p.is_file() and (p.parts[-2].startswith("checkpoint_") or p.parent.name == "tensorboard")}


def kill_when_midway(process: subprocess.Popen, log: Path, runs: Path, timeout_s: float) -> tuple[dict, str]:
    """SIGKILL the sweep's driver once a trial has completed, one was stopped early, and another has its
    first checkpoint but not its last; then end what is left of its embedded Ray (its process group).
    Returns (what had ended, the trial killed between checkpoints)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the sweep ended before it could be killed midway:\n{log.read_text()[-3000:]}"
        done = ended(log)
        midway = [run.name for run in sorted(runs.glob("trial-*")) if run.name not in done
                  and registered_checkpoints(run) == ["checkpoint_epoch0000"]]
        if "completed" in done.values() and "stopped early" in done.values() and midway:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            # Ray's GCS and raylet follow their driver; its agents are left to end here.
            wait_until(lambda: not {"gcs_server", "raylet"} & set(group_process_names(process.pid)), 60,
                       "the killed sweep's GCS and raylet to exit")
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return done, midway[0]
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    pytest.fail(f"no moment with a completed, a stopped and a half-trained trial within {timeout_s} s:\n"
                f"{log.read_text()[-3000:]}")


def test_smoke_sweep_killed_midway_resumes_and_writes_its_outputs(tiny_screen, tmp_path):
    storage = tmp_path / "sweeps"
    sweep = storage / "smoke"
    runs = sweep / "runs"
    command = sweep_command(tiny_screen, four_trial_sweep(tmp_path / "smoke.yaml"), storage)

    first_log = tmp_path / "first.log"
    with open(first_log, "w") as out:
        first = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    done, midway = kill_when_midway(first, first_log, runs, timeout_s=420)
    finished_files = {trial: files_with_times(runs / trial) for trial in done}
    midway_epoch0 = files_with_times(runs / midway)

    started = time.monotonic()
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=480)
    resumed_s = time.monotonic() - started
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"restoring {sweep}" in second.stdout

    # Nothing that had finished was trained again: the same checkpoints and events files, untouched.
    for trial, files in finished_files.items():
        assert files_with_times(runs / trial) == files, trial
    # The trial killed between checkpoints resumed its Train run at epoch 1: epoch 0 was not redone.
    after = files_with_times(runs / midway)
    assert {k: v for k, v in after.items() if k.startswith("checkpoint_epoch0000")} == \
           {k: v for k, v in midway_epoch0.items() if k.startswith("checkpoint_epoch0000")}
    assert "resumed from epoch 0 step 13" in second.stdout + second.stderr
    assert len(list((runs / midway / "tensorboard").glob("events.*"))) == 2

    # The results: one row per trial, sorted by the objective, each trial completed or stopped by ASHA.
    table = pd.read_parquet(sweep / "results.parquet")
    assert len(table) == 4 and table["trial"].is_unique and list(table["rank"]) == list(range(1, 5))
    assert table["objective"].is_monotonic_decreasing
    assert set(table["status"]) <= {"completed", "stopped early"} and "stopped early" in set(table["status"])
    stopped = table[table["status"] == "stopped early"]
    assert (stopped["epochs"] == 1).all() and (table[table["status"] == "completed"]["epochs"] == 2).all()
    assert all((runs / t / "STOPPED_EARLY.json").is_file() for t in stopped["trial"])
    assert set(table["arm"]) == {"cellrep", "c3r"}
    assert set(table["model.pooling_ratio"].dropna()) == {1, 2} and set(table["model.n_pre"].dropna()) == {0, 2}
    assert (table["gflops_per_image"] > 0).all() and table["loss"].notna().all()
    # C3R with branches costs more than without; CellRep with two pooled slots more than with one.
    gflops = table.set_index("trial")["gflops_per_image"]
    by = {(r["arm"], r["model.pooling_ratio"] if r["arm"] == "cellrep" else r["model.n_pre"]): gflops[r["trial"]]
          for _, r in table.iterrows()}
    assert by[("c3r", 2)] > by[("c3r", 0)] and by[("cellrep", 2)] > by[("cellrep", 1)]
    markdown = (sweep / "results.md").read_text()
    rows = [line for line in markdown.splitlines() if re.match(r"\| \d+ \| trial-", line)]
    assert [row.split(" | ")[1] for row in rows] == list(table["trial"])
    for png in ("objective_vs_dimensions.png", "objective_vs_flops.png"):
        assert (sweep / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The best trial: the best completed one, its checkpoint in best.json, and in best.yaml the config that
    # trial trained with (less the channel metadata training records, and its storage), which the front
    # door accepts as a training run.
    best = json.loads((sweep / "best.json").read_text())
    top_completed = table[table["status"] == "completed"].iloc[0]
    assert best["trial"] == top_completed["trial"] and Path(best["checkpoint"]).is_dir()
    best_cfg = load_config(sweep / "best.yaml")
    if best["arm"] == "c3r":
        assert (best_cfg.model.name, best_cfg.model.n_pre) == ("c3r", top_completed["model.n_pre"])
    else:
        assert (best_cfg.model.name, best_cfg.model.pooling_ratio) == ("cellrep", top_completed["model.pooling_ratio"])
    trained_cfg = load_config(runs / best["trial"] / "config.yaml")
    trained_cfg = dataclasses.replace(
        trained_cfg, model=dataclasses.replace(trained_cfg.model, channel_groups={}, channel_vocabulary=[]),
        train=dataclasses.replace(trained_cfg.train, storage_path=best_cfg.train.storage_path,
                                  run_name=best_cfg.train.run_name))
    assert best_cfg == trained_cfg
    preflight(dataclasses.replace(best_cfg, train=dataclasses.replace(best_cfg.train, storage_path=str(tmp_path / "best"))),
              train=True)
    print(f"resumed sweep took {resumed_s:.0f} s")
