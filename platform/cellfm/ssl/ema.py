"""Exponential moving average of the student's weights into the teacher (DINO's momentum teacher)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def update_ema(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for every teacher parameter,
    matched to the student's parameter of the same name. Buffers are left alone.
    momentum 1 keeps the teacher and 0 copies the student exactly (lerp is exact at both ends)."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    student_params = dict(student.named_parameters())
    teacher_list, student_list = [], []
    for name, t in teacher.named_parameters():
        s = student_params.get(name)
        if s is None:
            raise KeyError(f"teacher parameter {name!r} has no student counterpart (is the student still DDP-wrapped?)")
        if s.shape != t.shape:
            raise ValueError(f"parameter {name!r}: teacher {tuple(t.shape)} vs student {tuple(s.shape)}")
        teacher_list.append(t)
        # A bf16 student (DeepSpeed bf16 keeps the module in bf16, fp32 masters in the optimizer) still
        # averages into the fp32 teacher.
        student_list.append(s.detach().to(t.dtype))
    # One fused multi-tensor kernel instead of a Python loop over hundreds of parameters.
    torch._foreach_lerp_(teacher_list, student_list, 1.0 - momentum)
