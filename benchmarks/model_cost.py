"""Compute cost of the backbones vs the number of input channels C.

For ViT-S/16 (C-channel patch embedding, the reference), CellRep (2-block channel mixer) and its cheaper or
stain-keeping variants (VARIANTS: channel-axial mixer, pooling after 1 mixer block, attention pooling), C3R
(and with attention pooling), ChannelViT, DiChaViT and CA-MAE, all at `small` size (D=384, 12 blocks, 6 heads),
224x224, patch 16 (CA-MAE twice: its encoder at inference, over all L*C tokens, and in pre-training, over the
quarter of them its 0.75 masking leaves visible; the MAE decoder is not counted):
  * parameters, and forward FLOPs per image, counted with torch.utils.flop_counter.FlopCounterMode
    (2 FLOPs per MAC; matmuls, convolutions and attention), for C = 1, 2, 3, 4, 5, 8, 12, 16;
    Attention is counted by running F.scaled_dot_product_attention on its math backend while counting
    (the fused CPU kernel has no FLOP formula in torch 2.13 and would count as 0);
  * CPU forward+backward time per image (batch 1, best of --repeats runs; the FLOP-counting forward
    warms up) for C in --time-channels (default 1, 3, 5, 8, 16, to stay within ~5 minutes on 2 cores).
    Reported twice: `cpu_ms`, the process CPU time (time.process_time) with --threads 1 by default, which
    stays meaningful on a shared, oversubscribed machine, and `wall_ms`. The FLOPs are exact.
Writes benchmarks/results/model_cost.json and model_cost.png.

    python benchmarks/model_cost.py [--repeats 2] [--threads 2] [--time-channels 1 3 5 8 16] [--no-time]
"""

from __future__ import annotations

import argparse
import json
import os
import platform as py_platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from torch import nn

from cellfm.models.c3r import C3R
from cellfm.models.ca_mae import ChannelAgnosticMAE
from cellfm.models.cellrep import CellRep
from cellfm.models.channelvit import ChannelViT
from cellfm.models.dichavit import DiChaViT
from cellfm.models.registry import SIZES
from cellfm.models.vit import VisionTransformer
from cellfm.ssl.token_masking import random_token_mask

CHANNELS = [1, 2, 3, 4, 5, 8, 12, 16]
IMG, PATCH = 224, 16
NAMES = [f"ch{i:02d}" for i in range(16)]
RESULTS = Path(__file__).resolve().parent / "results"


def channel_names(C: int) -> list[str]:
    return NAMES[:C]


def c3r_groups(C: int) -> dict[str, str]:
    """Last channel is the concept, the rest context (C = 1: context only, the concept group is absent)."""
    if C == 1:
        return {NAMES[0]: "context"}
    return {n: ("concept" if i == C - 1 else "context") for i, n in enumerate(NAMES[:C])}


