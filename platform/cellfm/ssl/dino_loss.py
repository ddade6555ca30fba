"""DINO self-distillation loss: cross-entropy between sharpened teacher targets and student
predictions over prototypes, with teacher centering or Sinkhorn-Knopp balancing."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class CenteredTeacherLoss(nn.Module):
    """What DINO's CLS loss and iBOT's patch loss share: a student temperature, a teacher center
    (buffer `center`, (1, K)) updated with `center_momentum`, and the centered teacher softmax."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """teacher_logits (N, K) -> (N, K) probabilities softmax((t - center) / teacher_temp)."""
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)


class DINOLoss(CenteredTeacherLoss):
    """Holds the teacher center (buffer `center`, (1, out_dim)) and computes the DINO cross-entropy.

    All maths runs in fp32: the softmax/log-softmax over tens of thousands of prototypes at a
    temperature of 0.04 is not safe in bf16."""

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
        """teacher_logits (N, K) -> (N, K) targets whose rows sum to 1 and whose prototype (column)
        masses approach N/K each, i.e. an equipartition over the global batch (all ranks)."""
        logits = teacher_logits.float() / teacher_temp
        # Subtract the global max so exp cannot overflow; a shared constant cancels in the normalisation.
        shift = logits.max()
        if _distributed():
            dist.all_reduce(shift, op=dist.ReduceOp.MAX)
        q = torch.exp(logits - shift)  # (N, K)
        n_samples = torch.tensor(q.shape[0], device=q.device, dtype=q.dtype)
        total = q.sum()
        if _distributed():
            dist.all_reduce(n_samples)
            dist.all_reduce(total)
        num_prototypes = q.shape[1]
        q /= total
        for _ in range(n_iterations):
            # Each prototype gets mass 1/K, summed over every rank's samples.
            col = q.sum(dim=0, keepdim=True)
            if _distributed():
                dist.all_reduce(col)
            q /= col * num_prototypes
            # Each sample gets mass 1/N (local rows, no communication needed).
            q /= q.sum(dim=1, keepdim=True) * n_samples
        return q * n_samples

    def forward(self, student_logits: Tensor, teacher_probs: Tensor, skip_same_view: bool) -> Tensor:
        """student_logits (S, B, K) raw logits for S student crops; teacher_probs (T, B, K) targets for T
        teacher crops. Returns a scalar: the mean over (s, t) pairs of
            mean_b  -sum_k teacher_probs[t, b, k] * log_softmax(student_logits[s, b] / student_temp)[k],
        skipping s == t when skip_same_view (student crops 0..T-1 are the teacher's global crops)."""
        S, T = student_logits.shape[0], teacher_probs.shape[0]
        if student_logits.shape[1:] != teacher_probs.shape[1:]:
            raise ValueError(
                f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_probs.shape)} disagree on (B, K)"
            )
        if skip_same_view and S < T:
            raise ValueError(f"skip_same_view needs the {T} teacher crops among the {S} student crops")
        log_probs = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        # (S, T) matrix of per-pair cross-entropies, averaged over the batch.
        pair_loss = -torch.einsum("tbk,sbk->st", teacher_probs.float(), log_probs) / student_logits.shape[1]
        if not skip_same_view:
            return pair_loss.mean()
        keep = torch.ones(S, T, dtype=torch.bool, device=pair_loss.device)
        keep[torch.arange(T), torch.arange(T)] = False
        if not bool(keep.any()):
            raise ValueError("skip_same_view with a single crop leaves no (student, teacher) pair")
        return pair_loss[keep].mean()

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """teacher_logits (N, K): center <- m * center + (1 - m) * mean over the global batch (all ranks)."""
        count = teacher_logits.new_tensor([teacher_logits.shape[0]], dtype=torch.float32)
        stats = torch.cat([teacher_logits.float().sum(dim=0), count])
        if _distributed():
            # Sum and count together so ranks with different batch sizes are weighted correctly.
            dist.all_reduce(stats)
        batch_center = stats[:-1] / stats[-1]
        self.center.mul_(self.center_momentum).add_(batch_center[None], alpha=1.0 - self.center_momentum)
