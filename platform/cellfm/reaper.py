"""The embedded Ray's processes go when its driver goes, however it went.

`ray.init()` starts the GCS, the raylet and their agents as this process's descendants. A driver that
exits or is stopped with Ctrl-C shuts them down; one killed with SIGKILL cannot, and Ray's dashboard and
runtime-env agents then run on with no cluster to serve. `watch_session` starts a small detached process
that waits for the driver (or the session's GCS, on a normal `ray.shutdown()`) to end and then kills every
process still holding a file of that Ray session's folder (each Ray process keeps its logs there open).

    python -m cellfm.reaper DRIVER_PID GCS_PID SESSION_DIR     # what watch_session runs
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterable

# Seconds between checks that the driver still lives, and given to processes between SIGTERM and SIGKILL.
POLL_S = 0.5
GRACE_S = 3.0


def session_processes(session_dir: str, exclude: Iterable[int] = ()) -> list:
    """Processes (psutil) with a file under `session_dir` open, other than `exclude`."""
    import psutil

    prefix = os.path.join(os.path.realpath(session_dir), "")
    skip = set(exclude)
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid in skip:
            continue
        try:
            if any(f.path.startswith(prefix) for f in proc.open_files()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def reap(session_dir: str, exclude: Iterable[int] = ()) -> list[int]:
    """Stop every process of the Ray session in `session_dir` (SIGTERM, then SIGKILL after GRACE_S);
    the PIDs it stopped."""
    import psutil

    procs = session_processes(session_dir, exclude)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=GRACE_S)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return [proc.pid for proc in procs]


def _alive(pid: int, started: float) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        # Same PID, same start time: not a new process that reused the number.
        return proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def watch_session(session_dir: str, gcs_pid: int) -> subprocess.Popen:
    """Start the reaper of this process's embedded Ray session, whose GCS server is `gcs_pid` (detached: a
    signal to this process's group, as Ctrl-C sends, does not reach it)."""
    return subprocess.Popen([sys.executable, "-m", "cellfm.reaper", str(os.getpid()), str(gcs_pid), session_dir],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


def main(argv: list[str] | None = None) -> int:
    import psutil

    driver, gcs, session_dir = (argv if argv is not None else sys.argv[1:])[:3]
    watched = []
    for pid in (int(driver), int(gcs)):
        try:
            watched.append((pid, psutil.Process(pid).create_time()))
        except psutil.NoSuchProcess:
            pass
    # Until the driver dies (killed: reap its session) or the GCS does (a normal shutdown: reap what is left).
    while len(watched) == 2 and all(_alive(pid, started) for pid, started in watched):
        time.sleep(POLL_S)
    reap(session_dir, exclude=[os.getpid(), int(driver)])  # a driver that shut Ray down lives on
    return 0


if __name__ == "__main__":
    sys.exit(main())
