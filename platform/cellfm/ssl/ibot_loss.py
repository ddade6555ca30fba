"""iBOT masked-patch loss: the student, shown a global crop with some patches replaced by a mask
token, predicts the teacher's (unmasked view) distribution over patch prototypes at exactly those
masked positions. Each image counts once, however many of its patches were masked (DINOv2)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from cellfm.ssl.dino_loss import CenteredTeacherLoss


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class IBOTPatchLoss(CenteredTeacherLoss):
    """Holds the teacher patch center (buffer `center`, (1, K)) and computes the masked-patch cross-entropy.

    Rows of the (M, K) patch tensors are the masked patches of a batch of images, in the order of
    `patch_mask.nonzero()` (image by image, patches row-major), where patch_mask is the (N_img, N_patch)
    bool mask of the student's global crops. All maths runs in fp32.

    Every collective (center update, Sinkhorn-Knopp) is called on every rank even when the rank has no
    masked patch this step, so ranks never disagree on the number of all_reduce calls."""

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
        """teacher_logits (M, K) -> (M, K) targets with rows summing to 1 and prototype masses balanced
        over the masked patches of all ranks (M may be 0 on some ranks)."""
        logits = teacher_logits.float() / teacher_temp
        shift = logits.max() if logits.numel() else logits.new_tensor(float("-inf"))
        if _distributed():
            dist.all_reduce(shift, op=dist.ReduceOp.MAX)
        q = torch.exp(logits - shift)  # (M, K); the global max cancels in the normalisation
        n_rows = torch.tensor(float(q.shape[0]), device=q.device)
        total = q.sum()
        if _distributed():
            dist.all_reduce(n_rows)
            dist.all_reduce(total)
        num_prototypes = q.shape[1]
        q = q / total.clamp_min(torch.finfo(q.dtype).tiny)
        for _ in range(n_iterations):
            col = q.sum(dim=0, keepdim=True)
            if _distributed():
                dist.all_reduce(col)
            q = q / (col.clamp_min(torch.finfo(q.dtype).tiny) * num_prototypes)
            q = q / (q.sum(dim=1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny) * n_rows)
        return q * n_rows

    def forward(self, student_patch_logits: Tensor, teacher_probs: Tensor, patch_mask: Tensor) -> Tensor:
        """student_patch_logits (M, K) raw logits and teacher_probs (M, K) targets at the M masked patches;
        patch_mask (N_img, N_patch) bool with exactly M True entries. Returns the scalar

            (1 / N_img) * sum_i  mean_{p masked in image i}  -sum_k t[p, k] * log_softmax(s[p] / student_temp)[k]

        i.e. per-image averaging over that image's masked patches, then the mean over images; an image
        with no masked patch contributes 0 but still counts in N_img (as DINOv2: the expected weight of
        the term scales with the masking probability)."""
        if patch_mask.ndim != 2 or patch_mask.dtype != torch.bool:
            raise ValueError(f"patch_mask must be a (N_img, N_patch) bool tensor, got {patch_mask.dtype} {tuple(patch_mask.shape)}")
        n_masked = int(patch_mask.sum())
        if student_patch_logits.shape != teacher_probs.shape or student_patch_logits.shape[0] != n_masked:
            raise ValueError(
                f"student {tuple(student_patch_logits.shape)} and teacher {tuple(teacher_probs.shape)} must both be "
                f"(M, K) with M = {n_masked} masked patches"
            )
        log_probs = F.log_softmax(student_patch_logits.float() / self.student_temp, dim=-1)
        per_patch = -(teacher_probs.float() * log_probs).sum(dim=-1)  # (M,)
        per_image_count = patch_mask.sum(dim=1).clamp_min(1).float()  # (N_img,)
        weights = (1.0 / per_image_count)[:, None].expand_as(patch_mask)[patch_mask]  # (M,) in nonzero() order
        # An empty M still yields a 0 connected to the student graph (DDP needs every used parameter).
        return (per_patch * weights).sum() / patch_mask.shape[0]

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """teacher_logits (M, K) at masked patches: center <- m * center + (1 - m) * mean over every rank's
        masked patches. Skipped when no rank had a masked patch (nothing to average)."""
        count = teacher_logits.new_tensor([teacher_logits.shape[0]], dtype=torch.float32)
        stats = torch.cat([teacher_logits.float().sum(dim=0), count])
        if _distributed():
            dist.all_reduce(stats)
        if stats[-1] <= 0:
            return
        batch_center = stats[:-1] / stats[-1]
        self.center.mul_(self.center_momentum).add_(batch_center[None], alpha=1.0 - self.center_momentum)
