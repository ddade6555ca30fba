"""Data-path benchmark: how close the Ray Data pipeline gets to the practical limit of Zarr decoding.

Measured in one run, on JUMP-sized fields (5 x 1080 x 1080 uint16, smooth content + noise,
blosc-zstd shards as written by cellfm.data.plate), with repeats interleaved so the ratios
compare like with like on a shared machine:

  (a) raw   : read_field (Zarr decode) of the same fields in plain processes (one per core), no Ray,
              in chunks of --read-batch-size fields (a read task's share in (b) and (c))
  (b) ray   : the same raw reads inside Ray Data (normalization "none"), consumed by iter_batches
  (c) full  : the full pipeline with each normalization (percentile 1/99, percentile 0.1/99.9,
              clahe, standardize), float16 transfer; percentile also with uint8 transfer
  (d) naive : what a user writes otherwise: one TIFF per channel (tifffile) + np.percentile per
              image in a PyTorch DataLoader with one worker per core

(a), (b) and (c) percentile run with both codec pipelines, zarr-python's and the Rust ``zarrs``
(data.use_zarrs), and every ratio compares like with like (same codec pipeline); the variants
(0.1/99.9, uint8, clahe, standardize) use zarrs. (b) and (c) with zarrs also run in reader actors
(data.read_actors, one per core) instead of read tasks.

Each measurement is a stream timed from the first request. The targets use the sustained rate, after
the first output arrived: what a long training stream sees. Every pass also pays a start-up once
(worker start; Ray Data 2.60 runs one task at a time until its resource discovery reports the
cluster, ~1 s), reported as ``first_output_s``, and whole-pass rates and ratios are reported too.

and, in one process before Ray starts, the CPU time per field of (a)'s decode and of (b)'s and (c)'s
read-task work (``FieldLoader``, no transfer): the c / a that a pipeline moving fields at no cost would
reach, a ceiling for (c) / (a);

plus peak memory (sum of RSS of the driver and all Ray processes, and Ray's object-store usage)
streaming 1x and 10x the plates (10x = hard-linked copies under other plate names: same bytes on
disk, 10x the fields through the pipeline), and crops/s of the batched MultiCrop against loops
over images. Writes benchmarks/results/pipeline.json.

    python benchmarks/pipeline.py                      # ~9.5 min on 2 cores; the first run also writes ~4 GB of plates + TIFFs
    python benchmarks/pipeline.py --quick              # smaller smoke run
    python benchmarks/pipeline.py --only multicrop     # rerun multi-crop only, update its part of the JSON
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]
MB = 1024 * 1024


# ------------------------------------------------------------------------------------ data set


def _base_fields(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth multi-scale blobs per channel (cell-like intensity structure), uint16."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        field = np.zeros((len(CHANNELS), size, size), np.float32)
        for grid, weight in ((12, 0.6), (48, 0.4)):
            low = torch.from_numpy(rng.gamma(1.5, 1.0, (1, len(CHANNELS), grid, grid)).astype(np.float32))
            field += weight * F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)[0].numpy()
        out.append(np.clip(field * 900 + 150, 0, 60000).astype(np.uint16))
    return np.stack(out)


def _write_plate(args) -> None:
    uri, name, wells, n_fields, size, seed = args
    from cellfm.data.plate_writer import create_plate, write_field

    create_plate(uri, name, wells, n_fields, CHANNELS, (size, size))
    rng = np.random.default_rng(seed)
    bases = _base_fields(4, size, seed)
    noise = rng.normal(0, 25, (len(CHANNELS), size, size)).astype(np.float32)
    for i, (row, col) in enumerate(wells):
        for f in range(n_fields):
            k = i * n_fields + f
            shift = rng.integers(0, size, 2)
            field = np.roll(bases[k % len(bases)], tuple(shift), axis=(1, 2)).astype(np.float32)
            field += np.roll(noise, int(rng.integers(0, size)), axis=2)
            write_field(uri, row, col, f, np.clip(field, 0, 65535).astype(np.uint16))


def _manifest_rows(uri: str, plate: str, wells, n_fields: int, size: int) -> list[dict]:
    return [dict(source="bench", plate=plate, well=f"{r}{c}", row=r, col=c, field=f, store_uri=uri,
                 channel_names=list(CHANNELS), channel_groups=["context"] * len(CHANNELS), height=size, width=size,
                 dtype="uint16", perturbation_id="DMSO", moa="control", is_control=True, dose=0.0,
                 cell_line="U2OS", batch="B1")
            for r, c in wells for f in range(n_fields)]


def make_dataset(root: Path, n_plates: int, n_wells: int, n_fields: int, size: int, copies: int, n_tiff: int):
    """Plates (cached under root), a 1x and a `copies`x manifest, and per-channel TIFFs of the first fields."""
    from cellfm.data.manifest import write_manifest

    root.mkdir(parents=True, exist_ok=True)
    wells = [("A", f"{i + 1:02d}") for i in range(n_wells)]
    # Stamps: plates and TIFFs are cached apart, so another --measure-fields only rewrites TIFFs.
    plates_done = root / f"plates-{n_plates}-{n_wells}-{n_fields}-{size}"
    tiffs_done = root / f"tiff-{n_plates}-{n_wells}-{n_fields}-{size}-{n_tiff}"
    rows = []
    jobs = []
    for p in range(n_plates):
        name = f"BENCH-{p:02d}"
        uri = str(root / f"{name}.zarr")
        rows += _manifest_rows(uri, name, wells, n_fields, size)
        jobs.append((uri, name, wells, n_fields, size, p))
    manifest1 = pd.DataFrame(rows)
    fresh = not plates_done.exists()
    if fresh:
        t0 = time.perf_counter()
        with mp.get_context("spawn").Pool(2) as pool:
            pool.map(_write_plate, jobs)
        print(f"wrote {len(manifest1)} fields in {time.perf_counter() - t0:.0f} s", flush=True)
    rows10 = list(rows)
    for k in range(1, copies):
        for p in range(n_plates):
            name, copy_name = f"BENCH-{p:02d}", f"BENCH-{p:02d}-COPY{k}"
            src, dst = root / f"{name}.zarr", root / f"{copy_name}.zarr"
            if fresh or not dst.exists():
                shutil.rmtree(dst, ignore_errors=True)
                subprocess.run(["cp", "-al", str(src), str(dst)], check=True)  # hard links: same bytes
            rows10 += _manifest_rows(str(dst), copy_name, wells, n_fields, size)
    manifest10 = pd.DataFrame(rows10)
    tiff_dir = root / "tiff"
    tiffs = []
    write_tiffs = fresh or not tiffs_done.exists()
    if write_tiffs:
        import tifffile

        from cellfm.data.plate import read_field

        shutil.rmtree(tiff_dir, ignore_errors=True)
        tiff_dir.mkdir()
    for r in manifest1.iloc[:n_tiff].itertuples():
        paths = [str(tiff_dir / f"{r.plate}_{r.well}_s{r.field}_{ch}.tif") for ch in CHANNELS]
        if write_tiffs:
            image, _ = read_field(r.store_uri, r.row, r.col, r.field)
            for path, plane in zip(paths, image):
                tifffile.imwrite(path, plane)  # uncompressed, one file per channel, as microscopes write
        tiffs.append(paths)
    write_manifest(manifest1, root / "manifest1.parquet")
    write_manifest(manifest10, root / "manifest10.parquet")
    plates_done.touch()
    tiffs_done.touch()
    return manifest1, manifest10, tiffs


# ------------------------------------------------------------------------------------ (a) raw decode


def _read_fields(rows, zarrs: bool = False) -> int:
    from cellfm.data.plate import read_field, use_zarrs

    use_zarrs(zarrs)
    n = 0
    for uri, row, col, field in rows:
        image, _ = read_field(uri, row, col, field)
        n += image.shape[0] > 0
    return n


def _read_fields_zarrs(rows) -> int:
    return _read_fields(rows, zarrs=True)


def measure_stream(outputs) -> dict:
    """Rates of a stream of outputs (each a number of fields), timed from the first request:
    ``fields_per_s`` over the whole pass, ``sustained_fields_per_s`` after the first output arrived
    (what a long training stream sees: without the start-up every pass pays once, such as worker
    start or Ray Data's resource discovery), and ``first_output_s``, that start-up."""
    t0 = time.perf_counter()
    n = n_first = 0
    t_first = None
    for k in outputs:
        n += k
        if t_first is None:
            t_first, n_first = time.perf_counter(), k
    t_end = time.perf_counter()
    whole = n / (t_end - t0)
    # A stream of one output (tiny --quick runs) has no steady state: its whole pass stands in.
    sustained = (n - n_first) / (t_end - t_first) if n > n_first else whole
    return {"fields_per_s": whole, "sustained_fields_per_s": sustained, "first_output_s": t_first - t0}


def measure_raw(pool, manifest: pd.DataFrame, chunk: int, zarrs: bool = False) -> dict:
    """(a): chunks of ``chunk`` fields (a read task's share in (b)/(c)) over the pool's processes."""
    rows = [(r.store_uri, r.row, r.col, int(r.field)) for r in manifest.itertuples()]
    chunks = [rows[i:i + chunk] for i in range(0, len(rows), chunk)]
    return measure_stream(pool.imap_unordered(_read_fields_zarrs if zarrs else _read_fields, chunks))


# ------------------------------------------------------------------------------------ (b, c) Ray Data


def measure_ray(manifest: pd.DataFrame, cfg, batch_size: int = 16, training: bool = False) -> dict:
    """(b)/(c): the stream consumed with iter_batches on the driver. ``training`` streams a training
    pass (uint8 transfer applies to training only) without channel permutation."""
    import dataclasses

    from cellfm.data.pipeline.dataset import build_field_dataset

    if training:
        ds = build_field_dataset(manifest, dataclasses.replace(cfg, channel_permutation=False), training=True, seed=0)
    else:
        ds = build_field_dataset(manifest, cfg, training=False)
    return measure_stream(len(batch["image"]) for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"))


# ------------------------------------------------------------------------------------ in one process


def measure_in_process(manifest: pd.DataFrame, read_batch_size: int, repeats: int) -> dict:
    """CPU ms per field (all of the process's threads: zarrs decodes on its own) of the read task's work
    in one process, no Ray: the decode alone (a's work) and ``FieldLoader`` over read blocks without and
    with percentile clipping into float16 (b's and c's work, before any transfer). a / c here is the
    c / a that a pipeline moving fields at no cost would reach."""
    import dataclasses

    import torch

    from cellfm.config import DataConfig
    from cellfm.data.pipeline.layout import field_table, read_block_columns, stream_layout
    from cellfm.data.pipeline.loader import FieldLoader
    from cellfm.data.plate import read_field, use_zarrs
    from multicrop_ablation import interleaved_ms

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one read task's share of a core, as in Ray (OMP_NUM_THREADS=1 there)
    use_zarrs(True)
    base = DataConfig(read_batch_size=read_batch_size, use_zarrs=True)
    rows = [(r.store_uri, r.row, r.col, int(r.field)) for r in manifest.itertuples()]

    def decode():
        for where in rows:
            read_field(*where)

    def loader(normalization: str):
        cfg = dataclasses.replace(base, normalization=normalization)
        load = FieldLoader(cfg, permute_channels=False, layout=stream_layout(manifest, cfg))
        blocks = list(read_block_columns(field_table(manifest, []), cfg))
        return lambda: [load(block) for block in blocks]

    work = {"a_decode": decode, "b_loader_none": loader("none"), "c_loader_percentile": loader("percentile")}
    # Warm-up (page cache, codec pipeline), then interleaved repeats, medians.
    ms = {name: t / len(rows) for name, t in interleaved_ms(work, repeats, time.process_time).items()}
    torch.set_num_threads(threads)
    use_zarrs(False)
    return {"fields": len(rows), "cpu_ms_per_field": ms, "repeats_interleaved": repeats,
            "c_over_a": ms["a_decode"] / ms["c_loader_percentile"], "b_over_a": ms["a_decode"] / ms["b_loader_none"]}


# ------------------------------------------------------------------------------------ (d) naive TIFF


class NaiveTiffDataset:
    """What one writes without a pipeline: per-channel TIFFs, np.percentile per image, float32."""

    def __init__(self, tiffs):
        self.tiffs = tiffs

    def __len__(self):
        return len(self.tiffs)

    def __getitem__(self, i):
        import tifffile
        import torch

        image = np.stack([tifffile.imread(p) for p in self.tiffs[i]]).astype(np.float32)
        lo, hi = np.percentile(image.reshape(len(image), -1), [1, 99], axis=1)
        image = np.clip((image - lo[:, None, None]) / np.maximum(hi - lo, 1e-6)[:, None, None], 0, 1)
        return torch.from_numpy(image.astype(np.float32))


def measure_naive(loader) -> dict:
    return measure_stream(len(batch) for batch in loader)


# ------------------------------------------------------------------------------------ memory


class MemorySampler:
    """Peak sum of RSS over the driver + every Ray process, and peak object-store usage."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.peak_rss = 0
        self.peak_store = 0
        self._stop = threading.Event()

    @staticmethod
    def _ray_processes():
        import psutil

        me = psutil.Process()
        procs = [me]
        for p in psutil.process_iter(["name", "cmdline"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                if p.pid != me.pid and ("ray::" in cmd or "raylet" in cmd or "gcs_server" in cmd
                                        or "ray/_private" in cmd or (p.info["name"] or "").startswith("ray::")):
                    procs.append(p)
            except Exception:  # noqa: BLE001
                pass
        return procs

    @staticmethod
    def object_store_bytes() -> int:
        from ray._private.internal_api import memory_summary

        text = memory_summary(stats_only=True)
        match = re.search(r"Plasma memory usage (\d+) MiB", text)
        return int(match.group(1)) * MB if match else 0

    def _run(self):
        n = 0
        while not self._stop.is_set():
            total = 0
            for p in self._ray_processes():
                try:
                    total += p.memory_info().rss
                except Exception:  # noqa: BLE001
                    pass
            self.peak_rss = max(self.peak_rss, total)
            if n % 2 == 0:
                try:
                    self.peak_store = max(self.peak_store, self.object_store_bytes())
                except Exception:  # noqa: BLE001
                    pass
            n += 1
            self._stop.wait(self.interval)

    def __enter__(self):
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def measure_memory(manifest: pd.DataFrame, cfg) -> dict:
    with MemorySampler() as sampler:
        rate = measure_ray(manifest, cfg)
    return {"fields": len(manifest), **rate, "peak_rss_mb": sampler.peak_rss / MB,
            "peak_object_store_mb": sampler.peak_store / MB}


# ------------------------------------------------------------------------------------ multi-crop


def measure_multicrop(batch: int, channels: int, size: int, global_size: int, local_size: int, n_local: int,
                      repeats: int, threads: int) -> dict:
    import torch

    from cellfm.ssl.multicrop import MultiCrop
    from multicrop_ablation import per_view_loop

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    images = torch.rand(batch, channels, size, size)
    mask = torch.ones(batch, channels, dtype=torch.bool)
    mask[::2, -1] = False
    images[~mask] = 0
    crop = MultiCrop(global_size, local_size, n_local)
    gen = torch.Generator().manual_seed(0)
    views = batch * (2 + n_local)

    def batched():
        crop(images, generator=gen, channel_mask=mask)

    def per_image():
        for b in range(batch):
            crop(images[b:b + 1], generator=gen, channel_mask=mask[b:b + 1])

    def per_view():
        per_view_loop(images, global_size, local_size, n_local, gen)

    result = {"batch": batch, "channels": channels, "input": size, "global": global_size, "local": local_size,
              "n_local": n_local, "crops_per_call": views, "torch_threads": threads}
    times = {k: [] for k in ("batched", "per_image_multicrop", "per_image_per_view")}
    for fn in (batched, per_image, per_view):
        fn()  # warm-up
    for _ in range(repeats):  # interleaved
        for key, fn in (("batched", batched), ("per_image_multicrop", per_image), ("per_image_per_view", per_view)):
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    for key, ts in times.items():
        result[f"{key}_crops_per_s"] = views / float(np.median(ts))
    result["speedup_vs_per_image_multicrop"] = result["batched_crops_per_s"] / result["per_image_multicrop_crops_per_s"]
    result["speedup_vs_per_image_per_view"] = result["batched_crops_per_s"] / result["per_image_per_view_crops_per_s"]
    return result


def run_multicrop(cores: int) -> tuple[dict, dict, dict]:
    """The multi-crop section: results per size and thread count, its ratios and its targets."""
    import torch

    multicrop = {}
    for threads in sorted({cores, 1}, reverse=True):
        multicrop[f"demo_64px_{threads}threads"] = measure_multicrop(64, 5, 128, 64, 32, 4, repeats=15, threads=threads)
        multicrop[f"jump_224px_{threads}threads"] = measure_multicrop(16, 5, 512, 224, 96, 6, repeats=7, threads=threads)
    torch.set_num_threads(cores)
    print(json.dumps(multicrop, indent=1), flush=True)
    ratios, targets = {}, {}
    for name, result in multicrop.items():
        ratios[f"multicrop {name}: batched_over_per_image"] = result["speedup_vs_per_image_multicrop"]
        ratios[f"multicrop {name}: batched_over_per_view_loop"] = result["speedup_vs_per_image_per_view"]
        if result["torch_threads"] != cores:
            continue  # one thread on a multi-core machine: reported, not held to the bars
        # the bars, on all of this machine's cores: >= 5x at the demo size, not slower at 224 px
        bar = 5.0 if name.startswith("demo") else 1.0
        targets[f"multicrop {name}: batched >= {bar:g} x per-image loop"] = (
            ratios[f"multicrop {name}: batched_over_per_image"] >= bar)
    return multicrop, ratios, targets


def update_multicrop(out: Path, cores: int) -> None:
    """--only multicrop: rerun the multi-crop section and replace its entries in an existing results file."""
    import torch

    if not out.is_file():
        raise SystemExit(f"--only multicrop updates an existing results file, and {out} is not one: "
                         "run the full benchmark first")
    result = json.loads(out.read_text())
    multicrop, ratios, targets = run_multicrop(cores)
    result["multicrop"] = multicrop
    for section, fresh in (("ratios", ratios), ("targets_met", targets)):
        kept = {k: v for k, v in result[section].items() if not k.startswith("multicrop ")}
        result[section] = {**kept, **fresh}
    result["machine"]["torch"] = torch.__version__
    result["multicrop_updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"ratios": ratios, "targets_met": targets}, indent=2))
    print(f"updated the multicrop section of {out}")


# ------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/tmp/cellfm-bench-pipeline", help="where plates/TIFFs are cached")
    parser.add_argument("--plates", type=int, default=4)
    parser.add_argument("--wells", type=int, default=12)
    parser.add_argument("--fields", type=int, default=4, help="fields per well")
    parser.add_argument("--size", type=int, default=1080)
    parser.add_argument("--copies", type=int, default=10, help="the 'many plates' run streams this many x the plates")
    parser.add_argument("--measure-fields", type=int, default=192,
                        help="fields per throughput repeat (CLAHE: half of them)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--read-batch-size", type=int, default=8, help="fields per read task (b and c alike)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "pipeline.json"))
    parser.add_argument("--quick", action="store_true", help="small smoke run (not for reporting)")
    parser.add_argument("--only", choices=["multicrop"],
                        help="rerun only this section and update its entries in --out, keeping the rest")
    args = parser.parse_args()
    for name in ("plates", "wells", "fields", "size", "copies", "measure_fields", "repeats", "read_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.only == "multicrop":
        update_multicrop(Path(args.out), os.cpu_count() or 1)
        return
    if args.quick:
        args.plates, args.wells, args.fields, args.size, args.copies = 2, 2, 2, 256, 3
        args.measure_fields, args.repeats, args.root = 8, 1, args.root + "-quick"

    import ray
    import torch
    from torch.utils.data import DataLoader

    from cellfm.config import DataConfig
    from cellfm.data.plate import use_zarrs

    cores = os.cpu_count() or 1
    t_start = time.perf_counter()
    manifest1, manifest10, tiffs = make_dataset(Path(args.root), args.plates, args.wells, args.fields, args.size,
                                                args.copies, n_tiff=min(args.measure_fields, args.plates * args.wells * args.fields))
    subset = manifest1.iloc[: args.measure_fields]
    field_mb = len(CHANNELS) * args.size * args.size * 2 / MB  # raw uint16 bytes per field

    in_process = measure_in_process(subset.iloc[:32], args.read_batch_size, args.repeats)
    print(f"in one process, no Ray: {in_process}", flush=True)
    # (a) and (d) workers start before Ray (spawn: no forked zarr/ray threads), one per core, kept warm.
    pool = mp.get_context("spawn").Pool(cores)
    warm_rows = [[(r.store_uri, r.row, r.col, int(r.field))] for r in subset.iloc[:cores].itertuples()]
    pool.map(_read_fields, warm_rows)
    pool.map(_read_fields_zarrs, warm_rows)
    naive_loader = DataLoader(NaiveTiffDataset(tiffs), batch_size=16, num_workers=cores, persistent_workers=True,
                              multiprocessing_context="spawn")
    measure_naive(naive_loader)  # warm-up (worker start)

    import ray.data

    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.DataContext.get_current().print_on_execution_start = False
    base = dict(read_cpus=1.0, read_batch_size=args.read_batch_size, progress_interval_s=0.0)
    zarrs_available = use_zarrs(True)
    use_zarrs(False)
    if not zarrs_available:
        raise SystemExit("this benchmark compares both codec pipelines: pip install 'cellfm[zarrs]'")
    fast = dict(base, use_zarrs=True)
    configs = {
        "b_ray_raw": DataConfig(normalization="none", **base),
        "c_percentile": DataConfig(normalization="percentile", **base),
        "b_ray_raw_zarrs": DataConfig(normalization="none", **fast),
        "c_percentile_zarrs": DataConfig(normalization="percentile", **fast),
        "b_ray_raw_zarrs_actors": DataConfig(normalization="none", read_actors=cores, **fast),
        "c_percentile_zarrs_actors": DataConfig(normalization="percentile", read_actors=cores, **fast),
        "c_percentile_0.1_99.9_zarrs": DataConfig(normalization="percentile", clip_low=0.1, clip_high=99.9, **fast),
        "c_percentile_uint8_zarrs": DataConfig(normalization="percentile", transfer_dtype="uint8", **fast),
        "c_clahe_zarrs": DataConfig(normalization="clahe", **fast),
        "c_standardize_zarrs": DataConfig(normalization="standardize", **fast),
    }
    for warm in ("c_percentile", "c_percentile_zarrs"):  # warm-up: Ray workers start, codec pipelines load
        measure_ray(subset.iloc[:8], configs[warm])

    rates: dict[str, list[dict]] = {"a_raw_zarr_processes": [], "a_raw_zarrs_processes": [],
                                     "d_naive_tiff_dataloader": [], **{k: [] for k in configs}}
    for rep in range(args.repeats):
        rates["a_raw_zarr_processes"].append(measure_raw(pool, subset, args.read_batch_size))
        rates["a_raw_zarrs_processes"].append(measure_raw(pool, subset, args.read_batch_size, zarrs=True))
        for name, cfg in configs.items():
            fields = subset.iloc[: max(8, args.measure_fields // 2)] if name.startswith("c_clahe") else subset
            # uint8 transfer is a training-stream option
            rates[name].append(measure_ray(fields, cfg, training="uint8" in name))
            _wait_for_free_cpus(cores)  # reader actors hold their CPUs until Ray Data has torn them down
        rates["d_naive_tiff_dataloader"].append(measure_naive(naive_loader))
        print(f"repeat {rep + 1}/{args.repeats} (sustained fields/s): "
              + ", ".join(f"{k} {v[-1]['sustained_fields_per_s']:.1f}" for k, v in rates.items()), flush=True)
    pool.close()
    del naive_loader

    throughput = {}
    for name, values in rates.items():
        sustained = float(np.median([v["sustained_fields_per_s"] for v in values]))
        whole = float(np.median([v["fields_per_s"] for v in values]))
        throughput[name] = {"sustained_fields_per_s": sustained, "sustained_fields_per_s_per_core": sustained / cores,
                            "sustained_mb_per_s": sustained * field_mb, "whole_pass_fields_per_s": whole,
                            "first_output_s": float(np.median([v["first_output_s"] for v in values])),
                            "repeats": [{k: round(x, 3) for k, x in v.items()} for v in values]}

    # Memory: the full percentile pipeline over 1x and 10x the plates (10x the fields).
    mem_cfg = DataConfig(normalization="percentile", object_store_limit_mb=1024, **fast)
    memory_1x = measure_memory(manifest1, mem_cfg)
    memory_10x = measure_memory(manifest10, mem_cfg)
    print(f"memory 1x {memory_1x}\nmemory 10x {memory_10x}", flush=True)
    ray_version = ray.__version__
    # Multi-crop is device work with no Ray in it: measured after Ray and its workers are gone, so the
    # teardown of the passes above does not share the cores with it.
    ray.shutdown()

    multicrop, multicrop_ratios, multicrop_targets = run_multicrop(cores)

    # Ratios of sustained rates (the targets), and the same over whole passes (start-up included).
    ratios = _throughput_ratios({name: v["sustained_fields_per_s"] for name, v in throughput.items()})
    ratios_whole_pass = _throughput_ratios({name: v["whole_pass_fields_per_s"] for name, v in throughput.items()})
    ratios.update({
        "peak_rss_10x_over_1x": memory_10x["peak_rss_mb"] / memory_1x["peak_rss_mb"],
        "peak_object_store_10x_over_1x": (memory_10x["peak_object_store_mb"] / memory_1x["peak_object_store_mb"]
                                          if memory_1x["peak_object_store_mb"] else None),
    })
    ratios.update(multicrop_ratios)
    ratios["zarrs, in one process (no Ray): c_percentile_over_a_raw"] = in_process["c_over_a"]
    ratios["zarrs, in one process (no Ray): b_ray_raw_over_a_raw"] = in_process["b_over_a"]
    targets = {}
    for pipeline in _PIPELINES:
        for bar, (key, name) in ((0.75, ("b_ray_raw", "c_percentile_over_b_ray_raw")),
                                 (0.5, ("a_raw", "c_percentile_over_a_raw")), (2.0, ("d_naive", "c_percentile_over_d_naive"))):
            targets[f"{pipeline}: c_percentile >= {bar:g} x {key}"] = ratios[f"{pipeline}: {name}"] >= bar
    targets["peak memory 10x < 1.25 x 1x"] = ratios["peak_rss_10x_over_1x"] < 1.25
    targets.update(multicrop_targets)
    result = {
        "benchmark": "cellfm data pipeline",
        "machine": {"cores": cores, "python": sys.version.split()[0], "platform": platform.platform(),
                    "ray": ray_version, "torch": torch.__version__, "zarrs": zarrs_available},
        "dataset": {"field_shape": [len(CHANNELS), args.size, args.size], "dtype": "uint16",
                    "codec": "sharded zarr v3, one shard per field, 256x256 inner chunks, blosc-zstd(5)+bitshuffle, crc32c",
                    "plates_1x": args.plates, "fields_1x": len(manifest1), "plates_10x": args.plates * args.copies,
                    "fields_10x": len(manifest10), "fields_per_throughput_repeat": len(subset),
                    "raw_mb_per_field": field_mb,
                    "note": "10x plates are hard-linked copies of the 1x plates under other names (same page cache)"},
        "settings": {"ray_num_cpus": cores, "read_cpus": base["read_cpus"], "read_batch_size": base["read_batch_size"],
                     "memory_run": "percentile, zarrs, float16",
                     "consumer": "driver ds.iter_batches(batch_size=16, numpy) (b, c); DataLoader(batch 16, "
                                 f"{cores} workers) (d); Pool({cores}).imap_unordered of read_field over chunks of "
                                 f"{args.read_batch_size} fields (a)",
                     "repeats_interleaved": args.repeats, "memory_object_store_limit_mb": 1024},
        "throughput": throughput,
        "memory": {"1x": memory_1x, "10x": memory_10x},
        "in_process": in_process,
        "multicrop": multicrop,
        "ratios": ratios,
        "ratios_whole_pass": ratios_whole_pass,
        "targets_met": targets,
        "runtime_s": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"ratios": ratios, "targets_met": targets}, indent=2))
    print(f"wrote {out} in {result['runtime_s']:.0f} s")


# The pipelines compared, like with like: (a), (b), (c) on one codec pipeline; read tasks, or
# data.read_actors reader actors (one per core).
_PIPELINES = {
    "zarr": ("a_raw_zarr_processes", "b_ray_raw", "c_percentile"),
    "zarrs": ("a_raw_zarrs_processes", "b_ray_raw_zarrs", "c_percentile_zarrs"),
    "zarrs, reader actors": ("a_raw_zarrs_processes", "b_ray_raw_zarrs_actors", "c_percentile_zarrs_actors"),
}


def _wait_for_free_cpus(cores: int, timeout_s: float = 30.0) -> None:
    import ray

    deadline = time.perf_counter() + timeout_s
    while ray.available_resources().get("CPU", 0.0) < cores and time.perf_counter() < deadline:
        time.sleep(0.05)


def _throughput_ratios(rate: dict[str, float]) -> dict[str, float]:
    """The pipeline's ratios for one kind of rate, like with like: a, b and c on the same codec pipeline."""
    ratios, d = {}, rate["d_naive_tiff_dataloader"]
    for pipeline, names in _PIPELINES.items():
        a, b, c = (rate[name] for name in names)
        ratios.update({f"{pipeline}: c_percentile_over_b_ray_raw": c / b, f"{pipeline}: c_percentile_over_a_raw": c / a,
                       f"{pipeline}: c_percentile_over_d_naive": c / d, f"{pipeline}: b_ray_raw_over_a_raw": b / a})
    ratios.update({
        "zarrs: c_percentile_uint8_over_b_ray_raw": rate["c_percentile_uint8_zarrs"] / rate["b_ray_raw_zarrs"],
        "zarrs: c_percentile_uint8_over_d_naive": rate["c_percentile_uint8_zarrs"] / d,
        "zarrs_over_zarr: a_raw": rate["a_raw_zarrs_processes"] / rate["a_raw_zarr_processes"],
    })
    return ratios


if __name__ == "__main__":
    main()
