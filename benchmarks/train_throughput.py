"""Training throughput: images/s and data-wait fraction of the real pre-training job (Ray Data / field cache ->
Ray Train workers -> multi-crop -> self-distillation step), per model and engine.

CPU (always): tiny CellRep (DINO), C3R (iBOT + MCD) and the ViT RGB-composite baseline (iBOT) on 2 workers
with DDP, CellRep with DeepSpeed ZeRO-1 (same settings; also as a ratio against DDP measured in the same run)
and CellRep on one worker with both cores' threads, all with the training fields in memory
(`data.cache_fields`); plus CellRep on 2 workers streaming every epoch from the plates through Ray Data.
Against its limit: each model, objective and global batch also trains in a plain single-process PyTorch loop
over the same fields held in memory, on the same cores (`cellfm.train.in_memory.train_in_memory`, calling the
same SSLMetaArch step; no Ray, no data stream, no DDP), and each Ray Train run's images/s is reported as a
ratio of it, beside the run's data-wait fraction. Bars (>= 0.9x, data wait < 5% after epoch 1) hold the runs
with the fields in memory, as the plain loop has them. Runs are repeated and interleaved (--repeats), so the
ratios compare like with like on a shared machine. Ray Train's own settings are its defaults (what users get).
GPU (when torch.cuda.is_available()): CellRep ViT-S/16 at 224 px, bf16, one worker, images/s and MFU.

Figures come from the run's own TensorBoard events: images/s = median of the per-step figure after the first
epoch (warm-up excluded), data-wait fraction = mean over the epochs after the first; the plain loop's images/s
= global batch / median step time after its first epoch. Writes benchmarks/results/train_throughput.json.

    python benchmarks/train_throughput.py                # ~12 min on 2 cores
    python benchmarks/train_throughput.py --repeats 1 --epochs 2 --runs cellrep_ddp
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
SMOKE_CONFIG = REPO / "configs" / "smoke.yaml"
GPU_CONFIG = REPO / "configs" / "cellrep_vits16.yaml"

# The fields in memory, as the plain loop has them: read once into Ray's object store, taken from there by
# every worker every epoch (data.cache_fields).
CACHED = "data.cache_fields=true"
# name -> config overrides on top of configs/smoke.yaml (tiny models, 32-px global / 16-px local crops).
CPU_RUNS = {
    "cellrep_ddp": ["model.name=cellrep", CACHED],
    "c3r_ddp": ["model.name=c3r", "ssl.objective=ibot", "ssl.mcd=true", CACHED],
    "vit_rgb_ddp": ["model.name=vit_rgb", "ssl.objective=ibot", CACHED],
    "cellrep_deepspeed_zero1": ["model.name=cellrep", "train.engine=deepspeed", "train.zero_stage=1", CACHED],
    # One worker with both cores' threads: the plain loop's process and thread count, so the ratio is Ray's
    # own cost (Ray Train's worker and control loop, the cached field stream), without DDP's.
    "cellrep_1worker": ["model.name=cellrep", "train.num_workers=1", "train.cpus_per_worker=2",
                        "train.torch_threads=2", "optim.batch_size_per_worker=8", CACHED],
    # Every epoch streamed from the plates through Ray Data (read tasks sharing the cores): no bar, its figures.
    "cellrep_ddp_streaming": ["model.name=cellrep"],
}

# The plain single-process loop each Ray run is compared with: same model, objective, global batch (the
# engine, the worker count or the field source is the only difference between the CellRep runs, and a single
# process has none of these to choose).
PLAIN_LOOP_OF = {"cellrep_ddp": "cellrep_ddp", "c3r_ddp": "c3r_ddp", "vit_rgb_ddp": "vit_rgb_ddp",
                 "cellrep_deepspeed_zero1": "cellrep_ddp", "cellrep_1worker": "cellrep_ddp",
                 "cellrep_ddp_streaming": "cellrep_ddp"}
PLAIN_LOOPS = sorted(set(PLAIN_LOOP_OF.values()))
# Runs held to the bars (Ray Train >= 0.9x the plain loop, data wait < 5% after the first epoch): the fields in
# memory on both sides. The streaming run is reported beside them.
BARRED_RUNS = [name for name, overrides in CPU_RUNS.items() if CACHED in overrides]


def _scalars(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events_file in sorted((run_dir / "tensorboard").glob("events.*")):
        acc = EventAccumulator(str(events_file))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def measure(config: Path, overrides: list[str]) -> dict:
    """One training run; its steady-state figures from TensorBoard and the final epoch's metrics."""
    from cellfm.config import load_config
    from cellfm.storage import run_directory
    from cellfm.train.trainer import run_pretraining

    cfg = load_config(config, overrides)
    t0 = time.perf_counter()
    result = run_pretraining(cfg)
    wall_s = time.perf_counter() - t0
    run_dir = run_directory(cfg)
    step = result.metrics["step"]
    steps_per_epoch = step // cfg.optim.epochs
    per_step = _scalars(run_dir, "perf/images_per_s")
    wait = _scalars(run_dir, "perf/data_wait_fraction")  # logged at each epoch's last step
    steady = [v for s, v in per_step.items() if s >= steps_per_epoch]
    later_epochs = [v for s, v in sorted(wait.items()) if s > steps_per_epoch]
    return {
        "images_per_s": statistics.median(steady),
        "data_wait_fraction": statistics.mean(later_epochs),
        "data_wait_fraction_per_epoch": [v for _, v in sorted(wait.items())],
        "steps": step,
        "global_batch": cfg.optim.batch_size_per_worker * cfg.train.num_workers * cfg.optim.accumulate_steps,
        "final_loss": result.metrics["loss"],
        "mfu": result.metrics["mfu"],
        "wall_s": wall_s,
        "load_average_1min_after": os.getloadavg()[0],  # other jobs on the cores show here
    }


