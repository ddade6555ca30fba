"""GPU training throughput in one command: images/s, MFU, peak memory and data-wait fraction of the training
step (SSLMetaArch.forward_backward + optimizer_step, as `cellfm.train.in_memory` runs it: one process, fields
held in host memory, no Ray) for CellRep, C3R, ChannelViT and vit_rgb at ViT-S/16, 224-px global crops
(configs/cellrep_vits16.yaml, bf16 autocast via train.mixed_precision), plus a batch-size scan of CellRep.

Each step's batch is copied host -> device from pinned memory with non_blocking=True, so the copy overlaps
the previous step's kernels; the data-wait fraction is the time spent waiting for that copy (and building the
batch on the host) over the total. FLOPs per image are counted once per model with torch.utils.flop_counter
over one full training step (forward and backward of student, forward of teacher), so MFU = FLOPs/image x
images/s / peak. Peak dense bf16 TFLOP/s per device (NVIDIA data sheets, no sparsity; matched as a substring
of the device name, first match wins): H100 PCIe 756, H100 NVL 835, H100 (SXM) 989.4, H200 (same chip)
989.4, A100 312 -- the table in cellfm.train.telemetry.PEAK_BF16_TFLOPS. On CPU, or a GPU not in the table,
MFU is null. Peak memory: torch.cuda.max_memory_allocated on CUDA, the process's peak RSS on CPU.

    python benchmarks/gpu_train.py                       # on a GPU machine: writes benchmarks/results/gpu_train.json
    python benchmarks/gpu_train.py --tiny --out /tmp/g.json   # CPU check in seconds (tiny models, 32-px crops)

On CPU the JSON is written only where --out says.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

# name -> overrides on top of the base config (ViT-S/16 CellRep recipe, or configs/smoke.yaml with --tiny).
MODELS = {
    "cellrep": ["model.name=cellrep"],
    # C3R's groups for the benchmark's channel names ch0..ch4 (as the Cell Painting screens: 2 context, 3 concept).
    "c3r": ["model.name=c3r", "ssl.objective=ibot", "ssl.mcd=true",
            "model.channel_groups={ch0: context, ch1: context, ch2: concept, ch3: concept, ch4: concept}"],
    "channelvit": ["model.name=channelvit", "model.channel_vocabulary=[ch0, ch1, ch2, ch3, ch4]"],
    "vit_rgb": ["model.name=vit_rgb", "ssl.objective=ibot"],
}
FULL = {"config": REPO / "configs" / "cellrep_vits16.yaml", "field_size": 256, "channels": 5, "batch": 64,
        "scan": [16, 32, 64, 128], "steps": 20, "warmup": 3}
TINY = {"config": REPO / "configs" / "smoke.yaml", "field_size": 40, "channels": 5, "batch": 4,
        "scan": [2, 4], "steps": 3, "warmup": 1}


def peak_memory_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def measure(config: Path, overrides: list[str], *, batch: int, steps: int, warmup: int, field_size: int,
            channels: int, device, extra: list[str]) -> dict:
    """One model at one batch size: `warmup` untimed steps, then `steps` timed ones."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cellfm.config import load_config
    from cellfm.data.batch import FieldBatch
    from cellfm.train.in_memory import epoch_batches
    from cellfm.train.meta_arch import SSLMetaArch
    from cellfm.train.telemetry import model_flops_utilisation, peak_flops_per_s

    cfg = load_config(config, [*overrides, f"optim.batch_size_per_worker={batch}", "optim.epochs=1",
                               "optim.warmup_epochs=0", *extra])
    n_steps = warmup + steps + 1  # + 1: the FLOP-counting step
    generator = torch.Generator().manual_seed(cfg.train.seed)
    fields = torch.rand(n_steps * batch, channels, field_size, field_size, generator=generator)
    channel_names = [f"ch{i}" for i in range(channels)]
    host_batches = epoch_batches(cfg, fields, channel_names, 0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        host_batches = [FieldBatch(b.images.pin_memory(), b.channel_names) for b in host_batches]
    meta_arch = SSLMetaArch(cfg, steps_per_epoch=n_steps, rank=0, world_size=1, device=device,
                            prepare_model=lambda model: model.to(device))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(i: int) -> float:
        """One training step; returns the seconds spent waiting for the batch: building it on the host and
        the pinned, non-blocking host -> device copy (an event recorded after it marks it done)."""
        t0 = time.perf_counter()
        images = host_batches[i].images.to(device, non_blocking=True)
        if device.type == "cuda":
            copied = torch.cuda.Event()
            copied.record()
            copied.synchronize()
        waited = time.perf_counter() - t0
        meta_arch.forward_backward(FieldBatch(images, host_batches[i].channel_names), epoch=0, step=i, micro=0)
        meta_arch.optimizer_step(i)
        return waited

    counter = FlopCounterMode(display=False)
    with counter:
        step(0)
    flops_per_image = counter.get_total_flops() / batch
    for i in range(1, 1 + warmup):
        step(i)
    sync()
    started = time.perf_counter()
    wait_s = sum(step(i) for i in range(1 + warmup, n_steps))
    sync()
    seconds = time.perf_counter() - started
    images_per_s = steps * batch / seconds
    peak = peak_flops_per_s(device)
    return {"batch_size": batch, "steps": steps, "seconds": seconds, "images_per_s": images_per_s,
            "flops_per_image": flops_per_image, "peak_flops_per_s": peak,
            "mfu": None if peak is None else model_flops_utilisation(flops_per_image, images_per_s, 1, peak),
            "peak_memory_bytes": peak_memory_bytes(device), "data_wait_fraction": wait_s / seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models, 40-px fields, few steps (CPU check)")
    parser.add_argument("--out", type=Path, help="JSON path (default on CUDA: benchmarks/results/gpu_train.json; "
                                                 "on CPU nothing is written without it)")
    parser.add_argument("--override", action="append", default=[], help="dotted config override for every run")
    args = parser.parse_args(argv)

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    setup = TINY if args.tiny else FULL
    if device.type == "cuda":
        args.override = ["train.use_gpu=true", *args.override]  # bf16 autocast and fused AdamW, as a GPU run
    common = dict(steps=setup["steps"], warmup=setup["warmup"], field_size=setup["field_size"],
                  channels=setup["channels"], device=device, extra=args.override)
    runs = {}
    for name, overrides in MODELS.items():
        runs[name] = measure(setup["config"], overrides, batch=setup["batch"], **common)
        print(f"{name:10s} batch {setup['batch']:4d}: {runs[name]['images_per_s']:9.1f} images/s, "
              f"MFU {runs[name]['mfu']}, data wait {runs[name]['data_wait_fraction']:.3f}", flush=True)
    scan = []
    for batch in setup["scan"]:
        scan.append(measure(setup["config"], MODELS["cellrep"], batch=batch, **common))
        print(f"cellrep    batch {batch:4d}: {scan[-1]['images_per_s']:9.1f} images/s", flush=True)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type, "tiny": args.tiny, "config": str(setup["config"].relative_to(REPO)),
        "mixed_precision_active": device.type == "cuda", "overrides": args.override,
        "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "models": runs, "cellrep_batch_scan": scan,
    }
    out = args.out or (RESULTS / "gpu_train.json" if device.type == "cuda" else None)
    if out is not None:
        from cellfm.storage import write_file

        write_file(out, json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
