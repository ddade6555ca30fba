"""Connect to a Ray cluster, or start an embedded local one when none is given, and keep Ray's known
harmless messages out of the console (docs/user-guide.md, "Console output"); what each job asks of Ray
(`resource_need`) and whether the Ray it gets can ever give it (`resource_problems`)."""

from __future__ import annotations

import _thread
import os
import sys
import threading
import time
from dataclasses import dataclass

from cellfm.config import Config, PreflightError, RayConfig
from cellfm.reaper import watch_session

# Lines Ray's own processes print that tell a cellfm user nothing, matched exactly (as substrings of
# the forwarded line). They are dropped from the driver's console only: Ray's log files under the
# session folder (/tmp/ray/session_*/logs) keep them. Ray 2.60.
KNOWN_RAY_NOISE = (
    # Ray Train's PlacementGroupCleaner actor (train/v2/_internal/execution/controller/
    # placement_group_cleaner.py, logger warning) asks the State API every second whether the
    # TrainController is alive; the embedded Ray runs no dashboard, so every query fails and it logs
    # this and keeps polling (86 lines in the 6-minute demo). It matters only when the controller dies
    # without cleaning up, and the embedded cluster then goes down with the driver anyway.
    "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. "
    "Continuing to monitor.",
    # Ray core (core_worker.cc, an ERROR-level log line) when the TrainController creates its
    # PreemptionWatcher actor with max_restarts > 0: a restart *could* fail if the constructor's
    # arguments were lost (ray-project/ray#53727). The controller holds them for the whole run, and the
    # line comes once per run whether anything restarts or not.
    "has constructor arguments in the object store and max_restarts > 0",
    # Ray Train V2 workers log every report and checkpoint at INFO (train/v2/_internal/execution/
    # context.py, storage.py): a few hundred characters of metrics dict per epoch and rank, which our own
    # "[cellfm] end of epoch" line already states readably.
    "Reporting training result ",
    "Checkpoint successfully created at: ",
)
_PRINT_HANDLER = "ray_print_logs"  # the driver's handler of forwarded worker output (ray._private.worker)


# Set by Ray's job supervisor in the driver of a `ray job submit` job (JSON: runtime_env, metadata).
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def cluster_address(cfg: RayConfig) -> str | None:
    """The Ray cluster a job joins, or None for the embedded local Ray. Only an explicit request joins one:
    `ray.address` (`--address`), or RAY_ADDRESS when `ray.use_env_address` is set or this process is the
    driver of a `ray job submit` job (whose supervisor sets RAY_ADDRESS). An exported RAY_ADDRESS alone, or
    the `ray_current_cluster` file a `ray start --head` leaves behind, never captures a local run."""
    env_address = os.environ.get("RAY_ADDRESS") or None
    if cfg.address:
        return cfg.address
    if env_address and (cfg.use_env_address or os.environ.get(RAY_JOB_CONFIG_ENV)):
        return env_address
    return None


def init_ray(cfg: RayConfig, dashboard: bool = False, need=None, watch_pending: bool = True) -> None:
    """Join `cluster_address(cfg)`; else start Ray in-process with `ray.num_cpus` logical CPUs (more than
    the cores on small machines, so Ray Data always has CPU left beside the training workers). `dashboard`:
    the embedded Ray runs its dashboard too (on a free loopback port): Ray Train's PlacementGroupCleaner
    asks its State API whether a run's controller is alive, and only then frees the workers of a run whose
    controller was killed, as Ray Tune kills a trial that ASHA stops (without it the stopped trial's CPUs
    stay reserved). `need` (a `ResourceNeed`): on a cluster, checked against what it can
    ever give (`cluster_capacity`; the embedded Ray's was checked in preflight). `watch_pending`: placement
    groups and actors of this job still pending after `ray.pending_timeout_s` stop the run (`PendingWatch`)."""
    import ray
    import ray.data

    if ray.is_initialized():
        return
    # Our own one-line progress logs replace Ray Data's per-operator bars, which flood job logs.
    ray.data.DataContext.get_current().enable_progress_bars = False
    address = cluster_address(cfg)
    if address:
        ray.init(address=address, log_to_driver=True)
        if need is not None:
            if problems := resource_problems(need, *cluster_capacity(), f"the Ray cluster at {address}"):
                raise PreflightError(problems)
    else:
        ignored = os.environ.pop("RAY_ADDRESS", None)  # Ray's own code (here and in workers) reads it too
        if ignored:
            print(f"[cellfm] RAY_ADDRESS={ignored} ignored: starting an embedded local Ray (join a cluster with "
                  f"--address, or ray.use_env_address=true)", flush=True)
        start_embedded_ray(cfg.num_cpus, dashboard)
    quiet_known_ray_noise()
    if watch_pending and cfg.pending_timeout_s > 0:
        PendingWatch(cfg.pending_timeout_s).start()


