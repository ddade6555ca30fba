"""Checkpoint directory format, written through Ray Train and loadable without pickle.

    student.safetensors    student backbone + head
    teacher.safetensors    EMA teacher backbone + head
    dino_loss.safetensors  teacher centering buffer
    optimizer.pt           AdamW state (tensors and numbers only; loaded with weights_only=True)
    trainer_state.json     epoch finished, global step
    backbone.safetensors   teacher backbone alone: the inference weights
    config.yaml            the resolved config of the run (rebuilds the backbone with no training code)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from cellfm.config import Config, save_config

INFERENCE_WEIGHTS = "backbone.safetensors"
CONFIG_FILE = "config.yaml"
STATE_FILE = "trainer_state.json"


class CheckpointError(ValueError):
    """A checkpoint directory is missing files or does not match the model it is loaded into."""


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage; clone to contiguous CPU copies.
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def save_training_checkpoint(directory: Path, *, cfg: Config, student: nn.Module, teacher: nn.Module,
                             dino_loss: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, step: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(student), directory / "student.safetensors")
    save_file(_tensors(teacher), directory / "teacher.safetensors")
    save_file(_tensors(dino_loss), directory / "dino_loss.safetensors")
    save_file(_tensors(teacher.backbone), directory / INFERENCE_WEIGHTS)
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    (directory / STATE_FILE).write_text(json.dumps({"epoch": epoch, "step": step}))
    save_config(cfg, directory / CONFIG_FILE)


def load_training_checkpoint(directory: Path, *, student: nn.Module, teacher: nn.Module, dino_loss: nn.Module,
                             optimizer: torch.optim.Optimizer) -> dict:
    """Restore everything in place; returns the trainer state ({"epoch", "step"})."""
    directory = Path(directory)
    _require(directory, ["student.safetensors", "teacher.safetensors", "dino_loss.safetensors", "optimizer.pt", STATE_FILE])
    student.load_state_dict(load_file(directory / "student.safetensors"))
    teacher.load_state_dict(load_file(directory / "teacher.safetensors"))
    dino_loss.load_state_dict(load_file(directory / "dino_loss.safetensors"))
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True, map_location="cpu"))
    return json.loads((directory / STATE_FILE).read_text())


def load_inference_backbone(directory: str | Path) -> tuple[nn.Module, Config]:
    """The teacher backbone of a checkpoint, rebuilt from its saved config; eval mode, no pickle."""
    from cellfm.models.registry import build_backbone

    directory = Path(directory)
    _require(directory, [INFERENCE_WEIGHTS, CONFIG_FILE])
    cfg = Config.from_dict(yaml.safe_load((directory / CONFIG_FILE).read_text()), source=str(directory / CONFIG_FILE))
    backbone = build_backbone(cfg.model)
    try:
        backbone.load_state_dict(load_file(directory / INFERENCE_WEIGHTS))
    except RuntimeError as exc:
        raise CheckpointError(f"{directory / INFERENCE_WEIGHTS} does not match model {cfg.model}: {exc}") from exc
    return backbone.eval(), cfg


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint of a run directory with the highest global step."""
    run_dir = Path(run_dir)
    candidates = [p.parent for p in run_dir.glob(f"*/{STATE_FILE}")]
    if not candidates:
        raise CheckpointError(f"no checkpoint (no */{STATE_FILE}) under run directory {run_dir}")
    return max(candidates, key=lambda p: json.loads((p / STATE_FILE).read_text())["step"])


def _require(directory: Path, names: list[str]) -> None:
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is missing {', '.join(missing)}")
