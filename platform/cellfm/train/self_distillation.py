"""DINO self-distillation as used by CellRep: a student (backbone + DINO head) trained to match an
EMA teacher's centered, sharpened distribution over prototypes, across 2 global and N local crops,
plus the KL-to-uniform regularizer on the student's batch-mean distribution (no iBOT)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cellfm.config import Config
from cellfm.models.heads import DINOHead
from cellfm.models.registry import build_backbone
from cellfm.ssl.dino_loss import DINOLoss
from cellfm.ssl.kl_uniform import KLUniformLoss


class EncoderWithHead(nn.Module):
    """Backbone + DINO head. One forward call runs every crop size, so DDP sees one graph per step."""

    def __init__(self, backbone: nn.Module, head: DINOHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, global_crops: Tensor, local_crops: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """global_crops (G*B, C, g, g), local_crops (L*B, C, l, l) -> logits (G*B, K), (L*B, K) or None."""
        global_logits = self.head(self.backbone(global_crops)["cls"])
        local_logits = None
        if local_crops is not None:
            local_logits = self.head(self.backbone(local_crops)["cls"])
        return global_logits, local_logits


def build_student_teacher(cfg: Config) -> tuple[EncoderWithHead, EncoderWithHead]:
    """Student and an identical teacher (no gradients; updated only by EMA)."""
    backbone = build_backbone(cfg.model)
    head = DINOHead(
        backbone.embed_dim,
        cfg.ssl.head_out_dim,
        hidden_dim=cfg.ssl.head_hidden_dim,
        bottleneck_dim=cfg.ssl.head_bottleneck_dim,
        nlayers=cfg.ssl.head_nlayers,
    )
    student = EncoderWithHead(backbone, head)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


@dataclass
class StepLosses:
    total: Tensor
    dino_global: Tensor
    dino_local: Tensor
    kl_uniform: Tensor


class DinoObjective(nn.Module):
    """Loss of one step, with explicit shapes.

    global_crops (2, B, C, g, g), local_crops (N, B, C, l, l) or None. Student global crop i is
    matched to teacher crop 1 - i (never to its own view); each local crop to both teacher crops.
    Global and local terms are weighted by their number of pairs, as in DINO.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.dino_loss = DINOLoss(cfg.ssl.head_out_dim, cfg.ssl.student_temp, cfg.ssl.center_momentum)
        self.kl_uniform = KLUniformLoss()

    def forward(self, student: nn.Module, teacher: EncoderWithHead, global_crops: Tensor,
                local_crops: Tensor | None, teacher_temp: float) -> StepLosses:
        n_global, batch = global_crops.shape[:2]
        flat_global = global_crops.flatten(0, 1)
        flat_local = local_crops.flatten(0, 1) if local_crops is not None else None

        with torch.no_grad():
            teacher_logits, _ = teacher(flat_global)
            if self.cfg.ssl.centering == "sinkhorn_knopp":
                teacher_probs = self.dino_loss.sinkhorn_knopp_teacher(teacher_logits, teacher_temp)
            else:
                teacher_probs = self.dino_loss.softmax_center_teacher(teacher_logits, teacher_temp)
                self.dino_loss.update_center(teacher_logits)
            teacher_probs = teacher_probs.view(n_global, batch, -1)

        student_global, student_local = student(flat_global, flat_local)
        k = student_global.shape[-1]
        dino_global = self.dino_loss(student_global.view(n_global, batch, k), teacher_probs, skip_same_view=True)
        global_pairs = n_global * (n_global - 1)
        if student_local is not None:
            n_local = local_crops.shape[0]
            dino_local = self.dino_loss(student_local.view(n_local, batch, k), teacher_probs, skip_same_view=False)
            local_pairs = n_local * n_global
            all_student = torch.cat([student_global, student_local])
        else:
            dino_local = torch.zeros((), device=global_crops.device)
            local_pairs = 0
            all_student = student_global
        dino = (dino_global * global_pairs + dino_local * local_pairs) / (global_pairs + local_pairs)
        student_probs = torch.softmax(all_student.float() / self.cfg.ssl.student_temp, dim=-1)
        kl = self.kl_uniform(student_probs)
        total = dino + self.cfg.ssl.kl_uniform_weight * kl
        return StepLosses(total=total, dino_global=dino_global, dino_local=dino_local, kl_uniform=kl)