def start_embedded_ray(num_cpus: int | None, dashboard: bool = False, log_to_driver: bool = True) -> None:
    """Start a Ray of this process's own (`address="local"`: never the cluster of a stale
    ray_current_cluster file), whose processes go with this driver even when it is SIGKILLed."""
    import ray

    ports = {"dashboard_port": _free_port()} if dashboard else {}
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, log_to_driver=log_to_driver, **ports)
    node = ray._private.worker._global_node
    watch_session(node.get_session_dir_path(), node.all_processes["gcs_server"][0].process.pid)


def cluster_capacity() -> tuple[float, float]:
    """The CPUs and GPUs the connected cluster can ever give: the larger of what it has now and, for an
    autoscaling cluster, its node groups' maximum (the autoscaler's cluster config)."""
    import ray
    from ray._private.state import state

    now = ray.cluster_resources()
    most = state.get_max_resources_from_cluster_config() or {}
    return (max(now.get("CPU", 0.0), most.get("CPU", 0.0)), max(now.get("GPU", 0.0), most.get("GPU", 0.0)))


def local_gpu_count() -> int:
    """GPUs an embedded Ray on this machine would see."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class PendingWatch(threading.Thread):
    """Stops the run (an interrupt of the main thread, as Ctrl-C) once a placement group created after it
    started, or an actor of this job, has waited `timeout_s` for resources, saying what waits and what the
    cluster has: Ray itself waits forever (e.g. for GPUs no node has, or CPUs other jobs hold)."""

    reason: str | None = None  # the message of the watch that stopped the run, if any

    def __init__(self, timeout_s: float, poll_s: float = 2.0):
        import ray

        super().__init__(name="cellfm-pending-watch", daemon=True)
        self.timeout_s, self.poll_s = timeout_s, poll_s
        self.job_id = ray.get_runtime_context().get_job_id()
        self.known = set(ray.util.placement_group_table())  # others' placement groups from before
        self.first_seen: dict[str, float] = {}

    def states(self) -> dict[str, bool]:
        """What of this job asks Ray for resources: a name (by what it asks for, so Ray Train's retries of
        a worker group's placement group are one) -> whether it still waits."""
        import ray
        from ray._private.state import actors

        waiting: dict[str, bool] = {}
        for pg_id, info in ray.util.placement_group_table().items():
            if pg_id in self.known or info["state"] == "REMOVED":
                continue
            bundles = " + ".join("{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(b.items())) + "}"
                                 for b in info["bundles"].values())
            name = f"a placement group of {bundles}"
            waiting[name] = waiting.get(name, True) and info["state"] in ("PENDING", "RESCHEDULING")
        for info in actors().values():
            if info["JobID"] == self.job_id and info["State"] in ("PENDING_CREATION", "ALIVE"):
                name = f"actor(s) {info['ActorClassName']}"
                waiting[name] = waiting.get(name, True) and info["State"] == "PENDING_CREATION"
        return waiting

    def check(self, now: float) -> str | None:
        """The message to stop with once something has waited `timeout_s`, else None. A wait ends only when
        its name is placed (a placement group removed and retried still waits)."""
        import ray

        for name, waits in self.states().items():
            if not waits:
                self.first_seen.pop(name, None)
            else:
                self.first_seen.setdefault(name, now)
        late = [name for name, since in self.first_seen.items() if now - since >= self.timeout_s]
        if not late:
            return None
        total, free = ray.cluster_resources(), ray.available_resources()
        have = ", ".join(f"{k} {free.get(k, 0):g} free of {total[k]:g}" for k in ("CPU", "GPU") if k in total)
        return (f"ray.pending_timeout_s={self.timeout_s:g}: Ray could not place {late[0]} in {self.timeout_s:g} s; "
                f"the cluster has {have or 'no CPU or GPU'}. Stopped: free those resources (other jobs hold them), "
                f"ask for fewer workers/actors, or raise ray.pending_timeout_s")

    def run(self) -> None:
        while True:
            time.sleep(self.poll_s)
            try:
                reason = self.check(time.monotonic())
            except Exception:  # Ray shutting down under us: nothing left to watch
                return
            if reason:
                PendingWatch.reason = reason
                print(f"error: {reason}", file=sys.stderr, flush=True)
                _thread.interrupt_main()  # the main thread's SIGINT handler: the same stop as Ctrl-C
                return


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_known_ray_noise(line: str) -> bool:
    return any(message in line for message in KNOWN_RAY_NOISE)


