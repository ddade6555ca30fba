"""The thin jobs as users run them: bad input ends with one clear error line and exit code 2
before Ray starts, and `ray job submit` of a short pre-training to a real local head succeeds."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO, SMOKE_CONFIG

PYTHON = sys.executable
RAY = str(Path(sys.executable).with_name("ray"))


def run_job(script: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(REPO / "jobs" / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_help_lists_flags_and_overrides():
    out = run_job("pretrain.py", "--help")
    assert out.returncode == 0
    for flag in ("--config", "--storage-path", "--run-name", "--num-workers", "--use-gpu", "--cpus-per-worker",
                 "section.key=value"):
        assert flag in out.stdout


def test_unknown_config_key_is_a_clear_error():
    out = run_job("pretrain.py", "--config", str(SMOKE_CONFIG), "optim.lerning_rate=0.1")
    assert out.returncode == 2
    assert "unknown config key(s) optim.lerning_rate" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_manifest_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.parquet"
    out = run_job("pretrain.py", "--config", str(SMOKE_CONFIG), f"data.train_manifest={missing}")
    assert out.returncode == 2
    assert "manifest not found" in out.stderr and str(missing) in out.stderr


def test_plate_missing_a_manifest_channel_is_named(tiny_screen, tmp_path):
    manifest = pd.read_parquet(tiny_screen["train"])
    first = manifest.iloc[0]
    manifest.at[0, "channel_names"] = [*first["channel_names"][:-1], "Brightfield"]
    # Absolute store URIs so the edited manifest can live elsewhere.
    base = Path(tiny_screen["train"]).parent
    manifest["store_uri"] = [u if Path(u).is_absolute() else str(base / u) for u in manifest["store_uri"]]
    bad = tmp_path / "bad.parquet"
    manifest.to_parquet(bad)
    out = run_job("pretrain.py", "--config", str(SMOKE_CONFIG), f"data.train_manifest={bad}")
    assert out.returncode == 2, out.stderr
    assert "Brightfield" in out.stderr and first["plate"] in out.stderr and first["well"] in out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A real local head node with its dashboard / job server on loopback.

    `ray start --block` runs as our child and tears down exactly the processes it started when
    signalled; `ray stop` would kill every Ray process on the machine, the test session's own too."""
    temp_dir = Path("/tmp") / f"cellfm-head-{uuid.uuid4().hex[:8]}"
    dashboard_port = _free_port()
    env = dict(os.environ, PATH=f"{Path(PYTHON).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               RAY_AUTH_MODE="token")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={_free_port()}", "--node-ip-address=127.0.0.1", "--num-cpus=4",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         f"--ray-client-server-port={_free_port()}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         # Every agent on its own free port: the test session's Ray may already hold the defaults.
         *(f"--{name}={_free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                    "metrics-export-port", "runtime-env-agent-port",
                                                    "node-manager-port", "object-manager-port"))],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True,
                             timeout=60).returncode != 0:
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the head's job server did not come up in 120 s"
            time.sleep(1)
        yield {"address": address, "env": env}
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.integration
def test_ray_job_submit_pretrain_to_local_head(ray_head, smoke_overrides, tmp_path):
    job_id = f"cellfm-test-{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + 120
    while True:
        submit = subprocess.run(
            [RAY, "job", "submit", "--address", ray_head["address"], "--submission-id", job_id,
             "--working-dir", str(REPO), "--", "python", "jobs/pretrain.py", "--config", "configs/smoke.yaml",
             "--run-name", "submitted", *smoke_overrides],
            cwd=REPO, env=ray_head["env"], capture_output=True, text=True, timeout=600,
        )
        # A fresh head answers HTTP before its job agent is up; Ray's own advice is to try again.
        if "No available agent to submit job" not in submit.stdout + submit.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    status = subprocess.run([RAY, "job", "status", "--address", ray_head["address"], job_id],
                            env=ray_head["env"], capture_output=True, text=True, timeout=60)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr)  # drop the CLI's colours
    assert re.search(rf"Job '{job_id}' succeeded", plain, re.IGNORECASE), plain[-2000:]
    assert "[cellfm] checkpoint:" in submit.stdout
    storage = Path(next(o for o in smoke_overrides if o.startswith("train.storage_path=")).split("=", 1)[1])
    assert list((storage / "submitted").glob("checkpoint_*/backbone.safetensors"))