def measure_plain_loop(config: Path, overrides: list[str], fields, channel_names: list[str], manifest,
                       workers: int) -> dict:
    """The Ray run's model, objective and global batch (workers x batch_size_per_worker) trained in one process
    on fields held in memory, with all cores' threads; images/s = global batch / median step time after the
    first epoch."""
    from cellfm.config import load_config
    from cellfm.train.in_memory import train_in_memory
    from cellfm.train.inputs import record_channel_metadata

    cfg = load_config(config, overrides)
    cfg.optim.batch_size_per_worker *= workers * cfg.optim.accumulate_steps
    cfg.optim.accumulate_steps = 1
    record_channel_metadata(cfg, manifest)
    steps_per_epoch = len(fields) // cfg.optim.batch_size_per_worker
    step_seconds: list[float] = []
    last = [time.perf_counter()]

    def on_step(epoch: int, step: int, losses) -> None:
        now = time.perf_counter()
        step_seconds.append(now - last[0])
        last[0] = now

    t0 = time.perf_counter()
    train_in_memory(cfg, fields, channel_names, on_step=on_step)
    return {"images_per_s": cfg.optim.batch_size_per_worker / statistics.median(step_seconds[steps_per_epoch:]),
            "steps": len(step_seconds), "global_batch": cfg.optim.batch_size_per_worker,
            "wall_s": time.perf_counter() - t0, "load_average_1min_after": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every CPU run (default 2)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per CPU run; the first is warm-up (default 3)")
    parser.add_argument("--runs", nargs="+", choices=list(CPU_RUNS), default=list(CPU_RUNS),
                        help="CPU runs to measure (default all; each with its plain loop)")
    parser.add_argument("--out", default=str(RESULTS / "train_throughput.json"))
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is warm-up)")
    cpu_runs = {name: CPU_RUNS[name] for name in args.runs}

    import pandas as pd
    import ray
    import torch

    from cellfm.config import load_config
    from cellfm.data.synthetic.catalog import ScreenLayout
    from cellfm.data.synthetic.screens import generate_screen
    from cellfm.storage import write_file
    from cellfm.train.in_memory import load_normalized_fields

    t_start = time.perf_counter()
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="cellfm-train-throughput-"))
    layout = ScreenLayout(n_train_plates=2, n_heldout_plates=1, n_unseen_plates=1, replicates_per_plate=2,
                          controls_per_plate=2, fields_per_well=4, field_size=64)
    screen = generate_screen(work / "screen", layout=layout, seed=0)
    common = [f"data.train_manifest={screen['train']}", f"train.storage_path={work / 'runs'}",
              f"optim.epochs={args.epochs}", "train.log_every_steps=1000",
              f"eval.manifests={{heldout: {screen['heldout']}}}"]

    train_manifest = pd.read_parquet(screen["train"])
    fields = load_normalized_fields(train_manifest, load_config(SMOKE_CONFIG).data)
    channel_names = list(train_manifest["channel_names"].iloc[0])
    workers = load_config(SMOKE_CONFIG).train.num_workers
    runs: dict[str, list[dict]] = {name: [] for name in cpu_runs}
    plain_needed = {PLAIN_LOOP_OF[name] for name in cpu_runs}
    plain: dict[str, list[dict]] = {name: [] for name in PLAIN_LOOPS if name in plain_needed}
    total_runs, done = args.repeats * (len(cpu_runs) + len(plain)), 0
    for repeat in range(args.repeats):
        for name, overrides in cpu_runs.items():
            figures = measure(SMOKE_CONFIG, common + overrides + [f"train.run_name={name}-{repeat}"])
            done += 1
            print(f"[bench] {done}/{total_runs} {name} repeat {repeat}: {figures['images_per_s']:.1f} images/s, "
                  f"data wait {figures['data_wait_fraction']:.3f} | ETA "
                  f"{(time.perf_counter() - t_start) / done * (total_runs - done) / 60:.0f} min", flush=True)
            runs[name].append(figures)
        for name in plain:
            torch.set_num_threads(os.cpu_count() or 1)
            figures = measure_plain_loop(SMOKE_CONFIG, common + CPU_RUNS[name], fields, channel_names,
                                         train_manifest, workers)
            done += 1
            print(f"[bench] {done}/{total_runs} {name} plain single-process loop, repeat {repeat}: "
                  f"{figures['images_per_s']:.1f} images/s", flush=True)
            plain[name].append(figures)
    cpu = {name: {"images_per_s": statistics.median(r["images_per_s"] for r in rs),
                  "data_wait_fraction": statistics.median(r["data_wait_fraction"] for r in rs),
                  "repeats": rs} for name, rs in runs.items()}
    plain_loop = {name: {"images_per_s": statistics.median(r["images_per_s"] for r in rs), "repeats": rs}
                  for name, rs in plain.items()}
    ray_over_plain = {name: {"plain_loop": PLAIN_LOOP_OF[name],
                             "ray_over_plain_images_per_s": cpu[name]["images_per_s"]
                             / plain_loop[PLAIN_LOOP_OF[name]]["images_per_s"],
                             "ray_data_wait_fraction": cpu[name]["data_wait_fraction"],
                             # epoch 1 is warm-up; the bar holds each later epoch of every repeat
                             "ray_max_data_wait_fraction_after_epoch_1": max(
                                 w for r in runs[name] for w in r["data_wait_fraction_per_epoch"][1:])}
                      for name in cpu_runs if PLAIN_LOOP_OF[name] in plain_loop}
    barred = {name: r for name, r in ray_over_plain.items() if name in BARRED_RUNS}
    bars = {f"{name}: Ray Train >= 0.9 x plain loop images/s": r["ray_over_plain_images_per_s"] >= 0.9
            for name, r in barred.items()}
    bars.update({f"{name}: data wait < 5% in every epoch after the first":
                 r["ray_max_data_wait_fraction_after_epoch_1"] < 0.05 for name, r in barred.items()})
    ratio = (cpu["cellrep_deepspeed_zero1"]["images_per_s"] / cpu["cellrep_ddp"]["images_per_s"]
             if {"cellrep_deepspeed_zero1", "cellrep_ddp"} <= set(cpu) else None)

    gpu = None
    if torch.cuda.is_available():
        # 256-px fields resized up from the synthetic screen; 224-px global crops of ViT-S/16 CellRep, bf16.
        gpu_layout = ScreenLayout(n_train_plates=4, n_heldout_plates=1, n_unseen_plates=1, replicates_per_plate=4,
                                  controls_per_plate=8, fields_per_well=4, field_size=256)
        gpu_screen = generate_screen(work / "gpu_screen", layout=gpu_layout, seed=0)
        batch = 64
        figures = measure(GPU_CONFIG, [
            f"data.train_manifest={gpu_screen['train']}", f"train.storage_path={work / 'runs'}",
            "train.run_name=gpu-cellrep-vits16", "train.num_workers=1", "train.cpus_per_worker=1",
            f"optim.batch_size_per_worker={batch}", "optim.epochs=3", "optim.warmup_epochs=1",
            "ssl.warmup_teacher_temp_epochs=1", "train.mixed_precision=bf16", "train.log_every_steps=1000",
            f"eval.manifests={{heldout: {gpu_screen['heldout']}}}",
        ])
        gpu = {"device": torch.cuda.get_device_name(0), "model": "CellRep ViT-S/16, 224 px global crops, bf16",
               "batch_size": batch, **figures}

    result = {
        "benchmark": "cellfm training throughput",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform(),
                    "ray": ray.__version__, "torch": torch.__version__, "cuda": torch.cuda.is_available(),
                    "note": "shared machine: the load average before and after each run shows other jobs",
                    "load_average_1min_before": load_before},
        "settings": {"config": "configs/smoke.yaml (tiny models, 32-px global / 16-px local crops, 2 local)",
                     "workers": 2, "cpus_per_worker": 0.5, "batch_size_per_worker": 4, "epochs": args.epochs,
                     "barred_runs": BARRED_RUNS,
                     "train_fields": len(pd.read_parquet(screen["train"])), "field_size": layout.field_size,
                     "repeats_interleaved": args.repeats, "runs": cpu_runs,
                     "images_per_s": "median over steps after epoch 1 (each step's time includes its data wait)",
                     "data_wait_fraction": "mean over epochs after epoch 1",
                     "plain_loop": (f"one process, {os.cpu_count()} torch threads, batch {workers} x 4 (the Ray runs' "
                                    "global batch), the same fields as float32 tensors in memory, "
                                    "cellfm.train.in_memory.train_in_memory; images/s = batch / median step time "
                                    "after epoch 1"),
                     "ray_over_plain_images_per_s": "Ray Train run's images/s / its plain loop's images/s"},
        "cpu": cpu,
        "plain_loop": plain_loop,
        "ray_train_vs_plain_loop": ray_over_plain,
        "bars_met": bars,
        "deepspeed_zero1_over_ddp_cellrep": ratio,
        "gpu": gpu if gpu is not None else ("not measured: no CUDA device on this machine (CellRep ViT-S/16, 224 px, "
                                            "bf16 images/s and MFU need a GPU run of this script)"),
        "runtime_s": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    write_file(out, json.dumps(result, indent=2) + "\n")
    print(json.dumps({name: {k: v for k, v in c.items() if k != "repeats"} for name, c in cpu.items()}, indent=1))
    for name, r in ray_over_plain.items():
        print(f"{name}: Ray Train / plain loop images/s {r['ray_over_plain_images_per_s']:.3f}, "
              f"data wait {r['ray_data_wait_fraction']:.3f}")
    if ratio is not None:
        print(f"DeepSpeed ZeRO-1 / DDP (CellRep images/s): {ratio:.3f}")
    print(f"wrote {out} in {result['runtime_s']:.0f} s")
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