class WithoutKnownRayNoise:
    """Wraps the driver's printer of forwarded worker output; lines of KNOWN_RAY_NOISE are not passed on."""

    def __init__(self, handler):
        self.handler = handler

    def __call__(self, data: dict) -> None:
        lines = [line for line in data.get("lines", []) if not is_known_ray_noise(line)]
        if lines:
            self.handler({**data, "lines": lines})


def quiet_known_ray_noise() -> None:
    """Filter KNOWN_RAY_NOISE out of the worker output this driver prints (after `ray.init`)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    for name, handler in list(dispatcher.handlers):
        if name == _PRINT_HANDLER and not isinstance(handler, WithoutKnownRayNoise):
            dispatcher.remove_handler(name)
            dispatcher.add_handler(name, WithoutKnownRayNoise(handler))


@dataclass(frozen=True)
class ResourceNeed:
    """What a job's Ray work asks for at once, with the config keys it comes from (for the problem line)."""

    cpus: float
    gpus: float
    cpu_keys: str  # e.g. "train.num_workers=8 x train.cpus_per_worker=1"
    gpu_keys: str


def resource_need(cfg: Config, job: str) -> ResourceNeed:
    """The CPUs and GPUs `job` ("train", "features" or "evaluate") holds at once: its training workers or
    inference actors, plus a pool of reader actors (data.read_actors) where it uses one."""
    if job == "train":
        t = cfg.train
        cpus, cpu_keys = t.num_workers * t.cpus_per_worker, f"train.num_workers={t.num_workers} x train.cpus_per_worker={t.cpus_per_worker:g}"
        gpus = t.num_workers * t.gpus_per_worker if t.use_gpu else 0.0
        gpu_keys = f"train.use_gpu with train.num_workers={t.num_workers} x train.gpus_per_worker={t.gpus_per_worker:g}"
        if cfg.data.read_actors:
            cpus += cfg.data.read_actors * cfg.data.read_cpus
            cpu_keys += f" + data.read_actors={cfg.data.read_actors} x data.read_cpus={cfg.data.read_cpus:g}"
        return ResourceNeed(cpus, gpus, cpu_keys, gpu_keys)
    if job == "features":
        f = cfg.features
        use_gpu = cfg.train.use_gpu if f.use_gpu is None else f.use_gpu
        actors = f.actors or 1  # 0: sized from the cluster, at least one
        which = "features.use_gpu" if f.use_gpu is not None else "train.use_gpu"
        return ResourceNeed(actors * f.cpus_per_actor, actors * f.gpus_per_actor if use_gpu else 0.0,
                            f"features.actors={f.actors} x features.cpus_per_actor={f.cpus_per_actor:g}",
                            f"{which} with features.actors={f.actors} x features.gpus_per_actor={f.gpus_per_actor:g}")
    if job == "evaluate":
        # One CPU per embedding actor (cellfm.features.embed.embedding_dataset's default); no GPU.
        return ResourceNeed(float(cfg.eval.embed_actors), 0.0, f"eval.embed_actors={cfg.eval.embed_actors} x 1 CPU", "")
    raise ValueError(f"unknown job {job!r}")


def resource_problems(need: ResourceNeed, cpus: float, gpus: float, described: str) -> list[str]:
    """One line per resource `need` asks more of than `described` (which has `cpus` and `gpus`) can ever give."""
    problems = []
    if need.cpus > cpus + 1e-9:
        problems.append(f"resources: {need.cpu_keys} = {need.cpus:g} CPUs, but {described} has {cpus:g}: the run "
                        f"would wait forever; lower them{', raise ray.num_cpus' if 'embedded' in described else ''} "
                        f"or join a larger cluster with --address")
    if need.gpus > gpus + 1e-9:
        problems.append(f"resources: {need.gpu_keys} = {need.gpus:g} GPUs, but {described} has {gpus:g}: the run "
                        f"would wait forever; drop --use-gpu or join a cluster with GPUs (--address)")
    return problems


def local_resource_problems(cfg: Config, job: str) -> list[str]:
    """`resource_problems` of `job` on the embedded Ray this machine would start (none when the job joins
    a cluster: `cellfm.runtime.init_ray` checks that one once connected)."""
    if cluster_address(cfg.ray):
        return []
    need = resource_need(cfg, job)
    gpus = local_gpu_count() if need.gpus else 0
    return resource_problems(need, cfg.ray.num_cpus, gpus,
                             f"the embedded Ray (ray.num_cpus={cfg.ray.num_cpus}, {gpus} GPU(s) on this machine)")
