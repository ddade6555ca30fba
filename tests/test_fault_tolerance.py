"""Training that engineers can trust, on 2 CPU workers: the same config, seed and worker count give
bit-identical checkpoints and loss curves (another seed does not); a run stopped hard after its first epoch
and relaunched ends bit-identical to the uninterrupted run; a worker killed mid-run is replaced, the run
resumes from its last checkpoint and still ends bit-identical.

Every run here has the same config (3 epochs of configs/smoke.yaml on the tiny screen) and is compared with
one uninterrupted reference run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cellfm.config import load_config
from cellfm.train.checkpoint import latest_checkpoint
from cellfm.storage import run_directory
from cellfm.train.trainer import run_pretraining
from tests.conftest import REPO, SMOKE_CONFIG, tensorboard_scalars, wait_until

pytestmark = pytest.mark.integration

EPOCHS = 3
RUN = [f"optim.epochs={EPOCHS}", "ssl.warmup_teacher_temp_epochs=2", "optim.warmup_epochs=1",
       f"train.num_to_keep={EPOCHS}"]


@pytest.fixture(scope="module")
def overrides(tiny_screen, tmp_path_factory) -> list[str]:
    runs = tmp_path_factory.mktemp("fault-tolerance") / "runs"
    return [f"data.train_manifest={tiny_screen['train']}",
            f"eval.manifests={{seen: {tiny_screen['heldout']}, unseen: {tiny_screen['unseen']}}}",
            f"train.storage_path={runs}", *RUN]


def _train(overrides: list[str], *extra: str) -> Path:
    cfg = load_config(SMOKE_CONFIG, overrides + list(extra))
    run_pretraining(cfg)
    return run_directory(cfg)


@pytest.fixture(scope="module")
def reference(ray_session, overrides) -> Path:
    """The uninterrupted run every other run is compared with."""
    return _train(overrides, "train.run_name=reference")


def checkpoint_hashes(run_dir: Path) -> dict[str, str]:
    """checkpoint folder/file -> SHA-256 over the tensors (names and bytes, sorted by name) of every
    safetensors file of every checkpoint of a run."""
    hashes = {}
    for path in sorted(run_dir.glob("checkpoint_*/**/*.safetensors")):
        digest = hashlib.sha256()
        tensors = load_file(path)
        for name in sorted(tensors):
            digest.update(name.encode())
            digest.update(tensors[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        hashes[str(path.relative_to(run_dir))] = digest.hexdigest()
    return hashes


def _losses(run_dir: Path) -> dict[int, float]:
    return tensorboard_scalars(run_dir, "train/loss")


def test_same_seed_gives_bit_identical_checkpoints_and_loss_curves_another_seed_does_not(reference, overrides):
    again = _train(overrides, "train.run_name=again")
    other_seed = _train(overrides, "train.run_name=other-seed", "train.seed=1")
    ref = checkpoint_hashes(reference)
    # student, teacher, backbone and centers of each of the 3 epochs' checkpoints
    assert len(ref) == 4 * EPOCHS and {Path(k).parent.name for k in ref} == {
        f"checkpoint_epoch{e:04d}" for e in range(EPOCHS)}
    assert checkpoint_hashes(again) == ref
    ref_losses = _losses(reference)
    assert sorted(ref_losses) == list(range(len(ref_losses))) and len(ref_losses) >= 3 * EPOCHS
    assert _losses(again) == ref_losses  # every step's loss, exactly
    different = checkpoint_hashes(other_seed)
    assert set(different) == set(ref)
    assert all(different[k] != ref[k] for k in ref)
    assert _losses(other_seed) != ref_losses


def _checkpoint_registered(run_dir: Path, name: str) -> bool:
    """Ray Train has recorded checkpoint `name` in the run's snapshot (what a relaunch resumes from)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return name in snapshot.read_text()
    except FileNotFoundError:
        return False


def test_hard_stop_after_epoch_1_then_relaunch_ends_bit_identical(reference, overrides):
    """Kill the whole job (driver, its embedded Ray and workers) once epoch 1's checkpoint is recorded;
    relaunching the same run name resumes there and ends with every checkpoint and every step's loss
    bit-identical to the uninterrupted run."""
    cmd = [sys.executable, str(REPO / "jobs" / "pretrain.py"), "--config", str(SMOKE_CONFIG), *overrides,
           "train.run_name=stopped"]
    run_dir = run_directory(load_config(SMOKE_CONFIG, overrides + ["train.run_name=stopped"]))
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_until(lambda: _checkpoint_registered(run_dir, "checkpoint_epoch0000") or proc.poll() is not None, 300,
                  "the first checkpoint")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a hard stop
        proc.wait()
    stopped_at = json.loads((latest_checkpoint(run_dir) / "trainer_state.json").read_text())
    assert stopped_at["epoch"] < EPOCHS - 1  # really interrupted before the end

    resumed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from epoch {stopped_at['epoch']} step {stopped_at['step']}" in resumed.stdout + resumed.stderr
    assert checkpoint_hashes(run_dir) == checkpoint_hashes(reference)
    assert _losses(run_dir) == _losses(reference)


def _our_train_workers() -> dict[int, psutil.Process]:
    """Ray Train worker processes of this test process's own Ray (its descendants only: other Rays on the
    machine are left alone)."""
    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "RayTrainWorker" in cmdline and "IDLE" not in cmdline:
            found[proc.pid] = proc
    return found


def test_killed_worker_is_replaced_and_the_run_resumes_from_its_checkpoint_bit_identical(reference, overrides):
    cfg = load_config(SMOKE_CONFIG, overrides + ["train.run_name=killed", "train.max_failures=1"])
    run_dir = run_directory(cfg)
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = run_pretraining(cfg)
        except BaseException as exc:  # surfaced by the assertion below
            outcome["error"] = exc

    thread = threading.Thread(target=fit)
    thread.start()
    wait_until(lambda: _checkpoint_registered(run_dir, "checkpoint_epoch0000") or not thread.is_alive(), 300,
              "the first checkpoint")
    workers = _our_train_workers()
    assert len(workers) == 2, f"expected this run's 2 Ray Train workers, found {sorted(workers)}"
    killed = max(workers)
    workers[killed].send_signal(signal.SIGKILL)
    # Ray Train restarts the worker group: new worker processes appear.
    wait_until(lambda: set(_our_train_workers()) - set(workers) or not thread.is_alive(), 120, "replacement workers")
    replaced = set(_our_train_workers()) - set(workers)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    assert replaced, "no new Ray Train worker process replaced the killed one"
    assert outcome["result"].metrics["epoch"] == EPOCHS - 1

    # The restarted rank 0 wrote a new events file starting right after a checkpoint, not at step 0.
    files = sorted((run_dir / "tensorboard").glob("events.*"), key=lambda p: p.stat().st_mtime)
    assert len(files) == 2, files
    after_restart = EventAccumulator(str(files[1]))
    after_restart.Reload()
    first_step = min(e.step for e in after_restart.Scalars("train/loss"))
    checkpoint_steps = {json.loads(p.read_text())["step"] for p in run_dir.glob("checkpoint_*/trainer_state.json")}
    assert first_step in checkpoint_steps - {max(checkpoint_steps)} and first_step > 0
    assert checkpoint_hashes(run_dir) == checkpoint_hashes(reference)
    assert _losses(run_dir) == _losses(reference)
