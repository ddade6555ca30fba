"""Checkpoint directory format, written through Ray Train and loadable without pickle.

    student.safetensors    student backbone + head
    teacher.safetensors    EMA teacher backbone + head
    dino_loss.safetensors  teacher centering buffer
    optimizer.pt           train.engine=ddp: AdamW state (tensors and numbers only; loaded with weights_only=True)
    zero/rank_NNNNN.*      train.engine=deepspeed: each rank's ZeRO partition (fp32 master weights and AdamW
                           moments as safetensors, layout and scalars as JSON; see cellfm.train.engines)
    trainer_state.json     epoch finished, global step
    backbone.safetensors   teacher backbone alone: the inference weights
    config.yaml            the resolved config of the run (rebuilds the backbone with no training code)

Every rank writes its part into a folder of the same name and Ray Train merges them. Runs and checkpoints
may live on s3:// (`storage_options` as in `data.storage_options`); they are then downloaded to a
temporary folder to be read.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from cellfm.config import Config, save_config
from cellfm import storage

INFERENCE_WEIGHTS = "backbone.safetensors"
CONFIG_FILE = "config.yaml"
STATE_FILE = "trainer_state.json"


class CheckpointError(ValueError):
    """A checkpoint directory is missing files or does not match the model it is loaded into."""


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage; clone to contiguous CPU copies.
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def save_training_checkpoint(directory: Path, *, cfg: Config, student: nn.Module, teacher: nn.Module,
                             dino_loss: nn.Module, engine, rank: int, epoch: int, step: int) -> None:
    """This rank's part of the checkpoint: rank 0 the weights, state and config; every rank what its
    engine needs of it (DDP: rank 0 the optimizer; DeepSpeed: each rank its ZeRO partition)."""
    directory.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        save_file(_tensors(student), directory / "student.safetensors")
        save_file(_tensors(teacher), directory / "teacher.safetensors")
        save_file(_tensors(dino_loss), directory / "dino_loss.safetensors")
        (directory / STATE_FILE).write_text(json.dumps({"epoch": epoch, "step": step}))
        save_inference_checkpoint(directory, cfg=cfg, backbone=teacher.backbone)
    engine.save_optimizer_state(directory, rank)


def save_inference_checkpoint(directory: Path, *, cfg: Config, backbone: nn.Module) -> None:
    """The files `load_inference_backbone` needs: the backbone's weights and the config that rebuilds it."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(backbone), directory / INFERENCE_WEIGHTS)
    save_config(cfg, directory / CONFIG_FILE)


def load_training_checkpoint(directory: Path, *, teacher: nn.Module, dino_loss: nn.Module, engine,
                             rank: int) -> dict:
    """Restore everything in place (the student through `engine.student`); returns the trainer state
    ({"epoch", "step"})."""
    directory = Path(directory)
    _require(directory, ["student.safetensors", "teacher.safetensors", "dino_loss.safetensors", STATE_FILE])
    engine.student.load_state_dict(load_file(directory / "student.safetensors"))
    teacher.load_state_dict(load_file(directory / "teacher.safetensors"))
    dino_loss.load_state_dict(load_file(directory / "dino_loss.safetensors"))
    engine.load_optimizer_state(directory, rank)
    return json.loads((directory / STATE_FILE).read_text())


def load_initial_weights(directory: str | Path, *, student: nn.Module, teacher: nn.Module, dino_loss: nn.Module,
                         storage_options: dict | None = None) -> None:
    """`train.init_from`: student, teacher (with their heads) and teacher centers of a checkpoint (local folder or
    s3:// URI) into a new run's modules, before its engine and optimizer are built; CheckpointError naming the
    file when a part does not fit."""
    if storage.is_remote(directory):
        with tempfile.TemporaryDirectory(prefix="cellfm-init-from-") as tmp:
            storage.download_directory(str(directory), Path(tmp), storage_options)
            return load_initial_weights(tmp, student=student, teacher=teacher, dino_loss=dino_loss)
    directory = Path(directory)
    parts = {"student.safetensors": student, "teacher.safetensors": teacher, "dino_loss.safetensors": dino_loss}
    _require(directory, list(parts))
    for name, module in parts.items():
        try:
            module.load_state_dict(load_file(directory / name))
        except RuntimeError as exc:
            raise CheckpointError(f"{directory / name} does not fit this run's model: {exc}") from exc


def load_inference_backbone(directory: str | Path, storage_options: dict | None = None) -> tuple[nn.Module, Config]:
    """The teacher backbone of a checkpoint (local folder or s3:// URI), rebuilt from its saved config;
    eval mode, no pickle."""
    if storage.is_remote(directory):
        with tempfile.TemporaryDirectory(prefix="cellfm-checkpoint-") as tmp:
            storage.download_directory(str(directory), Path(tmp), storage_options)
            return load_inference_backbone(tmp)
    from cellfm.models.registry import build_backbone

    directory = Path(directory)
    _require(directory, [INFERENCE_WEIGHTS, CONFIG_FILE])
    cfg = load_checkpoint_config(directory)
    backbone = build_backbone(cfg.model)
    try:
        backbone.load_state_dict(load_file(directory / INFERENCE_WEIGHTS))
    except RuntimeError as exc:
        raise CheckpointError(f"{directory / INFERENCE_WEIGHTS} does not match model {cfg.model}: {exc}") from exc
    return backbone.eval(), cfg


def load_checkpoint_config(directory: str | Path, storage_options: dict | None = None) -> Config:
    """The resolved config a checkpoint (local folder or s3:// URI) was saved with, reading only its
    config.yaml (its credentials are markers; see cellfm.config)."""
    path = f"{str(directory).rstrip('/')}/{CONFIG_FILE}"
    if storage.is_remote(directory):
        try:
            text = storage.read_text(path, storage_options)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {directory} is missing {CONFIG_FILE}") from None
    else:
        _require(Path(directory), [CONFIG_FILE])
        text = Path(path).read_text()
    return Config.from_dict(yaml.safe_load(text), source=path)


def latest_checkpoint(run_dir: str | Path, storage_options: dict | None = None) -> Path | str:
    """The checkpoint of a run directory (local, or an s3:// URI: the checkpoint's URI) with the highest
    global step."""
    if storage.is_remote(run_dir):
        steps = {}
        for folder in storage.list_folders(str(run_dir), storage_options):
            try:
                steps[folder] = json.loads(storage.read_text(f"{folder}/{STATE_FILE}", storage_options))["step"]
            except FileNotFoundError:
                continue  # not a checkpoint (e.g. tensorboard/)
        if not steps:
            raise CheckpointError(f"no checkpoint (no */{STATE_FILE}) under run directory {run_dir}")
        return max(steps, key=steps.get)
    run_dir = Path(run_dir)
    candidates = [p.parent for p in run_dir.glob(f"*/{STATE_FILE}")]
    if not candidates:
        raise CheckpointError(f"no checkpoint (no */{STATE_FILE}) under run directory {run_dir}")
    return max(candidates, key=lambda p: json.loads((p / STATE_FILE).read_text())["step"])


def _require(directory: Path, names: list[str]) -> None:
    if not directory.exists():
        raise CheckpointError(f"checkpoint {directory} does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} is a file, not a checkpoint folder")
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is missing {', '.join(missing)}")