class MaskedPretrainingEncoder(nn.Module):
    """CA-MAE's encoder as pre-training runs it: on the visible tokens of a fixed 0.75 random token mask."""

    def __init__(self, encoder: ChannelAgnosticMAE, mask_ratio: float = 0.75):
        super().__init__()
        self.encoder = encoder
        self.mask_ratio = mask_ratio

    def forward(self, x: torch.Tensor, channel_names=None) -> dict[str, torch.Tensor]:
        L = (x.shape[-2] // PATCH) * (x.shape[-1] // PATCH)
        valid = torch.ones(x.shape[:2], dtype=torch.bool)
        mask = random_token_mask(valid, L, self.mask_ratio, torch.Generator().manual_seed(0))
        out = self.encoder.encode_visible(x, None, mask)
        return {"cls": out["cls"], "patch": out["visible"]}


# Variants of CellRep and C3R: model name -> (the base model, its constructor options = config `model.*` keys).
VARIANTS: dict[str, tuple[str, dict]] = {
    "cellrep_axial": ("cellrep", {"channel_mixer": "axial"}),
    "cellrep_pool_after_1": ("cellrep", {"channel_pool_after": 1}),
    "cellrep_attention_pool": ("cellrep", {"channel_pooling": "attention"}),
    "cellrep_axial_attention_pool": ("cellrep", {"channel_mixer": "axial", "channel_pooling": "attention"}),
    "c3r_attention_pool": ("c3r", {"channel_pooling": "attention"}),
}


def build(model: str, C: int) -> torch.nn.Module:
    s = SIZES["small"]
    common = dict(img_size=IMG, patch_size=PATCH, embed_dim=s.embed_dim, depth=s.depth, num_heads=s.num_heads)
    model, options = VARIANTS.get(model, (model, {}))
    torch.manual_seed(0)
    if model == "vit_s":
        return VisionTransformer(in_chans=C, **common)
    if model == "cellrep":
        return CellRep(mixer_depth=2, **options, **common)
    if model == "c3r":
        return C3R(channel_groups=c3r_groups(C), n_pre=2, **options, **common)
    if model == "channelvit":
        return ChannelViT(channel_vocabulary=NAMES, **common)
    if model == "dichavit":
        return DiChaViT(channel_vocabulary=NAMES, **common)
    if model == "ca_mae":
        return ChannelAgnosticMAE(**common)
    if model == "ca_mae_pretrain":
        return MaskedPretrainingEncoder(ChannelAgnosticMAE(**common))
    raise ValueError(model)


MODELS = ["vit_s", "cellrep", *(v for v in VARIANTS if v.startswith("cellrep")), "c3r", "c3r_attention_pool",
          "channelvit", "dichavit", "ca_mae", "ca_mae_pretrain"]


def forward(model: torch.nn.Module, x: torch.Tensor, names: list[str]):
    return model(x, channel_names=names)


def count_flops(model: torch.nn.Module, C: int) -> int:
    x = torch.randn(1, C, IMG, IMG)
    model.eval()
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        forward(model, x, channel_names(C))
    return int(counter.get_total_flops())


def time_fwd_bwd(model: torch.nn.Module, C: int, repeats: int, batch: int = 1) -> tuple[float, float]:
    """Best (process CPU seconds, wall seconds) per image of forward + backward over `repeats` runs (train mode)."""
    model.train()
    x = torch.randn(batch, C, IMG, IMG)
    names = channel_names(C)
    cpu, wall = [], []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        c0, t0 = time.process_time(), time.perf_counter()
        out = forward(model, x, names)
        (out["cls"].sum() + out["patch"].mean()).backward()
        cpu.append((time.process_time() - c0) / batch)
        wall.append((time.perf_counter() - t0) / batch)
    return min(cpu), min(wall)


def linear_r2(xs, ys) -> tuple[float, float, float]:
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    slope, intercept = np.polyfit(xs, ys, 1)
    pred = slope * xs + intercept
    r2 = 1.0 - ((ys - pred) ** 2).sum() / ((ys - ys.mean()) ** 2).sum()
    return float(slope), float(intercept), float(r2)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = any(r.get("cpu_ms") is not None for rows in results["models"].values() for r in rows)
    fig, axes = plt.subplots(1, 3 if timed else 2, figsize=(17 if timed else 11.5, 5), squeeze=False)
    labels = {"vit_s": "ViT-S/16 (C-channel patch embed)", "cellrep": "CellRep (2-block mixer)",
              "cellrep_axial": "CellRep, channel-axial mixer", "cellrep_pool_after_1": "CellRep, pool after 1 block",
              "cellrep_attention_pool": "CellRep, attention pooling",
              "cellrep_axial_attention_pool": "CellRep, axial mixer + attention pooling",
              "c3r": "C3R (n_pre=2)", "c3r_attention_pool": "C3R, attention pooling",
              "channelvit": "ChannelViT", "dichavit": "DiChaViT",
              "ca_mae": "CA-MAE encoder (inference)", "ca_mae_pretrain": "CA-MAE encoder (pre-training, 25% visible)"}
    for i, (model, rows) in enumerate(results["models"].items()):
        cs = [r["C"] for r in rows]
        style = dict(marker="o", label=labels[model], linestyle="--" if model in VARIANTS else "-",
                     color=plt.cm.tab20.colors[i % 20])
        axes[0, 0].plot(cs, [r["gflops"] for r in rows], **style)
        axes[0, 1].plot(cs, [r["params"] / 1e6 for r in rows], **style)
        if timed:
            pts = [(r["C"], r["cpu_ms"]) for r in rows if r.get("cpu_ms") is not None]
            axes[0, 2].plot(*zip(*pts), **style)
    axes[0, 0].set(xlabel="channels C", ylabel="forward GFLOPs / image", yscale="log",
                   title="Forward FLOPs, small size, 224², patch 16")
    axes[0, 1].set(xlabel="channels C", ylabel="parameters (millions)", title="Parameters")
    if timed:
        axes[0, 2].set(xlabel="channels C", ylabel="CPU ms / image (process time)", yscale="log",
                       title=f"fwd+bwd CPU time ({results['meta']['threads']} thread(s), batch 1)")
    for ax in axes[0]:
        ax.set_xticks(CHANNELS)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="timed fwd+bwd runs per point (the best is kept)")
    parser.add_argument("--time-channels", type=int, nargs="*", default=[1, 3, 5, 8, 16])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-time", action="store_true", help="FLOPs only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    results: dict = {
        "meta": {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "cpu": py_platform.processor() or py_platform.machine(),
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "img_size": IMG,
            "patch_size": PATCH,
            "size": "small",
            "flops": "forward, torch.utils.flop_counter.FlopCounterMode, 2 FLOPs per multiply-add",
            "time": None if args.no_time else (
                f"forward+backward, batch 1, best of {args.repeats} after a warm-up forward, "
                f"C in {args.time_channels}; "
                "cpu_ms = process CPU time, wall_ms = wall clock; load average at start "
                + ", ".join(f"{v:.1f}" for v in os.getloadavg())),
        },
        "models": {},
    }
    for model_name in MODELS:
        rows = []
        for C in CHANNELS:
            model = build(model_name, C)
            flops = count_flops(model, C)
            t = None if args.no_time or C not in args.time_channels else time_fwd_bwd(model, C, args.repeats)
            rows.append({"C": C, "gflops": round(flops / 1e9, 4), "params": sum(p.numel() for p in model.parameters()),
                         "cpu_ms": None if t is None else round(1000 * t[0], 1),
                         "wall_ms": None if t is None else round(1000 * t[1], 1)})
            print(f"{model_name:28s} C={C:2d}  {flops / 1e9:8.2f} GFLOPs"
                  + ("" if t is None else f"  cpu {1000 * t[0]:8.1f} ms  wall {1000 * t[1]:8.1f} ms"), flush=True)
            if model_name == "vit_s" and C == 3:
                results["meta"]["vit_s_params"] = sum(p.numel() for p in model.parameters())
        results["models"][model_name] = rows

    def gflops(model: str, C: int) -> float:
        return next(r["gflops"] for r in results["models"][model] if r["C"] == C)

    slope, intercept, r2 = linear_r2(CHANNELS, [gflops("c3r", C) for C in CHANNELS])
    _, _, r2_cvit = linear_r2(CHANNELS, [gflops("channelvit", C) for C in CHANNELS])
    ref = gflops("vit_s", 5)
    ratios = {m: round(gflops(m, 5) / ref, 3) for m in MODELS}
    results["c3r_linear_fit"] = {"gflops_per_channel": round(slope, 4), "intercept_gflops": round(intercept, 4),
                                 "r2": round(r2, 6)}
    results["channelvit_linear_fit_r2"] = round(r2_cvit, 6)
    results["channelvit_growth_C16_over_C1"] = round(gflops("channelvit", 16) / gflops("channelvit", 1), 2)
    results["flops_ratio_vs_vit_s_at_C5"] = ratios
    results["dichavit_over_channelvit"] = {C: round(gflops("dichavit", C) / gflops("channelvit", C), 4)
                                           for C in CHANNELS}
    results["ca_mae_pretrain_over_inference"] = {C: round(gflops("ca_mae_pretrain", C) / gflops("ca_mae", C), 4)
                                                 for C in CHANNELS}
    results["targets"] = {
        "c3r_linear_r2_ge_0.99": r2 >= 0.99,
        "channelvit_superlinear": gflops("channelvit", 16) / gflops("channelvit", 1) > 16,
        "cellrep_le_2.2x_vit_s_at_C5": ratios["cellrep"] <= 2.2,
        "cellrep_axial_le_1.3x_vit_s_at_C5": ratios["cellrep_axial"] <= 1.3,
        "channelvit_ge_5x_vit_s_at_C5": ratios["channelvit"] >= 5.0,
        "dichavit_within_1pct_of_channelvit": all(abs(r - 1) <= 0.01
                                                  for r in results["dichavit_over_channelvit"].values()),
        "ca_mae_pretrain_le_0.3x_inference_at_C5": results["ca_mae_pretrain_over_inference"][5] <= 0.3,
    }
    results["meta"]["runtime_s"] = round(time.perf_counter() - started, 1)
    results["meta"]["load_average_at_end"] = [round(v, 1) for v in os.getloadavg()]

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model_cost.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "model_cost.png")
    print(json.dumps({k: results[k] for k in ("c3r_linear_fit", "channelvit_linear_fit_r2",
                                               "channelvit_growth_C16_over_C1", "flops_ratio_vs_vit_s_at_C5",
                                               "dichavit_over_channelvit", "ca_mae_pretrain_over_inference",
                                               "targets")}, indent=2))
    print(f"wrote {args.out / 'model_cost.json'} and model_cost.png in {results['meta']['runtime_s']} s")


if __name__ == "__main__":
    main()
