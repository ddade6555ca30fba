"""The per-worker training loop run by Ray Train: each epoch, this rank's fields of the epoch
(`cellfm.data.pipeline.dataset.epoch_shard`, streamed in a fixed order) through the one training step
(`cellfm.train.meta_arch.SSLMetaArch`); what it measures (data wait, FLOPs, TensorBoard events, rank 0's
progress lines) is `cellfm.train.telemetry.TrainingTelemetry`, and each epoch ends in `report_epoch`
(metrics, the epoch evaluator, a checkpoint through Ray Train)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from cellfm.config import Config
from cellfm.data.pipeline.batches import iter_training_batches, prefetched
from cellfm.data.pipeline.cache import FieldCache
from cellfm.data.pipeline.dataset import epoch_shard, samples_per_rank, training_epoch_blocks
from cellfm.data.pipeline.monitor import DataMonitor
from cellfm.progress import log_line
from cellfm.seeding import Stream, derive_seed
from cellfm.train.meta_arch import SSLMetaArch
from cellfm.train.self_distillation import supcon_label
from cellfm.train.telemetry import TrainingTelemetry



def train_loop_per_worker(loop_config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch
    from ray.data.context import DataContext

    cfg = Config.from_dict(loop_config["config"], source="train_loop_config")
    manifest = ray.get(loop_config["manifest"])
    monitor: DataMonitor | None = loop_config["monitor"]
    cache: FieldCache | None = loop_config.get("cache")  # data.cache_fields: every epoch's fields from memory
    tensorboard_dir: str | None = loop_config.get("tensorboard_dir")
    epoch_evaluator = loop_config.get("epoch_evaluator")  # e.g. a sweep's objective (cellfm.tune.objective)
    torch.set_num_threads(cfg.train.torch_threads)
    device = ray.train.torch.get_device()
    # Bit-identical reruns on CPU (same config, seed and worker count): no op may pick a nondeterministic
    # kernel. (CUDA has no deterministic kernel for some ops we use; GPU runs are reproducible only closely.)
    torch.use_deterministic_algorithms(device.type == "cpu")
    # ...but without filling every new empty tensor with NaN (that mode's default, a debugging aid): nothing
    # reads memory before writing it, and the fill made DeepSpeed's flat buffers ~6x slower on CPU.
    torch.utils.deterministic.fill_uninitialized_memory = False
    # Our own progress lines instead of Ray Data's bars and per-epoch "starting execution" messages.
    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    batch, accumulate = cfg.optim.batch_size_per_worker, cfg.optim.accumulate_steps
    # epoch_shard gives every rank len(manifest) // world fields (with data.crop_mode=cells, at least
    # samples_per_rank cells) and batches drop the remainder, so every rank runs the same number of steps (a
    # rank with one step more would hang DDP).
    samples = samples_per_rank(manifest, cfg.data, seed=cfg.train.seed, epochs=cfg.optim.epochs, world_size=world)
    steps_per_epoch = samples // batch // accumulate
    if steps_per_epoch < 1:
        raise ValueError(
            f"{len(manifest)} training fields ({samples} {cfg.data.crop_mode} samples per worker) over {world} "
            f"workers cannot fill one step of "
            f"optim.batch_size_per_worker={batch} x optim.accumulate_steps={accumulate}; lower them or add plates"
        )
    checkpoint = ray.train.get_checkpoint()
    meta_arch = SSLMetaArch(cfg, steps_per_epoch=steps_per_epoch, rank=rank, world_size=world, device=device,
                            resuming=checkpoint is not None)
    start_epoch, step = 0, 0
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = meta_arch.load(Path(ckpt_dir))
        start_epoch, step = state["epoch"] + 1, state["step"]
        if rank == 0:
            log_line(f"resumed from epoch {state['epoch']} step {step}")

    telemetry = TrainingTelemetry(cfg, rank=rank, world_size=world, device=device, steps_per_epoch=steps_per_epoch,
                                  first_step=step, tensorboard_dir=tensorboard_dir, log=log_line)
    label = supcon_label(cfg)
    for epoch in range(start_epoch, cfg.optim.epochs):
        # This rank's fields of the epoch in a fixed order, each with its seeded channel order (data.pipeline).
        shard = epoch_shard(manifest, cfg.data, seed=cfg.train.seed, epoch=epoch, rank=rank, world_size=world)
        blocks = training_epoch_blocks(shard, cfg.data, keep_columns=[label] if label else [], seed=cfg.train.seed,
                                       epoch=epoch, monitor=monitor, cache=cache)
        shuffle_seed = derive_seed(cfg.train.seed, Stream.SHUFFLE_BUFFER, epoch, rank)
        batches = prefetched(iter_training_batches(blocks, cfg.data, batch, device, label_column=label,
                                                   shuffle_seed=shuffle_seed), prefetch_depth(cfg, device))
        telemetry.start_epoch()
        micro = 0
        for fields in telemetry.timed(batches):
            if telemetry.steps == steps_per_epoch:
                continue  # remainder micro-batches that cannot fill an accumulation step
            if micro == 0:
                telemetry.start_step()
            with telemetry.counting_flops():
                losses = meta_arch.forward_backward(fields, epoch=epoch, step=step, micro=micro)
            values = telemetry.micro_batch(losses, epoch=epoch, step=step)
            micro += 1
            if micro < accumulate:
                continue
            micro = 0
            grad_norm = meta_arch.optimizer_step(step)
            telemetry.optimizer_step(epoch=epoch, step=step, values=values, grad_norm=grad_norm,
                                     schedules=meta_arch.schedules)
            step += 1
        report_epoch(meta_arch, telemetry, epoch=epoch, step=step, epoch_evaluator=epoch_evaluator, rank=rank)
    telemetry.close()


def prefetch_depth(cfg: Config, device: torch.device) -> int:
    """Batches the worker's prefetch thread assembles ahead of the step: ``data.prefetch_batches``, except on a
    CPU worker with several torch threads, where a third thread stalls the intra-op threads (one worker with
    two threads lost a large share of its images/s to it)."""
    if device.type == "cpu" and cfg.train.torch_threads > 1:
        return 0
    return cfg.data.prefetch_batches


def report_epoch(meta_arch: SSLMetaArch, telemetry: TrainingTelemetry, *, epoch: int, step: int, epoch_evaluator,
                 rank: int) -> None:
    """The end of an epoch: its metrics (with a sweep objective's, scored by rank 0 on the teacher: Ray Tune
    forwards rank 0's metrics only), the line and scalars, and the checkpoint reported to Ray Train (every rank
    writes its part, if any, into a folder of the same name; Ray Train merges them)."""
    import ray.train

    metrics = telemetry.epoch_metrics(epoch=epoch, step=step)
    evaluated = epoch_evaluator(meta_arch.teacher.backbone, epoch) if epoch_evaluator is not None and rank == 0 else {}
    metrics.update(evaluated)
    telemetry.end_epoch(metrics, evaluated)
    with tempfile.TemporaryDirectory() as tmp:
        meta_arch.save(Path(tmp), epoch=epoch, step=step)
        part = ray.train.Checkpoint.from_directory(tmp) if any(Path(tmp).iterdir()) else None
        ray.train.report(metrics, checkpoint=part, checkpoint_dir_name=f"checkpoint_epoch{epoch:04d}")
