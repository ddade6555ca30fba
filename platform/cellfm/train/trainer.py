"""Driver side of pre-training: validate inputs, then run the per-worker loop under Ray Train's
`TorchTrainer` (Train V2); each worker streams its own share of every epoch
(`cellfm.data.pipeline.dataset.epoch_shard`), so the run is a function of (config, seed, worker count).
Relaunching with the same `train.storage_path` + `train.run_name` resumes from that run's latest checkpoint."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

import pandas as pd

from cellfm.config import Config, ConfigError, save_config
from cellfm.data.cells import with_cell_locations
from cellfm.data.pipeline.cache import fill_field_cache
from cellfm.data.pipeline.dataset import load_manifests
from cellfm.data.pipeline.monitor import create_monitor
from cellfm.runtime import init_ray, resource_need
from cellfm import storage
from cellfm.train.init_from import resolve_init_from
from cellfm.train.inputs import record_channel_metadata, training_input_problems
from cellfm.train.loop import train_loop_per_worker
from cellfm.train.meta_arch import check_training_config
from cellfm.storage import run_directory


def stopped_by_first_sigint(trainer_cls):
    """`trainer_cls` (Ray Train V2's TorchTrainer) with a SIGINT handler that stops the run at the first
    Ctrl-C. Ray 2.60's own handler (DataParallelTrainer._register_sigint_handler) waits for the controller
    to answer an abort, and a controller waiting for a placement group never does: Ctrl-C was ignored
    until SIGKILL. Here the abort is sent, not awaited, and the driver goes down at once (KeyboardInterrupt;
    the embedded Ray goes with it)."""
    import signal

    class Trainer(trainer_cls):
        def _register_sigint_handler(self, controller) -> None:
            def stop(signum, frame):
                controller.abort.remote()
                raise KeyboardInterrupt

            signal.signal(signal.SIGINT, stop)

    return Trainer


def run_pretraining(cfg: Config, *, manifest: pd.DataFrame | None = None, callbacks: Sequence = (),
                    epoch_evaluator=None):
    """Train and return the Ray Train `Result` (its `.checkpoint` is the latest epoch's). `manifest`: the training
    manifest with its plates checked, as preflight loaded it (default: loaded here), so a CLI run reads each
    plate's metadata once. `callbacks`: Ray Train callbacks of the run (a sweep's trial forwards its reports to
    Tune); `epoch_evaluator(backbone, epoch)`: called by rank 0 with the teacher's backbone at every epoch report,
    its metrics (none at an epoch it skips) reported with the epoch's (a sweep's objective,
    `cellfm.tune.objective.HeldOutObjective`)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    if manifest is None:
        manifest = load_manifests([cfg.data.train_manifest], storage_options=cfg.data.storage_options or None)
    if problems := training_input_problems(cfg, manifest):
        raise ConfigError(problems)
    # data.crop_mode=cells: every field's cell centres travel with the manifest to the workers.
    manifest = with_cell_locations(manifest, cfg.data, cfg.data.train_manifest)
    record_channel_metadata(cfg, manifest)
    if cfg.train.init_from:
        # The checkpoint folder itself (not a run folder's latest, which may change) is saved with the run.
        cfg.train.init_from = resolve_init_from(cfg.train.init_from, cfg.data.storage_options or None)
    check_training_config(cfg)
    run_dir = run_directory(cfg)
    # The resolved config lives beside the run (and inside every checkpoint).
    if storage.is_remote(run_dir):
        # Ray Train gets the same S3 client settings as the data (data.storage_options, else the environment).
        filesystem, storage_fs_path = storage.filesystem_and_path(cfg.train.storage_path, cfg.data.storage_options)
        with tempfile.TemporaryDirectory() as tmp:
            save_config(cfg, Path(tmp) / "config.yaml")
            storage.upload_directory(Path(tmp), run_dir, cfg.data.storage_options)
    else:
        filesystem, storage_fs_path = None, str(run_dir.parent)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    # Ray starts only after the inputs are known to be good: bad input fails in a second, not after start-up.
    init_ray(cfg.ray, need=resource_need(cfg, "train"))

    # One monitor for every rank's stream: bad fields are counted (and limited) over the whole run.
    per_epoch = len(manifest) // cfg.train.num_workers * cfg.train.num_workers
    monitor = create_monitor(cfg.data, len(manifest), name="train", fields_per_pass=per_epoch)
    # Held here, so the cached fields live in the object store until training ends.
    cache = fill_field_cache(manifest, cfg.data, monitor=monitor) if cfg.data.cache_fields else None
    trainer = stopped_by_first_sigint(TorchTrainer)(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "manifest": ray.put(manifest),
            "monitor": monitor,
            "cache": cache,
            "tensorboard_dir": f"{run_dir}/tensorboard",
            "epoch_evaluator": epoch_evaluator,
        },
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker,
                                  **({"GPU": cfg.train.gpus_per_worker} if cfg.train.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.train.run_name,
            storage_path=storage_fs_path,
            storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(cfg.train.torch_threads)}},
            callbacks=list(callbacks),
        ),
    )
    result = trainer.fit()
    if monitor is not None:
        summary = monitor.summary()
        if summary["bad_fields"]:
            print(f"[cellfm] {len(summary['bad_fields'])} unreadable field(s) skipped: "
                  + "; ".join(b["error"] for b in summary["bad_fields"][:10]), flush=True)
    return result
