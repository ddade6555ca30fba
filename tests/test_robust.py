"""A user's shell and machine as they are: an exported RAY_ADDRESS or a stale `ray start` never captures a
local run, resources that cannot fit fail before Ray starts, Ctrl-C stops a run in seconds, and a killed
driver leaves no Ray process behind."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cellfm.config import RayConfig
from cellfm.runtime import RAY_JOB_CONFIG_ENV, cluster_address
from tests.conftest import REPO, SMOKE_CONFIG


CELLFM = "import sys; from cellfm.cli import main; sys.exit(main(sys.argv[1:]))"  # the console script, on our path


def cellfm(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CELLFM, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("address, env, job, use_env, expected", [
    (None, {}, False, False, None),
    (None, {"RAY_ADDRESS": "http://127.0.0.1:8265"}, False, False, None),  # exported in the shell: ignored
    (None, {"RAY_ADDRESS": "http://127.0.0.1:8265"}, False, True, "http://127.0.0.1:8265"),  # asked for
    (None, {"RAY_ADDRESS": "10.0.0.1:6379"}, True, False, "10.0.0.1:6379"),  # a `ray job submit` driver
    ("auto", {"RAY_ADDRESS": "http://127.0.0.1:8265"}, False, False, "auto"),  # --address wins
])
def test_only_an_explicit_request_joins_a_cluster(monkeypatch, address, env, job, use_env, expected):
    for name in ("RAY_ADDRESS", RAY_JOB_CONFIG_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if job:
        monkeypatch.setenv(RAY_JOB_CONFIG_ENV, '{"runtime_env": {}}')
    assert cluster_address(RayConfig(address=address, use_env_address=use_env)) == expected


@pytest.mark.integration
def test_pretrain_trains_locally_despite_an_exported_ray_address_and_a_stale_cluster_file(smoke_overrides):
    """The README's old `export RAY_ADDRESS=...` (here pointing at a port nothing listens on) and the
    `ray_current_cluster` file a stopped `ray start --head` leaves: `cellfm pretrain` still starts its own Ray."""
    ray_tmp = tempfile.mkdtemp(prefix="cfm", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        (Path(ray_tmp) / "ray").mkdir()
        (Path(ray_tmp) / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_free_port()}")
        dead = f"http://127.0.0.1:{_free_port()}"
        env = dict(os.environ, RAY_ADDRESS=dead, RAY_TMPDIR=ray_tmp)
        env.pop(RAY_JOB_CONFIG_ENV, None)
        out = cellfm("pretrain", "--config", str(SMOKE_CONFIG), *smoke_overrides, env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"[cellfm] RAY_ADDRESS={dead} ignored: starting an embedded local Ray" in out.stdout
    assert "[cellfm] checkpoint:" in out.stdout
