"""Training that engineers can trust: a run stopped hard resumes where it was (same step counter,
same schedules, loss continuing), and a worker killed mid-run is replaced from the last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from cellfm.config import load_config
from cellfm.train.checkpoint import latest_checkpoint
from cellfm.train.trainer import run_directory, run_pretraining
from tests.conftest import REPO, SMOKE_CONFIG, tensorboard_scalars

pytestmark = pytest.mark.integration


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout}s for {what}")
        time.sleep(0.5)


def _has_checkpoint(run_dir: Path) -> bool:
    return any(run_dir.glob("checkpoint_*/trainer_state.json"))


def test_hard_stop_then_relaunch_continues_schedules_exactly(smoke_overrides, tmp_path):
    """Kill the whole driver after the first epoch's checkpoint; relaunching the same run name
    finishes the run with every scheduled value identical to an uninterrupted run."""
    common = smoke_overrides + ["optim.epochs=3", "ssl.warmup_teacher_temp_epochs=2", "optim.warmup_epochs=1"]
    cmd = [sys.executable, str(REPO / "jobs" / "pretrain.py"), "--config", str(SMOKE_CONFIG)]

    reference = subprocess.run(cmd + common + ["train.run_name=reference"], cwd=REPO, capture_output=True,
                               text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]

    cfg = load_config(SMOKE_CONFIG, common + ["train.run_name=stopped"])
    run_dir = run_directory(cfg)
    proc = subprocess.Popen(cmd + common + ["train.run_name=stopped"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(lambda: _has_checkpoint(run_dir), 300, "the first checkpoint")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # driver, embedded Ray and its workers: a hard stop
        proc.wait()
    stopped_at = json.loads((latest_checkpoint(run_dir) / "trainer_state.json").read_text())
    assert stopped_at["epoch"] < 2  # really interrupted before the end

    resumed = subprocess.run(cmd + common + ["train.run_name=stopped"], cwd=REPO, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from epoch {stopped_at['epoch']} step {stopped_at['step']}" in resumed.stdout + resumed.stderr
    final = json.loads((latest_checkpoint(run_dir) / "trainer_state.json").read_text())
    ref_dir = run_directory(load_config(SMOKE_CONFIG, common + ["train.run_name=reference"]))
    ref_final = json.loads((latest_checkpoint(ref_dir) / "trainer_state.json").read_text())
    assert final == ref_final  # same last epoch and same global step count

    for tag in ("schedule/lr", "schedule/teacher_temp", "schedule/weight_decay", "schedule/ema_momentum"):
        ref, got = tensorboard_scalars(ref_dir, tag), tensorboard_scalars(run_dir, tag)
        assert sorted(got) == sorted(ref) == list(range(ref_final["step"])), tag
        for step in ref:
            assert got[step] == pytest.approx(ref[step], rel=1e-6), (tag, step)
    # The loss continues the run: every step after the restart is logged once, and the resumed
    # epochs' losses are in the range of the uninterrupted run's same epochs (not a fresh start).
    loss, ref_loss = tensorboard_scalars(run_dir, "train/loss"), tensorboard_scalars(ref_dir, "train/loss")
    resumed_steps = range(stopped_at["step"], ref_final["step"])
    mean_resumed = sum(loss[s] for s in resumed_steps) / len(resumed_steps)
    mean_reference = sum(ref_loss[s] for s in resumed_steps) / len(resumed_steps)
    assert mean_resumed == pytest.approx(mean_reference, rel=0.35)


def _train_workers() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if "RayTrainWorker" in cmdline and "IDLE" not in cmdline:
            found.append(proc)
    return found


def test_killed_worker_is_replaced_and_training_completes(ray_session, smoke_overrides):
    cfg = load_config(SMOKE_CONFIG, smoke_overrides + ["train.run_name=killed", "optim.epochs=3",
                                                       "train.max_failures=1"])
    run_dir = run_directory(cfg)
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = run_pretraining(cfg)
        except BaseException as exc:  # surfaced by the assertion below
            outcome["error"] = exc

    thread = threading.Thread(target=fit)
    thread.start()
    _wait_for(lambda: _has_checkpoint(run_dir) or not thread.is_alive(), 300, "the first checkpoint")
    workers = _train_workers()
    assert workers, "no Ray Train worker process found to kill"
    workers[-1].send_signal(signal.SIGKILL)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.metrics["epoch"] == 2
    state = json.loads((latest_checkpoint(run_dir) / "trainer_state.json").read_text())
    assert state["epoch"] == 2
