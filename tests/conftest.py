"""Shared fixtures: one Ray instance and one tiny synthetic screen per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SMOKE_CONFIG = REPO / "configs" / "smoke.yaml"

# Faster Train V2 control loop for short test runs (STACK_NOTES); inherited by Ray workers.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def pytest_collection_modifyitems(config, items):
    """A test that asks for Ray (the `ray_session` fixture) must say so with `@pytest.mark.integration`, so
    that `-m "not integration"` runs no Ray at all."""
    unmarked = [item.nodeid for item in items
                if "ray_session" in item.fixturenames and item.get_closest_marker("integration") is None]
    if unmarked:
        raise pytest.UsageError("tests that start Ray must be marked integration: " + ", ".join(unmarked))


@pytest.fixture(autouse=True)
def _ray_only_in_integration_tests(request):
    """Fails a test not marked integration that starts Ray in this process (ray.init called by the code under
    test, not through `ray_session`)."""

    def ray_up() -> bool:
        return "ray" in sys.modules and sys.modules["ray"].is_initialized()

    was_up = ray_up()
    yield
    if request.node.get_closest_marker("integration") is None and not was_up and ray_up():
        sys.modules["ray"].shutdown()
        pytest.fail("this test started Ray: mark it @pytest.mark.integration")


@pytest.fixture(scope="module")
def ray_session():
    """One Ray per test module: Ray 2.60 left to run a whole session's Ray Train fits (DeepSpeed,
    SIGKILLed workers, resumes) in one instance stopped answering a later fit's TrainController."""
    import ray

    if not ray.is_initialized():
        # Logical CPUs beyond the 2 cores so Ray Data never starves beside 2 training workers.
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_screen(tmp_path_factory) -> dict[str, Path]:
    from cellfm.data.synthetic.screens import generate_screen

    return generate_screen(tmp_path_factory.mktemp("screen"), layout="tiny", seed=0)


@pytest.fixture(scope="session")
def family_screen(tmp_path_factory):
    """`family_screen(config, seed=0)`: the tiny screen of one synthetic family configuration (cp5, novel4,
    hpa4, brightfield1, ...), generated once per test session; tests only read it."""
    from cellfm.data.synthetic.screens import generate_family_screen

    made: dict[tuple[str, int], dict[str, Path]] = {}

    def get(config: str, seed: int = 0) -> dict[str, Path]:
        if (config, seed) not in made:
            made[config, seed] = generate_family_screen(tmp_path_factory.mktemp(f"{config}-{seed}"), config, "tiny",
                                                        seed=seed)
        return made[config, seed]

    return get


@pytest.fixture
def smoke_overrides(tiny_screen, tmp_path) -> list[str]:
    """Overrides pointing the smoke config at the session's tiny screen and a fresh run folder."""
    return [
        f"data.train_manifest={tiny_screen['train']}",
        f"eval.manifests={{seen: {tiny_screen['heldout']}, unseen: {tiny_screen['unseen']}}}",
        f"train.storage_path={tmp_path / 'runs'}",
        f"eval.output_dir={tmp_path / 'report'}",
    ]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's standalone server) on 127.0.0.1 with one bucket.

    Yields ``{"endpoint_url", "bucket", "storage_options"}``; clients talk HTTP to it exactly as to
    AWS S3 (no mocked client). Dummy credentials are passed explicitly, never taken from the host.
    """
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    key, secret = "cellfm-test-key", "cellfm-test-secret-0123456789"
    bucket = "cellfm-test"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    options = {"endpoint_url": endpoint, "key": key, "secret": secret,
               "client_kwargs": {"region_name": "us-east-1"}}
    yield {"endpoint_url": endpoint, "bucket": bucket, "storage_options": options}
    server.stop()


def write_control_manifest(uri: str, wells: list[tuple[str, str]], n_fields: int, channels: list[str],
                           shape: tuple[int, int], path: Path, plate: str = "V", dtype: str = "uint16") -> Path:
    """A manifest listing every field of the plate at ``uri`` as a DMSO control (all channels context)."""
    import pandas as pd

    from cellfm.data.manifest import write_manifest

    rows = [{"source": "t", "plate": plate, "well": f"{r}{c}", "row": r, "col": c, "field": f, "store_uri": uri,
             "channel_names": channels, "channel_groups": ["context"] * len(channels), "height": shape[0],
             "width": shape[1], "dtype": dtype, "perturbation_id": "DMSO", "moa": "control", "is_control": True,
             "dose": 0.0, "cell_line": "U2OS", "batch": "b"} for r, c in wells for f in range(n_fields)]
    return write_manifest(pd.DataFrame(rows), path)


def wait_until(predicate, timeout_s: float, what: str, poll_s: float = 0.2) -> None:
    """Polls `predicate` until it holds; TimeoutError naming `what` after `timeout_s`."""
    import time

    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s} s for {what}")
        time.sleep(poll_s)


def group_process_names(pgid: int) -> list[str]:
    """The names of the live (not zombie) processes in process group `pgid`."""
    import psutil

    names = []
    for proc in psutil.process_iter(["name", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                names.append(proc.info["name"])
        except (ProcessLookupError, PermissionError):
            continue
    return names


def ray_session_dir_of_group(pgid: int) -> str | None:
    """The Ray session folder (…/session_<time>) that a process of group `pgid` has a file open in, if any."""
    import re

    import psutil

    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) != pgid:
                continue
            for f in proc.open_files():
                match = re.match(r"(.*/session_[^/]+)/", f.path)
                if match:
                    return match.group(1)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return None


def tensorboard_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """step -> value of one TensorBoard scalar of a run; a resumed run appends a second events file,
    later values win."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events_file in sorted((run_dir / "tensorboard").glob("events.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events_file))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values
