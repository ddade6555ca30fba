"""Driver side of pre-training: validate inputs, build the streaming dataset, and run the
per-worker loop under Ray Train's `TorchTrainer` (Train V2). Relaunching with the same
`train.storage_path` + `train.run_name` resumes from that run's latest checkpoint."""

from __future__ import annotations

from pathlib import Path

from cellfm.config import Config, ConfigError, save_config
from cellfm.data.pipeline import build_field_dataset, load_manifests
from cellfm.runtime import init_ray
from cellfm.train.loop import train_loop_per_worker


def run_directory(cfg: Config) -> Path:
    return Path(cfg.train.storage_path).expanduser().resolve() / cfg.train.run_name


def run_pretraining(cfg: Config):
    """Train and return the Ray Train `Result` (its `.checkpoint` is the latest epoch's)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    if "://" in cfg.train.storage_path:
        raise ConfigError("train.storage_path: only local paths are supported by this version")
    manifest = load_manifests([cfg.data.train_manifest], storage_options=cfg.data.storage_options or None)
    run_dir = run_directory(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    # The resolved config lives beside the run (and inside every checkpoint).
    save_config(cfg, run_dir / "config.yaml")
    # Ray starts only after the inputs are known to be good: bad input fails in a second, not after start-up.
    init_ray(cfg.ray)

    dataset = build_field_dataset(manifest, cfg.data, training=True, seed=cfg.train.seed)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "n_train_fields": len(manifest),
            "tensorboard_dir": str(run_dir / "tensorboard"),
        },
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.train.run_name,
            storage_path=str(run_dir.parent),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(cfg.train.torch_threads)}},
        ),
        datasets={"train": dataset},
    )
    return trainer.fit()
