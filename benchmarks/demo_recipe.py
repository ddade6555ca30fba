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

import numpy as np
import pandas as pd
import torch

from cellfm.config import Config, load_config
from cellfm.data.manifest import read_manifest
from cellfm.data.normalize import normalize_field
from cellfm.data.pipeline import FieldBatch
from cellfm.data.plate import read_field
from cellfm.data.synthetic import generate_screen
from cellfm.evaluate.protocols import evaluate_features
from cellfm.features.embed import IntensityStatistics, field_embedding
from cellfm.models.registry import build_backbone
from cellfm.seeding import Stream, torch_generator
from cellfm.train.meta_arch import SSLMetaArch

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


def load_fields(manifest: pd.DataFrame, cfg: Config) -> torch.Tensor:
    """(N, C, H, W) float32 fields normalized as the pipeline does (`data.normalization`)."""
    d = cfg.data
    return torch.from_numpy(np.stack([
        normalize_field(read_field(r.store_uri, r.row, r.col, r.field)[0], d.normalization, clip_low=d.clip_low,
                        clip_high=d.clip_high, clahe_clip_limit=d.clahe_clip_limit, clahe_tiles=d.clahe_tiles)
        for r in manifest.itertuples()]))


def probe(encoder: torch.nn.Module, manifest: pd.DataFrame, fields: torch.Tensor, cfg: Config) -> dict:
    """Top-1 of the demo's fixed-split probe (`cellfm.evaluate.protocols`, protocol `probe`) for each label."""
    with torch.no_grad():
        embedding = torch.cat([field_embedding(encoder, fields[i:i + 64], cfg.eval.image_size)
                               for i in range(0, len(fields), 64)]).numpy()
    eval_cfg = dataclasses.replace(cfg.eval, protocols=["probe"])
    block = evaluate_features({"encoder": (manifest, embedding)}, eval_cfg)
    return {label: {"top1": round(s["top1"], 3), "top1_sd": round(s["top1_sd"], 3)}
            for label, s in block["details"]["encoder"]["probe"].items()}


def relative_change(model: torch.nn.Module, init: dict[str, torch.Tensor]) -> float:
    now = model.state_dict()
    moved = sum(float((now[k].float() - v.float()).norm() ** 2) for k, v in init.items())
    return (moved / sum(float(v.float().norm() ** 2) for v in init.values())) ** 0.5


def train_teacher(cfg: Config, train_fields: torch.Tensor, channel_names: list[str], log
                  ) -> tuple[torch.nn.Module, float]:
    """The training step of every run (cellfm.train.meta_arch.SSLMetaArch) on one process, one batch of
    BATCH per step (the config's batch_size_per_worker must be BATCH: it sets the schedules' global batch)."""
    steps_per_epoch = len(train_fields) // BATCH
    meta_arch = SSLMetaArch(cfg, steps_per_epoch=steps_per_epoch, rank=0, world_size=1, device=torch.device("cpu"),
                            prepare_model=lambda model: model)
    teacher = meta_arch.teacher
    init = {k: v.clone() for k, v in teacher.backbone.state_dict().items()}
    step = 0
    for epoch in range(cfg.optim.epochs):
        order = torch.randperm(len(train_fields), generator=torch_generator(cfg.train.seed, Stream.FIELD_ORDER, epoch))
        for i in range(steps_per_epoch):
            batch = FieldBatch(train_fields[order[i * BATCH:(i + 1) * BATCH]], [list(channel_names)] * BATCH)
            losses = meta_arch.forward_backward(batch, epoch=epoch, step=step, micro=0)
            meta_arch.optimizer_step(step)
            step += 1
        log(f"  epoch {epoch + 1}/{cfg.optim.epochs} loss {losses.total.item():.3f}")
    return teacher.backbone.eval(), relative_change(teacher.backbone, init)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--epochs", type=int, default=None, help="override optim.epochs (default: the demo's)")
    parser.add_argument("--screen-dir", default=str(REPO / "demo_output" / "screen"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(f"[demo_recipe {time.strftime('%H:%M:%S')}] {message}", flush=True)

    common = [f"optim.batch_size_per_worker={BATCH}", *([] if args.epochs is None else [f"optim.epochs={args.epochs}"])]
    base = load_config(CONFIG, common)
    manifests = generate_screen(Path(args.screen_dir).resolve(), base.data.synthetic_layout, base.data.synthetic_seed)
    frames = {split: read_manifest(path) for split, path in manifests.items()}
    fields = {split: load_fields(frame, base) for split, frame in frames.items()}
    log(f"{len(fields['train'])} training fields, {BATCH} per step")
    heldout = {"seen": "heldout", "unseen": "unseen"}

    def scores(encoder) -> dict:
        return {name: probe(encoder, frames[split], fields[split], base) for name, split in heldout.items()}

    torch.manual_seed(base.eval.random_init_seed)
    results = {"config": str(CONFIG.relative_to(REPO)), "epochs": base.optim.epochs, "batch": BATCH,
               "steps": base.optim.epochs * (len(fields["train"]) // BATCH), "threads": args.threads,
               "python": sys.version.split()[0], "torch": torch.__version__, "machine": platform.machine(),
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "baselines": {"random_init": scores(build_backbone(base.model).eval()),
                             "intensity_stats": scores(IntensityStatistics())}, "settings": {}}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    for name in args.settings:
        cfg = load_config(CONFIG, SETTINGS[name] + common)
        log(f"{name}: {' '.join(SETTINGS[name]) or 'configs/demo.yaml as is'}")
        started = time.perf_counter()
        teacher, moved = train_teacher(cfg, fields["train"], list(frames["train"]["channel_names"].iloc[0]), log)
        results["settings"][name] = {"overrides": SETTINGS[name], "teacher_relative_weight_change": round(moved, 4),
                                     "train_seconds": round(time.perf_counter() - started, 1), **scores(teacher)}
        log(f"{name}: moved {moved:.3f}, " + ", ".join(
            f"{k} MoA {v['moa']['top1']:.3f}" for k, v in results["settings"][name].items() if k in heldout))
        # After every setting, write then rename: a long sweep that dies keeps what it measured.
        partial = output.with_suffix(".json.tmp")
        partial.write_text(json.dumps(results, indent=2) + "\n")
        partial.replace(output)
        log(f"wrote {output}")
    return results


if __name__ == "__main__":
    main()
