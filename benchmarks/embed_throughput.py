"""Embedding throughput: `cellfm embed` (Ray Data batch inference into the feature store) against a plain
PyTorch loop over the same fields on the same cores.

    (a) plain : one process reads each field (Zarr), normalizes it (data.normalization) and runs the
                backbone on batches of features.batch_size fields, with PyTorch's default threads
    (b) embed : `cellfm.features.refresh.refresh` into an empty store, Ray already running: planning,
                actor start-up and model load, the Ray Data read + normalize tasks, the actor pool's
                forward passes, and writing every plate (Zarr + Parquet + marker), timed end to end;
                once per setting (inference actors x their PyTorch threads, zarrs codec pipeline)

Fields: the held-out plates of a synthetic screen (5 channels, 128 x 128, as the demo's); model: the
demo config's encoder (random weights: speed does not depend on them), fields at native size. (a) and
(b) alternate, repeated --repeats times; each setting's ratio is its rate over the plain loop's of the
same repeat, and the figure reported is the median. As in benchmarks/pipeline.py the target uses the
sustained rate, after the first embeddings arrived (what a screen of thousands of fields sees); each
pass's start-up (to the first embeddings: model load, and for (b) planning, actor start-up, first
reads) and whole-pass rates are reported too, and Ray's own start-up (`ray.init`, once per process)
apart. Writes benchmarks/results/embed_throughput.json.

    python benchmarks/embed_throughput.py              # ~6 min on 2 cores
    python benchmarks/embed_throughput.py --quick      # one plate, one repeat, the default setting only
    python benchmarks/embed_throughput.py --device cuda   # on a GPU machine: forward passes on the GPU
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

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "demo.yaml"
RESULTS = REPO / "benchmarks" / "results" / "embed_throughput.json"
# (features.actors, PyTorch threads each, zarrs codec pipeline); the first is the shipped default
# (actors=0: one per two of the Ray cluster's CPUs, i.e. 2 with the embedded Ray's 4 logical CPUs on 2 cores).
SETTINGS = {
    "default (actors=0 -> 2 actors x 1 thread)": (0, 1, False),
    "1 actor x 1 thread": (1, 1, False),
    "1 actor x 2 threads": (1, 2, False),
    "default, zarrs": (0, 1, True),
}


def log(message: str) -> None:
    print(f"[embed_throughput {time.strftime('%H:%M:%S')}] {message}", flush=True)


def plain_loop(manifest, cfg, checkpoint: str, device: str) -> dict:
    """Read + normalize + forward in this process; returns fields/s over the whole pass (model load included)."""
    from cellfm.data.normalize import normalize_field
    from cellfm.data.plate import read_field
    from cellfm.features.embed import field_embedding
    from cellfm.train.checkpoint import load_inference_backbone

    d, batch = cfg.data, cfg.features.batch_size
    started = time.perf_counter()
    backbone, _ = load_inference_backbone(checkpoint)
    backbone = backbone.to(device)
    rows = list(manifest.itertuples())
    out, first = [], None
    for i in range(0, len(rows), batch):
        images, names = [], []
        for r in rows[i:i + batch]:
            image, channels = read_field(r.store_uri, r.row, r.col, r.field, channels=list(r.channel_names))
            images.append(normalize_field(image, d.normalization, clip_low=d.clip_low, clip_high=d.clip_high,
                                          clahe_clip_limit=d.clahe_clip_limit, clahe_tiles=d.clahe_tiles))
            names.append(channels)
        with torch.inference_mode():
            out.append(field_embedding(backbone, torch.from_numpy(np.stack(images)).to(device),
                                       cfg.features.image_size, names).cpu().numpy())
        first = first or (time.perf_counter(), len(images))
    seconds = time.perf_counter() - started
    return {"fields": len(rows), "seconds": seconds, "fields_per_s": len(rows) / seconds, "startup_s": first[0] - started,
            "sustained_fields_per_s": (len(rows) - first[1]) / (started + seconds - first[0]),
            "torch_threads": torch.get_num_threads()}


def _rates(run: dict) -> str:
    return (f"{run['sustained_fields_per_s']:.1f} fields/s sustained after {run['startup_s']:.1f} s start-up, "
            f"{run['fields_per_s']:.1f} fields/s whole pass")


def cellfm_embed(cfg_overrides: list[str], store: Path) -> dict:
    from cellfm.config import load_config
    from cellfm.features.refresh import refresh

    shutil.rmtree(store, ignore_errors=True)
    cfg = load_config(CONFIG, cfg_overrides + [f"features.store={store}"])
    started = time.perf_counter()
    summary = refresh(cfg)
    seconds = time.perf_counter() - started
    return {"fields": summary.fields, "seconds": seconds, "fields_per_s": summary.fields / seconds,
            "startup_s": summary.startup_s, "sustained_fields_per_s": summary.sustained_fields_per_s}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--screen-dir", default=str(REPO / "demo_output" / "bench_embed_screen"))
    parser.add_argument("--plates", type=int, default=2, help="held-out plates embedded per pass (224 fields each)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="features.batch_size of both paths")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.plates < 1 or args.repeats < 1 or args.batch_size < 1:
        parser.error("--plates, --repeats and --batch-size must be >= 1")
    if args.quick:
        args.plates, args.repeats = 1, 1

    from cellfm.config import load_config
    from cellfm.data.pipeline.dataset import load_manifests
    from cellfm.data.synthetic.catalog import ScreenLayout
    from cellfm.data.synthetic.screens import generate_screen
    from cellfm.models.registry import build_backbone
    from cellfm.runtime import init_ray
    from cellfm.train.checkpoint import save_inference_checkpoint

    layout = ScreenLayout(n_train_plates=1, n_heldout_plates=args.plates, n_unseen_plates=1, replicates_per_plate=4,
                          controls_per_plate=8, fields_per_well=4, field_size=128)
    screen = Path(args.screen_dir).resolve() / f"{args.plates}plates"
    manifests = generate_screen(screen, layout, seed=0)
    manifest = load_manifests([manifests["heldout"]]).sort_values(["plate", "well", "field"], ignore_index=True)
    work = Path(tempfile.mkdtemp(prefix="cellfm-embed-bench-"))
    base = load_config(CONFIG)
    torch.manual_seed(0)
    save_inference_checkpoint(work / "checkpoint", cfg=base, backbone=build_backbone(base.model).eval())
    overrides = [f"features.manifests={{bench: {manifests['heldout']}}}", f"features.checkpoint={work / 'checkpoint'}",
                 f"features.batch_size={args.batch_size}", "data.progress_interval_s=0"]
    if args.device == "cuda":
        overrides += ["features.use_gpu=true", "features.gpus_per_actor=1"]
    cfg = load_config(CONFIG, overrides)
    settings = {name: SETTINGS[name] for name in (list(SETTINGS)[:1] if args.quick else SETTINGS)}
    log(f"{len(manifest)} fields ({args.plates} plate(s), {manifest['channel_names'].iloc[0]}, "
        f"{manifest['height'].iloc[0]} px), model {base.model.name}/{base.model.size}, batch {args.batch_size}, "
        f"device {args.device}, {os.cpu_count()} CPUs")

    started = time.perf_counter()
    init_ray(cfg.ray)
    ray_init_s = time.perf_counter() - started
    plain_loop(manifest.iloc[: args.batch_size], cfg, str(work / "checkpoint"), args.device)  # warm page cache and imports
    runs: dict[str, list[dict]] = {"plain": [], **{name: [] for name in settings}}
    for repeat in range(args.repeats):
        runs["plain"].append(plain_loop(manifest, cfg, str(work / "checkpoint"), args.device))
        log(f"repeat {repeat + 1}: plain loop {_rates(runs['plain'][-1])}")
        for name, (actors, threads, zarrs) in settings.items():
            setting = [f"features.actors={actors}", f"features.torch_threads={threads}", f"data.use_zarrs={str(zarrs).lower()}"]
            runs[name].append(cellfm_embed(overrides + setting, work / "store"))
            ratio = runs[name][-1]["sustained_fields_per_s"] / runs["plain"][-1]["sustained_fields_per_s"]
            log(f"repeat {repeat + 1}: cellfm embed, {name}: {_rates(runs[name][-1])} ({ratio:.2f}x plain, sustained)")
    shutil.rmtree(work, ignore_errors=True)

    def summary(name: str) -> dict:
        out = {}
        for rate in ("sustained_fields_per_s", "fields_per_s"):
            rates = [r[rate] for r in runs[name]]
            out[rate] = [round(x, 2) for x in rates]
            if name != "plain":
                ratios = [r / p[rate] for r, p in zip(rates, runs["plain"])]
                out[f"{rate}_ratio_to_plain"] = [round(x, 3) for x in ratios]
                out[f"median_{rate}_ratio_to_plain"] = round(statistics.median(ratios), 3)
        out["startup_s"] = [round(r["startup_s"], 2) for r in runs[name]]
        return out

    default = list(SETTINGS)[0]
    results = {
        "benchmark": "embed_throughput",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([f"benchmarks/{Path(__file__).name}", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "torch": torch.__version__, "device": args.device},
        "workload": {"fields": len(manifest), "plates": args.plates, "channels": len(manifest["channel_names"].iloc[0]),
                     "field_px": int(manifest["height"].iloc[0]), "model": f"{base.model.name}/{base.model.size}",
                     "patch_size": base.model.patch_size, "batch_size": args.batch_size, "repeats": args.repeats},
        "ray_init_s": round(ray_init_s, 2),
        "plain_loop": {**summary("plain"), "torch_threads": runs["plain"][0]["torch_threads"]},
        "cellfm_embed": {name: summary(name) for name in settings},
        "default_setting": default,
        "bar": "cellfm embed (default setting) >= 0.9x the plain loop's sustained fields/s on CPU",
    }
    ratio = results["cellfm_embed"][default]["median_sustained_fields_per_s_ratio_to_plain"]
    results["meets_bar"] = ratio >= 0.9
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    log(f"default setting: {ratio:.2f}x the plain loop's sustained fields/s; wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
