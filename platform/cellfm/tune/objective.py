"""A sweep's objective, computed inside each trial at every epoch report (or, `objective.evaluate: last_epoch`,
at the last one only): the well-level probe on held-out plates (by default including a channel configuration
training never saw), not the SSL loss.

The sweep's driver reads the held-out fields once (`read_held_out`, through the same Ray Data read and
normalization as evaluation) and puts them in Ray's object store. Each trial's training loop calls a
`HeldOutObjective` on rank 0 after every epoch with its teacher's backbone (Ray Tune's report callback
forwards rank 0's metrics only): it embeds the fields (`cellfm.features.embed.field_embedding`, read out as
eval.channel_readout says), averages them per well and scores the probe of `objective.protocol`
(`cellfm.evaluate.protocols.PROBE_PROTOCOLS`: fixed splits, per plate, or leave one plate out), and returns

    objective             the mean over the held-out sets of `objective.score` of `objective.label`
    objective/<set>       each set's score
    forward_flops_per_image  FLOPs of one forward pass on a field of the first set (counted once)
    eval_s                seconds this evaluation took

beside the loop's own `loss` and `images_per_s`, so a sweep's table shows quality against cost.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cellfm.config import Config


@dataclass(frozen=True)
class HeldOutFields:
    """One held-out manifest's fields as the trials embed them: normalized images (N, C, H, W) float16 with
    their channel names and mask (padded channels False), and per field the manifest columns the well
    aggregation and the probe need. Sorted by (plate, well, field)."""

    name: str
    images: np.ndarray
    channel_names: list[list[str]]
    channel_mask: np.ndarray
    fields: pd.DataFrame


def read_held_out(cfg: Config, manifests: dict[str, str], label: str) -> dict[str, HeldOutFields]:
    """The fields of each named manifest (local or s3://), read and normalized with `cfg.data` by Ray Data
    (call after `init_ray`)."""
    from cellfm.data.pipeline.dataset import build_field_dataset, load_manifests
    from cellfm.data.pipeline.layout import CHANNEL_SEPARATOR
    from cellfm.features.embed import METADATA_COLUMNS

    keep = list(dict.fromkeys([*METADATA_COLUMNS, label]))
    sets = {}
    for name, path in manifests.items():
        manifest = load_manifests([path], storage_options=cfg.data.storage_options or None)
        batches = list(build_field_dataset(manifest, cfg.data, training=False, keep_columns=keep)
                       .iter_batches(batch_size=256, batch_format="numpy"))
        fields = pd.DataFrame({col: np.concatenate([b[col] for b in batches]) for col in keep})
        # Ray Data may deliver blocks in any order: sort, so every trial sees the same fields in the same order.
        order = np.lexsort((fields["field"].to_numpy(), fields["well"].to_numpy(), fields["plate"].to_numpy()))
        images = np.concatenate([b["image"] for b in batches])[order]
        names = np.concatenate([b["channel_names"] for b in batches])[order]
        sets[name] = HeldOutFields(
            name=name, images=images, channel_names=[str(n).split(CHANNEL_SEPARATOR) for n in names],
            channel_mask=np.concatenate([b["channel_mask"] for b in batches])[order],
            fields=fields.iloc[order].reset_index(drop=True))
    return sets


class HeldOutObjective:
    """The per-epoch evaluator of a trial (see the module's docstring). `held_out`: the driver's
    `read_held_out` result, or an ObjectRef of it (fetched on first use, on rank 0 only); `cfg`: the trial's
    config (eval.* sets the probe: well_normalization, test_fraction, split_seed, n_splits, batch_size,
    image_size, channel_readout; optim.epochs the last epoch); `evaluate`: every_epoch or last_epoch."""

    def __init__(self, held_out, cfg: Config, label: str, score: str, protocol: str = "probe",
                 evaluate: str = "every_epoch"):
        self.held_out = held_out
        self.cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, labels=[label]))
        self.label = label
        self.score = score
        self.protocol = protocol
        self.evaluate = evaluate
        self.flops_per_image: float | None = None

    def evaluates(self, epoch: int) -> bool:
        """Whether the objective is computed after this (0-based) epoch."""
        return self.evaluate == "every_epoch" or epoch + 1 >= self.cfg.optim.epochs

    def __call__(self, backbone, epoch: int) -> dict[str, float]:
        from cellfm.evaluate.protocols import PROBE_PROTOCOLS
        from cellfm.evaluate.wells import well_profiles

        if not self.evaluates(epoch):
            return {}
        started = time.perf_counter()
        sets = self._sets()
        was_training = backbone.training
        backbone.eval()
        try:
            if self.flops_per_image is None:
                self.flops_per_image = self._flops_per_image(backbone, next(iter(sets.values())))
            scores = {}
            for name, held_out in sets.items():
                profiles = well_profiles(held_out.fields, self._embed(backbone, held_out),
                                         self.cfg.eval.well_normalization, [self.label], source=name)
                probe = PROBE_PROTOCOLS[self.protocol](profiles, self.label, self.cfg.eval)
                if "skipped" in probe:
                    raise ValueError(f"objective on {name}: {probe['skipped']}")
                scores[f"objective/{name}"] = probe[self.score]
        finally:
            backbone.train(was_training)
        metrics = {"objective": float(np.mean(list(scores.values()))), **scores,
                   "forward_flops_per_image": self.flops_per_image, "eval_s": time.perf_counter() - started}
        sys.stdout.write(f"[cellfm] objective {metrics['objective']:.4f} ("
                         + ", ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in scores.items())
                         + f"; {self.label} {self.score}, {self.protocol}) in {metrics['eval_s']:.1f} s\n")
        sys.stdout.flush()
        return metrics

    def _sets(self) -> dict[str, HeldOutFields]:
        if not isinstance(self.held_out, dict):
            import ray

            self.held_out = ray.get(self.held_out)
        return self.held_out

    def _embed(self, backbone, held_out: HeldOutFields, limit: int | None = None) -> np.ndarray:
        """(N, 2D) field embeddings of the first `limit` (default: all) fields, as evaluation embeds them."""
        import torch

        from cellfm.data.pipeline.batches import to_float_images
        from cellfm.features.embed import field_embedding

        device = next(backbone.parameters()).device
        n = len(held_out.images) if limit is None else limit
        batch = self.cfg.eval.batch_size
        out = []
        with torch.inference_mode():
            for start in range(0, n, batch):
                part = slice(start, min(start + batch, n))
                images = to_float_images(held_out.images[part]).to(device)
                mask = torch.from_numpy(held_out.channel_mask[part]).to(device)
                out.append(field_embedding(backbone, images, self.cfg.eval.image_size, held_out.channel_names[part],
                                           mask, self.cfg.eval.channel_readout).float().cpu().numpy())
        return np.concatenate(out)

    def _flops_per_image(self, backbone, held_out: HeldOutFields) -> float:
        """FLOPs of embedding one field of `held_out` (its channels and size; eval.image_size applies),
        counted with torch.utils.flop_counter: the forward pass's cost at inference."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            self._embed(backbone, held_out, limit=1)
        return float(counter.get_total_flops())
