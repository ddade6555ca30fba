"""The supervised ceiling: a small CNN trained on a configuration's training plates with their labels.

What a model reaches when it is *told* the label on plates like the test ones: a screen whose
supervised CNN stays near chance carries no learnable label at that size, whatever an encoder
does. The CNN reads whole fields (all channels at once); its penultimate activations, averaged per
well, are the features the same well-level probe scores, so it is compared with encoders on equal
terms. CPU-cheap (about a minute for a few hundred 128-px fields) and deterministic given the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class CNNSettings:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    width: int = 32        # channels of the first block; doubled by each of the next two
    seed: int = 0


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU-pool blocks, global average pooling, a linear classifier.

    ``forward`` returns ``{"features": (N, 4 * width), "logits": (N, n_classes)}``."""

    def __init__(self, in_channels: int, n_classes: int, width: int = 32):
        super().__init__()
        blocks, channels = [], in_channels
        for out in (width, 2 * width, 4 * width):
            blocks += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(),
                       nn.Conv2d(out, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            channels = out
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, n_classes)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        features = self.body(images).mean(dim=(2, 3))
        return {"features": features, "logits": self.head(features)}


def _dihedral(images: Tensor, generator: torch.Generator) -> Tensor:
    """Each image under a random one of the 8 flips/rotations (labels do not depend on orientation)."""
    k = torch.randint(0, 4, (len(images),), generator=generator)
    flip = torch.randint(0, 2, (len(images),), generator=generator).bool()
    out = torch.stack([torch.rot90(img, int(r), dims=(1, 2)) for img, r in zip(images, k)])
    out[flip] = out[flip].flip(-1)
    return out


def train_supervised_cnn(fields: Tensor, labels: list[str], settings: CNNSettings = CNNSettings()
                         ) -> tuple[SmallCNN, list[str]]:
    """A `SmallCNN` trained on ``fields`` (N, C, H, W) normalized as the pipeline does, with one
    label per field; returns it (in eval mode) and its class names. Same inputs + seed = same weights."""
    classes = sorted(set(labels))
    targets = torch.tensor([classes.index(label) for label in labels])
    torch.manual_seed(settings.seed)
    model = SmallCNN(fields.shape[1], len(classes), settings.width)
    generator = torch.Generator().manual_seed(settings.seed)
    steps_per_epoch = max(1, len(fields) // settings.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=settings.epochs * steps_per_epoch)
    model.train()
    for _ in range(settings.epochs):
        order = torch.randperm(len(fields), generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * settings.batch_size:(step + 1) * settings.batch_size]
            loss = nn.functional.cross_entropy(model(_dihedral(fields[index], generator))["logits"], targets[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval(), classes


@torch.no_grad()
def cnn_field_features(model: SmallCNN, fields: Tensor, batch_size: int = 64) -> np.ndarray:
    """(N, D) penultimate features of ``fields``."""
    return torch.cat([model(fields[i:i + batch_size])["features"] for i in range(0, len(fields), batch_size)]).numpy()


def cnn_well_features(model: SmallCNN, fields: Tensor, manifest: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """(`cellfm.evaluate.ceilings.well_meta`, (wells, D)): the CNN's features of the manifest's
    fields (``fields`` in manifest order) averaged per well."""
    from cellfm.evaluate.ceilings import WELL_KEYS, well_meta

    per_field = pd.DataFrame(cnn_field_features(model, fields))
    per_field[WELL_KEYS] = manifest[WELL_KEYS].to_numpy()
    meta = well_meta(manifest)
    wells = per_field.groupby(WELL_KEYS).mean().reindex(pd.MultiIndex.from_frame(meta[WELL_KEYS]))
    return meta, wells.to_numpy(np.float64)
