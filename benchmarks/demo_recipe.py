"""Which self-distillation recipe makes the demo's encoder learn: single-process DINO on the demo
screen's training fields, one run per setting, each teacher scored with the demo's probe.

    python benchmarks/demo_recipe.py                       # every setting, ~7 min each on 2 cores
    python benchmarks/demo_recipe.py --settings demo no_blur --epochs 12

Same screen (generated into --screen-dir if missing), normalization, model, multi-crop, objective,
DINOv2 schedules and probe as `make demo` (configs/demo.yaml, then each setting's overrides), but in
one process on fields held in memory (no Ray, no DDP: one batch of 64 where the demo runs 2 x 32),
so a setting costs one training run instead of a whole demo. Per setting: the teacher's relative
weight change from its init (relative L2 norm: did the backbone move at all?) and MoA / perturbation
top-1 (mean +- sd over the demo's 5 fixed well splits, wells normalized to their plate's controls) on
the held-out plates of the seen and the unseen channel configuration; the random-init encoder and
intensity statistics are scored once. Writes benchmarks/results/demo_recipe.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch

from cellfm.config import Config, load_config
from cellfm.data.manifest import read_manifest
from cellfm.data.normalize import normalize_field
from cellfm.data.batch import FieldBatch
from cellfm.data.plate import read_field
from cellfm.data.synthetic.screens import generate_screen
from cellfm.evaluate.protocols import evaluate_features
from cellfm.features.embed import IntensityStatistics, field_embedding
from cellfm.models.registry import build_backbone
from cellfm.seeding import Stream, torch_generator
from cellfm.storage import write_file
from cellfm.train.meta_arch import Schedules, SSLMetaArch, build_multicrop

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "demo_recipe.json"
CONFIG = REPO / "configs" / "demo.yaml"
BATCH = 64  # the demo's global batch (2 workers x 32)

# name -> overrides on top of configs/demo.yaml (what each setting changes, in the README's order).
SETTINGS = {
    "dinov2_lr_and_ema": ["optim.base_lr=1e-3", "ssl.ema_momentum_start=0.99", "ssl.ema_momentum_end=1.0",
                          "ssl.blur_probability=0"],
    "lr_1.6e-2_dinov2_ema": ["ssl.ema_momentum_start=0.99", "ssl.ema_momentum_end=1.0", "ssl.blur_probability=0"],
    "no_blur": ["ssl.blur_probability=0"],
    "demo": [],
    "lr_8e-3": ["optim.base_lr=8e-3"],
    "lr_3.2e-2": ["optim.base_lr=3.2e-2"],
    "intensity_jitter_0.2": ["ssl.intensity_jitter=0.2"],
}
# The ceiling: the same architecture and budget trained supervised on MoA (train_supervised).
SUPERVISED = {"supervised_moa": []}


def load_fields(manifest: pd.DataFrame, cfg: Config) -> torch.Tensor:
    """(N, C, H, W) float32 fields normalized as the pipeline does (`data.normalization`)."""
    d = cfg.data
    return torch.from_numpy(np.stack([
        normalize_field(read_field(r.store_uri, r.row, r.col, r.field)[0], d.normalization, clip_low=d.clip_low,
                        clip_high=d.clip_high, clahe_clip_limit=d.clahe_clip_limit, clahe_tiles=d.clahe_tiles)
        for r in manifest.itertuples()]))


def probe(encoder: torch.nn.Module, manifest: pd.DataFrame, fields: torch.Tensor, cfg: Config,
          image_size: int | None = None) -> dict:
    """Top-1 of the demo's fixed-split probe (`cellfm.evaluate.protocols`, protocol `probe`) for each label,
    the fields embedded at `image_size` (default `eval.image_size`)."""
    size = cfg.eval.image_size if image_size is None else image_size
    with torch.no_grad():
        embedding = torch.cat([field_embedding(encoder, fields[i:i + 64], size)
                               for i in range(0, len(fields), 64)]).numpy()
    eval_cfg = dataclasses.replace(cfg.eval, protocols=["probe"])
    block = evaluate_features({"encoder": (manifest, embedding)}, eval_cfg)
    return {label: {"top1": round(s["top1"], 3), "top1_sd": round(s["top1_sd"], 3)}
            for label, s in block["details"]["encoder"]["probe"].items()}


def relative_change(model: torch.nn.Module, init: dict[str, torch.Tensor]) -> float:
    now = model.state_dict()
    moved = sum(float((now[k].float() - v.float()).norm() ** 2) for k, v in init.items())
    return (moved / sum(float(v.float().norm() ** 2) for v in init.values())) ** 0.5


def train_teacher(cfg: Config, train_fields: torch.Tensor, channel_names: list[str], log,
                  after_epoch: Callable[[int, int, torch.nn.Module], None]) -> tuple[torch.nn.Module, float]:
    """The training step of every run (cellfm.train.meta_arch.SSLMetaArch) on one process, one batch of
    BATCH per step (the config's batch_size_per_worker must be BATCH: it sets the schedules' global batch).
    `after_epoch(epoch, steps_done, teacher_backbone)` runs after every epoch (the learning curve)."""
    steps_per_epoch = len(train_fields) // BATCH
    meta_arch = SSLMetaArch(cfg, steps_per_epoch=steps_per_epoch, rank=0, world_size=1, device=torch.device("cpu"),
                            prepare_model=lambda model: model)
    teacher = meta_arch.teacher
    init = {k: v.clone() for k, v in teacher.backbone.state_dict().items()}
    step = 0
    for epoch in range(cfg.optim.epochs):
        for index in epoch_batches(cfg, len(train_fields), epoch):
            losses = meta_arch.forward_backward(FieldBatch(train_fields[index], [list(channel_names)] * BATCH),
                                                epoch=epoch, step=step, micro=0)
            meta_arch.optimizer_step(step)
            step += 1
        log(f"  epoch {epoch + 1}/{cfg.optim.epochs} loss {losses.total.item():.3f}")
        after_epoch(epoch, step, teacher.backbone)
    return teacher.backbone.eval(), relative_change(teacher.backbone, init)


def epoch_batches(cfg: Config, n_fields: int, epoch: int) -> Iterator[torch.Tensor]:
    """The indices of the epoch's batches of BATCH fields, in an order seeded by (train.seed, epoch)."""
    order = torch.randperm(n_fields, generator=torch_generator(cfg.train.seed, Stream.FIELD_ORDER, epoch))
    for i in range(n_fields // BATCH):
        yield order[i * BATCH:(i + 1) * BATCH]


def train_supervised(cfg: Config, train_fields: torch.Tensor, labels: torch.Tensor, log,
                     after_epoch: Callable[[int, int, torch.nn.Module], None]) -> tuple[torch.nn.Module, float]:
    """The ceiling: the same backbone, budget (steps, batch, epochs' field order), global crops (the step's
    own multi-crop, seeded alike) and lr / weight-decay schedules, trained with a linear MoA classifier on its
    CLS token (cross-entropy on both global crops) instead of self-distillation."""
    steps_per_epoch = len(train_fields) // BATCH
    torch.manual_seed(cfg.train.seed)
    backbone = build_backbone(cfg.model)
    classifier = torch.nn.Linear(backbone.embed_dim, int(labels.max()) + 1)
    init = {k: v.clone() for k, v in backbone.state_dict().items()}
    schedules = Schedules(cfg, steps_per_epoch, BATCH)
    optimizer = torch.optim.AdamW([*backbone.parameters(), *classifier.parameters()])
    multicrop = build_multicrop(cfg)
    step = 0
    for epoch in range(cfg.optim.epochs):
        for index in epoch_batches(cfg, len(train_fields), epoch):
            crops, _ = multicrop(train_fields[index], generator=torch_generator(cfg.train.seed, Stream.CROPS, epoch,
                                                                                 0, step, 0))
            logits = classifier(backbone(crops.flatten(0, 1))["cls"])
            loss = torch.nn.functional.cross_entropy(logits, labels[index].repeat(crops.shape[0]))
            for group in optimizer.param_groups:
                group["lr"], group["weight_decay"] = float(schedules.lr[step]), float(schedules.wd[step])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([*backbone.parameters(), *classifier.parameters()], cfg.optim.clip_grad)
            optimizer.step()
            step += 1
        log(f"  epoch {epoch + 1}/{cfg.optim.epochs} cross-entropy {loss.item():.3f}")
        after_epoch(epoch, step, backbone)
    return backbone.eval(), relative_change(backbone, init)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS | SUPERVISED), default=list(SETTINGS))
    parser.add_argument("--epochs", type=int, default=None, help="override optim.epochs (default: the demo's)")
    parser.add_argument("--eval-sizes", type=int, nargs="+", default=None,
                        help="field sizes to embed at for the probe (0 = native; default: eval.image_size)")
    parser.add_argument("--curve-every", type=int, default=0,
                        help="also probe every N epochs (the learning curve; 0 = only at the end)")
    parser.add_argument("--screen-dir", default=str(REPO / "demo_output" / "screen"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.curve_every < 0 or (args.epochs is not None and args.epochs < 1):
        parser.error("--curve-every must be >= 0 and --epochs >= 1")
    torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(f"[demo_recipe {time.strftime('%H:%M:%S')}] {message}", flush=True)

    common = [f"optim.batch_size_per_worker={BATCH}", *([] if args.epochs is None else [f"optim.epochs={args.epochs}"])]
    base = load_config(CONFIG, common)
    eval_sizes = args.eval_sizes or [base.eval.image_size]
    manifests = generate_screen(Path(args.screen_dir).resolve(), base.data.synthetic_layout, base.data.synthetic_seed)
    frames = {split: read_manifest(path) for split, path in manifests.items()}
    fields = {split: load_fields(frame, base) for split, frame in frames.items()}
    moa_classes = sorted(set(frames["train"]["moa"]))
    moa_labels = torch.tensor([moa_classes.index(m) for m in frames["train"]["moa"]])
    log(f"{len(fields['train'])} training fields, {BATCH} per step")
    heldout = {"seen": "heldout", "unseen": "unseen"}

    def scores(encoder, image_size: int) -> dict:
        return {name: probe(encoder, frames[split], fields[split], base, image_size) for name, split in heldout.items()}

    def by_size(encoder) -> dict:
        return {str(size): scores(encoder, size) for size in eval_sizes}

    torch.manual_seed(base.eval.random_init_seed)
    random_init = build_backbone(base.model).eval()
    results = {"config": str(CONFIG.relative_to(REPO)), "epochs": base.optim.epochs, "batch": BATCH,
               "steps": base.optim.epochs * (len(fields["train"]) // BATCH), "threads": args.threads,
               "eval_sizes": eval_sizes, "python": sys.version.split()[0], "torch": torch.__version__,
               "machine": platform.machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "baselines": {"random_init": by_size(random_init), "intensity_stats": scores(IntensityStatistics(), 0)},
               "settings": {}}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    for name in args.settings:
        overrides = (SETTINGS | SUPERVISED)[name]
        cfg = load_config(CONFIG, overrides + common)
        log(f"{name}: {' '.join(overrides) or 'configs/demo.yaml as is'}")
        curve: list[dict] = []

        def after_epoch(epoch: int, steps: int, backbone: torch.nn.Module) -> None:
            if args.curve_every and (epoch + 1) % args.curve_every == 0 and epoch + 1 < cfg.optim.epochs:
                curve.append({"epoch": epoch + 1, "steps": steps, **scores(backbone.eval(), eval_sizes[0])})
                backbone.train()
                log(f"  curve at {steps} steps: " + ", ".join(
                    f"{k} MoA {curve[-1][k]['moa']['top1']:.3f}" for k in heldout))

        started = time.perf_counter()
        if name in SUPERVISED:
            encoder, moved = train_supervised(cfg, fields["train"], moa_labels, log, after_epoch)
        else:
            encoder, moved = train_teacher(cfg, fields["train"], list(frames["train"]["channel_names"].iloc[0]), log,
                                           after_epoch)
        seconds = round(time.perf_counter() - started, 1)
        final = by_size(encoder)
        if curve:
            curve.append({"epoch": cfg.optim.epochs, "steps": results["steps"], **final[str(eval_sizes[0])]})
        results["settings"][name] = {"overrides": overrides, "teacher_relative_weight_change": round(moved, 4),
                                     "train_seconds": seconds, **final[str(eval_sizes[0])],
                                     "by_eval_size": final, "curve": curve}
        for size, result in final.items():
            log(f"{name}: moved {moved:.3f}, eval size {size}: " + ", ".join(
                f"{k} MoA {result[k]['moa']['top1']:.3f} pert {result[k]['perturbation_id']['top1']:.3f}"
                for k in heldout))
        # After every setting, write then rename: a long sweep that dies keeps what it measured.
        write_file(output, json.dumps(results, indent=2) + "\n")
        log(f"wrote {output}")
    return results


if __name__ == "__main__":
    main()
