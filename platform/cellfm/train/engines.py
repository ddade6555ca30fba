"""Training engines: the parts of a step that differ between PyTorch DDP and DeepSpeed ZeRO, behind one
interface so that `train_loop_per_worker` stays a single loop.

An engine owns the wrapped model and the optimizer. Per micro-batch the training step
(`cellfm.train.meta_arch.SSLMetaArch`) runs

    with engine.micro_batch(last=..., freeze_last_layer=...):
        loss = objective(engine.model, ...)
        engine.backward(loss)
    if last: grad_norm = engine.step(freeze_last_layer)

and sets lr / weight decay per group in `engine.param_groups` before each step. Each engine saves and
restores its optimizer state without pickle (see `save_optimizer_state`)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable, ContextManager

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cellfm.config import Config

DDP_OPTIMIZER_FILE = "optimizer.pt"
ZERO_DIR = "zero"


class OptimizerStateError(ValueError):
    """A checkpoint's optimizer state does not fit the engine it is loaded into."""


def _last_layer_params(param_groups: list[dict]) -> list[nn.Parameter]:
    """The DINO/iBOT heads' prototype layers (the groups `parameter_groups` marks `last_layer`), frozen
    during `ssl.freeze_last_layer_epochs`."""
    return [p for group in param_groups if group["last_layer"] for p in group["params"]]


def _adamw(param_groups: list[dict], cfg: Config) -> torch.optim.AdamW:
    # lr and weight decay are set per group every step from the schedules. The fused (one-kernel) step only on
    # GPUs: on CPU the for-each step stays, so CPU runs are bit-identical to earlier releases.
    fused = cfg.train.use_gpu and cfg.optim.fused_adamw
    return torch.optim.AdamW(param_groups, lr=0.0, betas=(0.9, 0.999), fused=fused or None)


