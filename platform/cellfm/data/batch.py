"""The typed batch the training step takes (`FieldBatch`): light on purpose, so the step's owner
(`cellfm.train.meta_arch`) and in-memory training import it without the Ray Data pipeline."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FieldBatch:
    """What the training step (``cellfm.train.meta_arch.SSLMetaArch``) takes per micro-batch: images on
    the training device, each sample's channel names in channel order ("" for padding), which channels
    are real (None when no sample is padded) and the per-sample weak labels. Checked on creation."""

    images: torch.Tensor  # (B, C, H, W) float32
    channel_names: list[list[str]]
    channel_mask: torch.Tensor | None = None  # (B, C) bool, True = real channel
    labels: list[str] | None = None  # per sample, the weak label column (ssl.supcon_label) when carried

    def __post_init__(self):
        if self.images.ndim != 4 or not self.images.is_floating_point():
            raise ValueError(f"FieldBatch.images must be float (B, C, H, W), got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        B, C = self.images.shape[:2]
        if len(self.channel_names) != B or any(len(names) != C for names in self.channel_names):
            raise ValueError(f"FieldBatch.channel_names must be {B} lists of {C} names, got "
                             f"{[len(names) for names in self.channel_names]}")
        mask = self.channel_mask
        if mask is not None:
            if mask.shape != (B, C) or mask.dtype != torch.bool:
                raise ValueError(f"FieldBatch.channel_mask must be a ({B}, {C}) bool tensor, got {mask.dtype} "
                                 f"{tuple(mask.shape)}")
            if not bool(mask.any(dim=1).all()):
                raise ValueError("FieldBatch.channel_mask has a sample with no real channel")
        if self.labels is not None and len(self.labels) != B:
            raise ValueError(f"FieldBatch.labels has {len(self.labels)} labels for {B} samples")

    @property
    def real_channels(self) -> torch.Tensor:
        """(B, C) bool, True = real channel (all True when nothing is padded)."""
        if self.channel_mask is not None:
            return self.channel_mask
        return torch.ones(self.images.shape[:2], dtype=torch.bool, device=self.images.device)
