"""The thin jobs as users run them: bad input ends with one clear error line and exit code 2
before Ray starts, and `ray job submit` of a short pre-training to a real local head succeeds."""

from __future__ import annotations

import contextlib
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
# The documented submission's runtime env: it ships the checkout's cellfm package with the job.
SHIP_CELLFM = '{"py_modules": ["platform/cellfm"]}'
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


@contextlib.contextmanager
def local_head(path: str):
    """A real local head node with its dashboard / job server on loopback, started by the venv's `ray` with
    `path` as PATH (the jobs' entrypoints find `python` there); yields {"address", "env"}.

    `ray start --block` runs as our child and tears down exactly the processes it started when
    signalled; `ray stop` would kill every Ray process on the machine, the test session's own too."""
    temp_dir = Path("/tmp") / f"cellfm-head-{uuid.uuid4().hex[:8]}"
    dashboard_port = _free_port()
    # No 30-s drain on SIGTERM (Ray 2.60 drains a node for Serve before stopping it): nothing here to drain.
    env = dict(os.environ, PATH=path, RAY_AUTH_MODE="token", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    env.pop("PYTHONPATH", None)  # a job imports the cellfm it is given (installed or shipped), not the test's
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


@pytest.fixture(scope="module")
def ray_head():
    """A head started as docs/user-guide.md says: with the venv's bin first on PATH."""
    with local_head(f"{Path(PYTHON).parent}{os.pathsep}{os.environ.get('PATH', '')}") as head:
        yield head


def _submit(ray_head: dict, command: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a shell command holding `ray job submit` in the repository, retrying while a fresh head's job
    agent is not up yet (Ray's own advice for "No available agent to submit job")."""
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run(["bash", "-c", command], cwd=REPO, env=ray_head["env"], capture_output=True, text=True,
                              timeout=timeout)
        if "No available agent to submit job" not in done.stdout + done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(2)


@pytest.mark.integration
def test_the_readmes_cluster_example_runs_as_written(ray_head, tiny_screen, tmp_path):
    """The README's `ray job submit` block, run by bash as written; only its placeholders change: the
    head's address (the test head's port), the smoke config for the GPU one, and the shared paths."""
    from tests.test_docs import readme_cluster_example

    example = readme_cluster_example()
    assert f"--runtime-env-json '{SHIP_CELLFM}'" in example  # the job runs this checkout's cellfm
    placeholders = {"http://127.0.0.1:8265": ray_head["address"], "configs/cellrep_vits16.yaml": "configs/smoke.yaml",
                    "/shared/screen/train.parquet": str(tiny_screen["train"]), "/shared/runs": str(tmp_path / "runs")}
    for placeholder, value in placeholders.items():
        assert example.count(placeholder) == 1, placeholder
        example = example.replace(placeholder, value)
    submit = _submit(ray_head, example)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    plain = re.sub(r"\x1b\[[0-9;]*m", "", submit.stdout)  # drop the CLI's colours
    assert re.search(r"Job 'raysubmit_\w+' succeeded", plain), plain[-2000:]
    assert "[cellfm] checkpoint:" in plain
    assert list((tmp_path / "runs" / "smoke").glob("checkpoint_*/backbone.safetensors"))
    # The job's console: progress lines with an ETA, and none of Ray's known noise.
    progress = [line for line in plain.splitlines() if re.search(r"\[cellfm\] (end of )?epoch \d+/\d+ step", line)]
    assert progress and all(re.search(r"images/s, data wait \d+%.*\| ETA (\d+s|\d+m\d\ds|\d+h\d\dm)$", line)
                            for line in progress), progress
    assert "Failed to query" not in plain + submit.stderr


@pytest.mark.integration
def test_a_git_ignored_relative_manifest_fails_at_the_jobs_first_line(ray_head, tiny_screen, tmp_path):
    """A manifest under demo_output/ (git-ignored, so `--working-dir .` does not upload it) given as a
    relative path: the job fails before Ray is touched, saying why and what to use instead."""
    folder = REPO / "demo_output" / f"cellfm-test-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    try:
        shutil.copy(tiny_screen["train"], folder / "train.parquet")  # it exists locally, not on the cluster
        relative = folder.relative_to(REPO) / "train.parquet"
        submit = _submit(ray_head, f"ray job submit --address {ray_head['address']} --working-dir . -- python "
                                   f"jobs/pretrain.py --config configs/smoke.yaml data.train_manifest={relative} "
                                   f"--storage-path {tmp_path / 'runs'}")
    finally:
        shutil.rmtree(folder)
    assert submit.returncode != 0
    plain = re.sub(r"\x1b\[[0-9;]*m", "", submit.stdout + submit.stderr)
    assert (f"error: data.train_manifest={relative} is a relative path the cluster cannot see: it does not exist in "
            f"the job's working directory") in plain, plain[-3000:]
    assert "git-ignored folders such as demo_output/ are not there); use an absolute path on storage every node " \
           "sees (e.g. /shared/...) or an s3:// URI" in plain
    assert "Started a local Ray instance" not in plain and "TrainController" not in plain  # failed at once
    assert not (tmp_path / "runs").exists()


@pytest.mark.integration
def test_a_job_imports_the_cellfm_it_ships_even_on_a_head_without_the_venv():
    """A head started by the venv's `ray` without the venv on PATH runs a job's entrypoint with the
    system's Python, where no cellfm is installed: with the documented `--runtime-env-json` the job still
    imports cellfm, the copy of platform/cellfm that the submission shipped."""
    system_path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                  if Path(p).resolve() != Path(PYTHON).parent.resolve())
    python = shutil.which("python3", path=system_path)
    assert python, "no python3 on the system PATH"
    with local_head(system_path) as head:
        # The user's shell has the venv (its `ray` submits); the head's PATH does not.
        submit = _submit(head, f"{RAY} job submit --address {head['address']} --working-dir . "
                               f"--runtime-env-json '{SHIP_CELLFM}' -- "
                               f"python3 -c 'import cellfm, sys; print(\"cellfm from\", cellfm.__file__, sys.prefix)'")
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    shipped = re.search(r"cellfm from (\S+) (\S+)", submit.stdout)
    assert shipped, submit.stdout[-3000:]
    # Ray unpacks a py_modules entry under its session's runtime_resources/py_modules_files/.
    assert "/runtime_resources/py_modules_files/" in shipped.group(1) and shipped.group(1).endswith("cellfm/__init__.py")
    assert Path(shipped.group(2)) != Path(sys.prefix)  # the system's Python, not the venv's