class DDPEngine:
    """PyTorch DDP through Ray Train's `prepare_model`: gradients all-reduced on the last micro-batch
    of a step only, clipped by global norm, AdamW step."""

    def __init__(self, cfg: Config, student: nn.Module, param_groups: list[dict],
                 prepare_model: Callable[[nn.Module], nn.Module] | None = None):
        """`prepare_model` wraps the student (default: Ray Train's, inside a Ray Train worker; the
        identity for a single process outside Ray, as in benchmarks/demo_recipe.py)."""
        if prepare_model is None:
            import ray.train.torch

            prepare_model = ray.train.torch.prepare_model
        self.student = student
        self.optimizer = _adamw(param_groups, cfg)
        self.model = prepare_model(student)  # Ray's moves the student to the device in place
        self._accumulate = cfg.optim.accumulate_steps
        self._clip = cfg.optim.clip_grad
        self._last_layer = _last_layer_params(param_groups)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def micro_batch(self, last: bool, freeze_last_layer: bool) -> ContextManager:
        # DDP all-reduces on every backward unless told not to; no_sync must enclose the forward too.
        if last or not isinstance(self.model, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self._accumulate).backward()

    def step(self, freeze_last_layer: bool) -> float:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), self._clip)
        if freeze_last_layer:
            # No gradient: AdamW skips these parameters entirely (no moment update, no weight decay).
            for p in self._last_layer:
                p.grad = None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def save_optimizer_state(self, directory: Path, rank: int) -> None:
        """Rank 0 writes the (replicated) AdamW state: tensors and numbers only, loadable with weights_only."""
        if rank == 0:
            torch.save(self.optimizer.state_dict(), directory / DDP_OPTIMIZER_FILE)

    def load_optimizer_state(self, directory: Path, rank: int) -> None:
        path = directory / DDP_OPTIMIZER_FILE
        if not path.is_file():
            raise OptimizerStateError(f"checkpoint {directory} has no {DDP_OPTIMIZER_FILE} (train.engine=ddp); "
                                      f"was it written by another engine?")
        self.optimizer.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed config of a run, derived from the typed config (never hand-written JSON). The optimizer
    is not declared here: a torch AdamW is passed in (no fused-Adam JIT build, our parameter groups)."""
    o = cfg.optim
    return {
        "train_micro_batch_size_per_gpu": o.batch_size_per_worker,
        "gradient_accumulation_steps": o.accumulate_steps,
        "train_batch_size": o.batch_size_per_worker * o.accumulate_steps * world_size,
        "gradient_clipping": o.clip_grad,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "bf16": {"enabled": cfg.train.use_gpu and cfg.train.mixed_precision == "bf16"},
        # The loop logs progress itself.
        "steps_per_print": 2**31 - 1,
    }


class DeepSpeedEngine:
    """DeepSpeed ZeRO stage 1 or 2 (`train.zero_stage`): optimizer state (and at stage 2 gradients) partitioned
    across workers; DeepSpeed scales the loss for accumulation, reduces on the step's last micro-batch, clips
    and steps. Uses the process group Ray Train already initialized (gloo on CPU, NCCL on GPU).

    Freezing the last layer: ZeRO reduces gradients into its own partitioned buffers during backward, so they
    cannot be dropped afterwards as under DDP. A gradient hook zeroes them (their AdamW moments stay zero) and
    their groups (`last_layer` in `parameter_groups`) step with lr 0 (no weight decay either), so the weights
    stay exactly as they are. Differences from DDP: the clipping norm excludes them, and AdamW's step count
    of those groups runs on (weaker bias correction of their first updates after the freeze)."""

    def __init__(self, cfg: Config, student: nn.Module, param_groups: list[dict], world_size: int):
        import deepspeed

        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=student, optimizer=_adamw(param_groups, cfg), config=deepspeed_config(cfg, world_size),
            dist_init_required=False,
        )
        self.student = self.model.module
        self._zero_stage = cfg.train.zero_stage
        self._world_size = world_size
        self._freeze = False
        for p in _last_layer_params(param_groups):
            p.register_hook(self._zero_if_frozen)

    def _zero_if_frozen(self, grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(grad) if self._freeze else grad

    @property
    def param_groups(self) -> list[dict]:
        # The base AdamW's groups, each holding this rank's flat fp32 partition; the extra keys
        # (lr_scale, apply_wd) of our parameter groups are kept.
        return self.optimizer.optimizer.param_groups

    def micro_batch(self, last: bool, freeze_last_layer: bool) -> ContextManager:
        self.model.set_gradient_accumulation_boundary(last)
        self._freeze = freeze_last_layer
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)  # divides by gradient_accumulation_steps itself
        if not self.model.is_gradient_accumulation_boundary():
            self.model.step()  # advances DeepSpeed's micro-step counter; no optimizer step

    def step(self, freeze_last_layer: bool) -> float:
        if freeze_last_layer:
            for group in self.param_groups:
                if group["last_layer"]:
                    group["lr"] = 0.0  # the loop sets every group's lr again before the next step
        self.model.step()
        return float(self.model.get_global_grad_norm())

    def _partition_files(self, directory: Path, rank: int) -> tuple[Path, Path]:
        stem = directory / ZERO_DIR / f"rank_{rank:05d}"
        return stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    def save_optimizer_state(self, directory: Path, rank: int) -> None:
        """Every rank writes its own partition: fp32 master weights and AdamW moments (safetensors) plus
        the layout and non-tensor state (JSON), under zero/. DeepSpeed's own checkpoint format needs pickle."""
        zero = self.optimizer
        tensors: dict[str, torch.Tensor] = {}
        scalars: list[dict] = []
        for i, group in enumerate(zero.optimizer.param_groups):
            flat = group["params"][0]
            tensors[f"group{i}.fp32"] = flat.detach().cpu().contiguous().clone()
            scalars.append({})
            for key, value in zero.optimizer.state[flat].items():
                if torch.is_tensor(value):
                    tensors[f"group{i}.{key}"] = value.detach().cpu().contiguous().clone()
                else:
                    scalars[i][key] = value
        tensor_path, json_path = self._partition_files(directory, rank)
        tensor_path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, tensor_path)
        layout = {"world_size": self._world_size, "zero_stage": self._zero_stage,
                  "partition_numel": [g["params"][0].numel() for g in zero.optimizer.param_groups],
                  "scalar_state": scalars}
        json_path.write_text(json.dumps(layout))

    def load_optimizer_state(self, directory: Path, rank: int) -> None:
        """Restore this rank's partition in place, then rebuild the model's weights from the fp32 masters."""
        tensor_path, json_path = self._partition_files(directory, rank)
        if not tensor_path.is_file() or not json_path.is_file():
            raise OptimizerStateError(
                f"checkpoint {directory} has no ZeRO partition for rank {rank} ({ZERO_DIR}/{tensor_path.name}); "
                f"it was written by another engine or fewer workers")
        layout = json.loads(json_path.read_text())
        zero = self.optimizer
        groups = zero.optimizer.param_groups
        expected = [g["params"][0].numel() for g in groups]
        if layout["world_size"] != self._world_size or layout["partition_numel"] != expected:
            raise OptimizerStateError(
                f"checkpoint {directory} holds ZeRO partitions of {layout['world_size']} workers "
                f"(sizes {layout['partition_numel']}); this run has {self._world_size} (sizes {expected}). "
                f"Resume with train.num_workers={layout['world_size']} and the same model")
        tensors = load_file(tensor_path)
        for i, group in enumerate(groups):
            flat = group["params"][0]
            with torch.no_grad():
                flat.copy_(tensors.pop(f"group{i}.fp32"))
            state = {key.split(".", 1)[1]: value.to(flat.device) for key, value in tensors.items()
                     if key.startswith(f"group{i}.")}
            zero.optimizer.state[flat] = {**state, **layout["scalar_state"][i]}
        zero.update_lp_params()  # model (bit16) weights <- restored fp32 partitions, all-gathered


TrainingEngine = DDPEngine | DeepSpeedEngine


def build_engine(cfg: Config, student: nn.Module, param_groups: list[dict], world_size: int,
                 prepare_model: Callable[[nn.Module], nn.Module] | None = None) -> TrainingEngine:
    """The engine named by `train.engine`, wrapping `student` (already on the same seed on every rank);
    `prepare_model` as in DDPEngine (DeepSpeed wraps the model itself)."""
    if cfg.train.engine == "deepspeed":
        return DeepSpeedEngine(cfg, student, param_groups, world_size)
    return DDPEngine(cfg, student, param_groups, prepare_model)
