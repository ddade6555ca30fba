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
    epochs: int = 50
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    width: int = 16        # channels of the stem and first block; doubled by each of the next two
    crop: int = 64         # px: training sees one random crop per field per epoch (0: whole fields)
    seed: int = 0


class SmallCNN(nn.Module):
    """A stride-2 stem, three blocks of two conv-BN-ReLU (the first two followed by 2x max-pooling),
    global average pooling, a linear classifier. The stem halves the resolution at once: most of a
    CNN's cost is at full resolution, and 2-px detail (nucleoli, puncta) survives a strided 3x3 conv.

    ``forward`` returns ``{"features": (N, 4 * width), "logits": (N, n_classes)}``."""

    def __init__(self, in_channels: int, n_classes: int, width: int = 16):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False),
                                   nn.BatchNorm2d(width), nn.ReLU()]
        channels = width
        for out, pool in ((width, True), (2 * width, True), (4 * width, False)):
            blocks += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(),
                       nn.Conv2d(out, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            blocks += [nn.MaxPool2d(2)] if pool else []
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


def _random_crops(images: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """One random ``size`` x ``size`` crop of each image (whole images if ``size`` is 0 or too big)."""
    height, width = images.shape[-2:]
    if not size or size >= min(height, width):
        return images
    ys = torch.randint(0, height - size + 1, (len(images),), generator=generator).tolist()
    xs = torch.randint(0, width - size + 1, (len(images),), generator=generator).tolist()
    return torch.stack([img[:, y:y + size, x:x + size] for img, y, x in zip(images, ys, xs)])


def train_supervised_cnn(fields: Tensor, labels: list[str], settings: CNNSettings = CNNSettings()
                         ) -> tuple[SmallCNN, list[str]]:
    """A `SmallCNN` trained on ``fields`` (N, C, H, W) normalized as the pipeline does, with one
    label per field; returns it (in eval mode) and its class names. Same inputs + seed = same weights.
    Training sees random crops (a well's label holds in every part of its fields: most cells respond),
    which costs a quarter of whole 128-px fields; features are read from whole fields."""
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
            images = _dihedral(_random_crops(fields[index], settings.crop, generator), generator)
            loss = nn.functional.cross_entropy(model(images)["logits"], targets[index])
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
    """(`cellfm.data.manifest.well_meta`, (wells, D)): the CNN's features of the manifest's
    fields (``fields`` in manifest order) averaged per well."""
    from cellfm.data.manifest import WELL_KEYS, well_meta

    per_field = pd.DataFrame(cnn_field_features(model, fields))
    per_field[WELL_KEYS] = manifest[WELL_KEYS].to_numpy()
    meta = well_meta(manifest)
    wells = per_field.groupby(WELL_KEYS).mean().reindex(pd.MultiIndex.from_frame(meta[WELL_KEYS]))
    return meta, wells.to_numpy(np.float64)
