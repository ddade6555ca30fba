"""A user's shell and machine as they are: an exported RAY_ADDRESS or a stale `ray start` never captures a
local run, resources that cannot fit fail before Ray starts, Ctrl-C stops a run in seconds, and a killed
driver leaves no Ray process behind."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
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


# ------------------------------------------------------------------------------------- resources


def test_workers_that_cannot_fit_fail_in_preflight_naming_the_keys(smoke_overrides, capsys):
    from cellfm.cli import main

    assert main(["pretrain", "--config", str(SMOKE_CONFIG), *smoke_overrides, "train.num_workers=8",
                 "train.cpus_per_worker=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: resources: train.num_workers=8 x train.cpus_per_worker=1 = 8 CPUs, but the embedded Ray "
                   "(ray.num_cpus=4, 0 GPU(s) on this machine) has 4: the run would wait forever; lower them, raise "
                   "ray.num_cpus or join a larger cluster with --address"], err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_use_gpu_on_a_cpu_only_machine_fails_in_preflight(smoke_overrides, capsys):
    from cellfm.cli import main

    assert main(["pretrain", "--config", str(SMOKE_CONFIG), *smoke_overrides, "--use-gpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: resources: train.use_gpu with train.num_workers=2 x train.gpus_per_worker=1 = 2 GPUs, but "
                   "the embedded Ray (ray.num_cpus=4, 0 GPU(s) on this machine) has 0: the run would wait forever; "
                   "drop --use-gpu or join a cluster with GPUs (--address)"], err


def test_embed_actors_that_cannot_fit_fail_before_the_checkpoint_is_read(tiny_screen, tmp_path, capsys):
    from cellfm.cli import main

    assert main(["embed", "--config", str(SMOKE_CONFIG), "--manifest", str(tiny_screen["heldout"]), "--store",
                 str(tmp_path / "store"), "--checkpoint", str(tmp_path / "none"), "features.actors=3",
                 "features.cpus_per_actor=2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: resources: features.actors=3 x features.cpus_per_actor=2 = 6 CPUs, but the embedded Ray "
        "(ray.num_cpus=4, 0 GPU(s) on this machine) has 4: the run would wait forever; lower them, raise "
        "ray.num_cpus or join a larger cluster with --address"]


@pytest.mark.integration
def test_the_pending_watch_names_what_waits_once_the_time_is_up(ray_session):
    """A placement group and an actor asking for more CPUs than the cluster has wait forever in Ray; the
    watch names them only once they have waited ray.pending_timeout_s."""
    import ray

    from cellfm.runtime import PendingWatch

    watch = PendingWatch(timeout_s=60)
    group = ray.util.placement_group([{"CPU": 100}])
    actor = ray.remote(num_cpus=100)(type("Huge", (), {})).remote()
    try:
        assert watch.check(now=1000.0) is None
        assert watch.check(now=1059.0) is None
        message = watch.check(now=1060.0)
        assert message.startswith("ray.pending_timeout_s=60: Ray could not place a placement group of {CPU: 100} in "
                                  "60 s; the cluster has CPU 4 free of 4") or \
            message.startswith("ray.pending_timeout_s=60: Ray could not place actor(s) Huge in 60 s"), message
        assert set(watch.first_seen) == {"a placement group of {CPU: 100}", "actor(s) Huge"}
    finally:
        ray.util.remove_placement_group(group)
        ray.kill(actor)


# A driver whose preflight lets through 10 workers x 0.5 CPU on the embedded Ray's 4 CPUs: the worker
# group's placement group stays pending, as when other jobs hold a cluster's CPUs.
UNCHECKED = ("import sys; import cellfm.preflight as p; p.local_resource_problems = lambda cfg, job: []; "
             "from cellfm.cli import main; sys.exit(main(sys.argv[1:]))")


def _pending_pretrain(smoke_overrides: list[str], log: Path, *overrides: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", RAY_JOB_CONFIG_ENV)}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-c", UNCHECKED, "pretrain", "--config", str(SMOKE_CONFIG),
                                 *smoke_overrides, "train.num_workers=10", *overrides], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, text=True)


def _wait_for(log: Path, text: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


@pytest.mark.integration
def test_ctrl_c_stops_a_run_waiting_for_resources_within_seconds(smoke_overrides, tmp_path):
    """Ray Train's own SIGINT handler waited for a controller stuck on its placement group: Ctrl-C was
    ignored (10 min observed). Now one SIGINT ends the driver in seconds, exit code 130."""
    log = tmp_path / "log.txt"
    run = _pending_pretrain(smoke_overrides, log, "ray.pending_timeout_s=0")
    try:
        # The controller is up and waiting for its workers' placement group.
        _wait_for(log, "Attempting to start training worker group of size 10", run, timeout=120)
        assert run.poll() is None, log.read_text()[-3000:]
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=30) == 130, log.read_text()[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
    assert "error: interrupted (Ctrl-C): stopped" in log.read_text()


@pytest.mark.integration
def test_a_placement_group_pending_past_the_timeout_stops_the_run(smoke_overrides, tmp_path):
    log = tmp_path / "log.txt"
    run = _pending_pretrain(smoke_overrides, log, "ray.pending_timeout_s=5")
    try:
        code = run.wait(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    text = log.read_text()
    assert code == 1, text[-3000:]
    assert ("error: ray.pending_timeout_s=5: Ray could not place a placement group of {CPU: 0.5} + {CPU: 0.5} + "
            "{CPU: 0.5}") in text, text[-3000:]
    assert "Stopped: free those resources (other jobs hold them), ask for fewer workers/actors, or raise " \
           "ray.pending_timeout_s" in text


# ------------------------------------------------------------------------------------- pixel faults


@pytest.fixture(scope="module")
def damaged(tiny_screen, tmp_path_factory):
    """The held-out plate with one chunk file truncated (well A01 field 0), its manifest, and a random-init
    checkpoint of the smoke model."""
    import torch

    from cellfm.config import load_config
    from cellfm.data.manifest import write_manifest
    from cellfm.data.pipeline.dataset import load_manifests
    from cellfm.models.registry import build_backbone
    from cellfm.train.checkpoint import save_inference_checkpoint

    root = tmp_path_factory.mktemp("damaged")
    manifest = load_manifests([tiny_screen["heldout"]], check_plates=False)
    plate = root / "plate.zarr"
    shutil.copytree(manifest["store_uri"].iloc[0], plate)
    chunk = plate / "A" / "01" / "0" / "0" / "c" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 3])
    cfg = load_config(SMOKE_CONFIG)
    torch.manual_seed(0)
    save_inference_checkpoint(root / "ckpt", cfg=cfg, backbone=build_backbone(cfg.model).eval())
    return {"manifest": str(write_manifest(manifest.assign(store_uri=str(plate)), root / "m.parquet")),
            "checkpoint": str(root / "ckpt"), "fields": len(manifest), "root": root}


@pytest.mark.integration
def test_a_truncated_chunk_over_the_limit_ends_embed_with_one_line_and_exit_2(damaged, tmp_path):
    """One bad field of 52 is over data.max_bad_fraction=0.01 (0 allowed): it used to end in a 140-line
    Ray traceback and exit code 1."""
    out = cellfm("embed", "--config", str(SMOKE_CONFIG), "--manifest", damaged["manifest"], "--store",
                 str(tmp_path / "store"), "--checkpoint", damaged["checkpoint"])
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: 1 of {damaged['fields']} fields are unreadable, more than data.max_bad_fraction "
                      f"allows (0): plate '{damaged['root'] / 'plate.zarr'}', well A01, field 0: cannot read field "
                      f"data (corrupt or unreadable chunk): " + errors[0].split("unreadable chunk): ", 1)[-1]], errors
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout


@pytest.mark.integration
def test_evaluate_skips_counts_and_names_a_truncated_field_within_the_limit(damaged, tmp_path):
    out = cellfm("evaluate", "--config", str(SMOKE_CONFIG), f"eval.manifests={{seen: {damaged['manifest']}}}",
                 f"eval.output_dir={tmp_path / 'report'}", "data.max_bad_fraction=0.05",
                 "--checkpoint", damaged["checkpoint"])
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    allowed = int(0.05 * damaged["fields"])
    assert f"[cellfm] data: skipped bad field 1/{allowed} allowed: plate '{damaged['root'] / 'plate.zarr'}', " \
           f"well A01, field 0: cannot read field data (corrupt or unreadable chunk)" in text, text[-3000:]
    assert f"1 bad field(s) skipped of {damaged['fields']}: SYN-HELDOUT-01 A01 field 0" in text
    assert (tmp_path / "report" / "report.json").exists()


def test_store_output_and_checkpoint_paths_are_checked_before_ray(damaged, tmp_path, smoke_overrides, capsys):
    from cellfm.cli import main

    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    assert main(["embed", "--config", str(SMOKE_CONFIG), "--manifest", damaged["manifest"], "--store", str(a_file),
                 "--checkpoint", damaged["checkpoint"]]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: features.store={a_file}: {a_file} is a file; this must be a folder (or a path where one can be created)"]
    missing = tmp_path / "no_such_run" / "checkpoint_epoch0001"
    assert main(["evaluate", "--config", str(SMOKE_CONFIG), *smoke_overrides, "--checkpoint", str(missing)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: checkpoint {missing}: checkpoint {missing} does not exist"]
    assert main(["evaluate", "--config", str(SMOKE_CONFIG), *smoke_overrides, f"eval.output_dir={a_file / 'report'}",
                 "--checkpoint", damaged["checkpoint"]]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: eval.output_dir={a_file / 'report'}: {a_file} is a file; this must be a folder (or a path where "
        f"one can be created)"]
    assert main(["pretrain", "--config", str(SMOKE_CONFIG), *smoke_overrides, f"train.storage_path={a_file}"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: train.storage_path={a_file}: {a_file} is a file; this must be a folder (or a path where one can be "
        f"created)"]


# ----------------------------------------------------------------------------------------------------
# A killed driver leaves no Ray process behind


def test_reap_stops_exactly_the_processes_holding_the_sessions_files(tmp_path):
    from cellfm.reaper import reap, session_processes

    session = tmp_path / "session_x"
    (session / "logs").mkdir(parents=True)
    holder = "import sys, time; f = open(sys.argv[1], 'a'); print('ready', flush=True); time.sleep(600)"
    inside = subprocess.Popen([sys.executable, "-c", holder, str(session / "logs" / "raylet.out")], stdout=subprocess.PIPE)
    outside = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path / "other.log")], stdout=subprocess.PIPE)
    try:
        assert inside.stdout.readline() == b"ready\n" and outside.stdout.readline() == b"ready\n"
        assert [p.pid for p in session_processes(str(session))] == [inside.pid]
        assert reap(str(session)) == [inside.pid]
        assert inside.wait(timeout=10) is not None and outside.poll() is None
    finally:
        for proc in (inside, outside):
            proc.kill()
            proc.wait()


@pytest.mark.integration
def test_a_sigkilled_driver_leaves_no_ray_process_of_its_session(tmp_path):
    """The embedded Ray of a driver killed with SIGKILL: without the reaper, Ray's dashboard and runtime-env
    agents run on (observed); with it, no process holds a file of the session a few seconds later."""
    import psutil

    from cellfm.reaper import session_processes

    driver = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import os, time, ray
        from cellfm.config import RayConfig
        from cellfm.runtime import init_ray
        init_ray(RayConfig(num_cpus=1), watch_pending=False)
        print(ray._private.worker._global_node.get_session_dir_path(), flush=True)
        time.sleep(600)
        """)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        session = driver.stdout.readline().strip()
        assert Path(session).is_dir(), session
        ray_pids = {p.pid for p in session_processes(session, exclude=[driver.pid])}
        assert len(ray_pids) >= 3  # GCS, raylet and agents, at least
        driver.kill()
        driver.wait()
        deadline = time.monotonic() + 30
        while session_processes(session) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert session_processes(session) == []
        assert not [pid for pid in ray_pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    finally:
        driver.kill()


@pytest.mark.integration
def test_a_driver_that_shuts_ray_down_lives_on_and_leaves_no_ray_process():
    """A normal `ray.shutdown()` ends the watch too: the reaper stops what is left of the session and
    never the driver (which holds files of the session itself)."""
    from cellfm.reaper import session_processes

    driver = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import os, time, ray
        from cellfm.config import RayConfig
        from cellfm.runtime import init_ray
        from cellfm.reaper import session_processes
        init_ray(RayConfig(num_cpus=1), watch_pending=False)
        session = ray._private.worker._global_node.get_session_dir_path()
        print(session, flush=True)
        ray.shutdown()
        # The reaper polls every 0.5 s and gives SIGTERM 3 s: wait (at most 60 s) for the session to empty.
        deadline = time.monotonic() + 60
        while session_processes(session, exclude=[os.getpid()]) and time.monotonic() < deadline:
            time.sleep(0.2)
        print("alive", flush=True)
        """)], cwd=REPO, capture_output=True, text=True, timeout=120)
    session, alive = driver.stdout.split()
    assert (driver.returncode, alive) == (0, "alive"), driver.stderr[-2000:]
    assert session_processes(session) == []
