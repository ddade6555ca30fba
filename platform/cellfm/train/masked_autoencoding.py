"""The masked-autoencoding objective (`ssl.objective: mae`, model `ca_mae`; Phenom's channel-agnostic MAE): every
global crop is standardized per channel, a random `ssl.mae_mask_ratio` of its L*C patch tokens is hidden, the
encoder sees the rest, a light decoder predicts every patch of every channel, and the loss is the masked-patch
MSE plus Phenom's Fourier term (`cellfm.ssl.mae_loss`).

It runs in the same training step as the self-distillation objectives (`cellfm.train.meta_arch.SSLMetaArch`):
the step draws the crops and the token masks (`StepViews.token_mask`) from its position, the student
(`MaskedAutoencoder`) is called once; the teacher is not used (the step copies the student into it after every
optimizer step, so the checkpoint's inference backbone is the trained encoder)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cellfm.config import Config
from cellfm.models.ca_mae import ChannelAgnosticMAE, self_standardize
from cellfm.models.layers import grid_of, zero_padding
from cellfm.models.mae_decoder import MAEDecoder
from cellfm.ssl.mae_loss import MAELoss, patchify
from cellfm.train.self_distillation import StepLosses, StepViews, per_view


class MaskedAutoencoder(nn.Module):
    """CA-MAE encoder (`backbone`, what evaluation embeds with) + MAE decoder: the student of `ssl.objective: mae`."""

    def __init__(self, backbone: ChannelAgnosticMAE, decoder: MAEDecoder):
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder

    def forward(self, images: Tensor, *, channel_mask: Tensor | None, token_mask: Tensor) -> dict[str, Tensor]:
        """images (N, C, H, W); channel_mask (N, C) bool or None; token_mask (N, C, L) bool, True = hidden from
        the encoder. Returns {"prediction": (N, C, L, p * p) predicted pixels of every token}."""
        encoded = self.backbone.encode_visible(images, channel_mask, token_mask)
        grid = grid_of(images.shape[-2:], self.backbone.patch_size)
        prediction = self.decoder(encoded["cls"], encoded["visible"], encoded["visible_index"], encoded["visible_mask"],
                                  channel_mask, images.shape[1], grid)
        return {"prediction": prediction}


def build_masked_autoencoder(cfg: Config, backbone: nn.Module) -> MaskedAutoencoder:
    if not isinstance(backbone, ChannelAgnosticMAE):
        raise ValueError(f"ssl.objective=mae needs model.name=ca_mae, got {cfg.model.name}")
    s = cfg.ssl
    decoder = MAEDecoder(backbone.embed_dim, s.mae_decoder_dim, s.mae_decoder_depth, s.mae_decoder_heads,
                         backbone.patch_size)
    return MaskedAutoencoder(backbone, decoder)


class MAEObjective(nn.Module):
    """Loss of one micro-batch: global crops (G, B, C, g, g) with token masks (G, B, C, L), each crop a sample.
    Terms: mse (masked patches), fourier, mask_ratio (hidden fraction of the real tokens)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.patch_size = cfg.model.patch_size
        self.loss = MAELoss(cfg.model.patch_size, cfg.ssl.mae_fourier_weight)
        # No teacher centers: the checkpoint's dino_loss.safetensors is empty for MAE.
        self.centers = nn.ModuleDict()

    @property
    def dino_loss(self) -> nn.Module:
        """The teacher-center buffers the checkpoint stores (none)."""
        return self.centers

    def forward(self, student: nn.Module, teacher: nn.Module, views: StepViews, teacher_temp: float) -> StepLosses:
        """`views.token_mask` is required; the teacher and teacher_temp are not used."""
        if views.token_mask is None:
            raise ValueError("the mae objective needs the global crops' token masks (views.token_mask)")
        if views.local_crops is not None:
            raise ValueError("the mae objective reconstructs global crops only; got local crops")
        crops = views.global_crops
        n_global = crops.shape[0]
        images = crops.flatten(0, 1)
        channel_mask = per_view(views.student_channels, n_global)
        token_mask = views.token_mask.flatten(0, 1)
        out = student(images, channel_mask=channel_mask, token_mask=token_mask)
        with torch.no_grad():
            target = patchify(self_standardize(zero_padding(images, channel_mask)), self.patch_size)
        grid = grid_of(images.shape[-2:], self.patch_size)
        total, mse, fourier = self.loss(out["prediction"], target, token_mask, channel_mask, grid)
        real = token_mask.new_ones(token_mask.shape[:2]) if channel_mask is None else channel_mask
        hidden = (token_mask & real[:, :, None]).sum() / (real.sum() * token_mask.shape[-1])
        return StepLosses(total=total, terms={"mse": mse, "fourier": fourier, "mask_ratio": hidden.float()})
