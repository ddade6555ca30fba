"""Synthetic generator and plate I/O throughput, single process (= per core), local store.

    python benchmarks/synthetic_io.py            # writes benchmarks/results/synthetic_io.json

Measures: fields/s of ``render_field`` (cp5) and ``render_family_field`` (each family config) at
128 x 128 px; plate write and read throughput in MB/s of uncompressed uint16 pixels (blosc-zstd,
one shard per field), whole fields and 64 x 64 crops, with zarr's default codec pipeline and with
zarrs when installed. Page cache is warm for reads (the plate was just written).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from cellfm.data.plate import read_field, use_zarrs
from cellfm.data.plate_writer import create_plate, write_field
from cellfm.data.synthetic.catalog import CP5_CHANNELS, FAMILY_CONFIGS, PERTURBATIONS, PROTEINS
from cellfm.data.synthetic.optics import BatchEffect, render_family_field, render_field

SIZE = 128
EFFECT = BatchEffect(gain={}, offset={}, vignetting=0.3, photons_per_count=1.0, read_noise=6.0)


def _rate(fn, n: int) -> float:
    fn(0)  # warm-up (caches, imports)
    started = time.perf_counter()
    for i in range(n):
        fn(i + 1)
    return n / (time.perf_counter() - started)


def main() -> dict:
    results: dict = {"field_size": SIZE, "cpu": platform.processor() or platform.machine(), "cores_used": 1,
                     "os_cpu_count": os.cpu_count(), "generator_fields_per_s": {}}
    ph = PERTURBATIONS[4].phenotype
    results["generator_fields_per_s"]["cp5 (render_field)"] = round(
        _rate(lambda i: render_field(np.random.default_rng(i), CP5_CHANNELS, ph, SIZE, EFFECT), 40), 1)
    for name, cfg in FAMILY_CONFIGS.items():
        protein = PROTEINS[0] if cfg.label == "localization" else None
        results["generator_fields_per_s"][name] = round(_rate(lambda i: render_family_field(
            np.random.default_rng(i), list(cfg.channels), ph, SIZE, EFFECT, protein), 40), 1)

    tmp = Path(tempfile.mkdtemp(prefix="cellfm-io-"))
    try:
        wells = [(chr(ord("A") + r), f"{c + 1:02d}") for r in range(4) for c in range(6)]
        n_fields = 4
        fields = [render_field(np.random.default_rng(i), CP5_CHANNELS, ph, SIZE, EFFECT) for i in range(8)]
        uri = str(tmp / "bench.zarr")
        create_plate(uri, "bench", wells, n_fields, CP5_CHANNELS, (SIZE, SIZE))
        field_mb = fields[0].nbytes / 1e6
        keys = [(r, c, f) for r, c in wells for f in range(n_fields)]
        started = time.perf_counter()
        for i, (r, c, f) in enumerate(keys):
            write_field(uri, r, c, f, fields[i % len(fields)])
        write_s = time.perf_counter() - started
        stored = sum(p.stat().st_size for p in Path(uri).rglob("*") if p.is_file())
        results["plate"] = {"fields": len(keys), "channels": 5, "field_MB_uncompressed": round(field_mb, 4),
                            "compression_ratio": round(len(keys) * field_mb * 1e6 / stored, 2),
                            "write_MB_per_s": round(len(keys) * field_mb / write_s, 1),
                            "write_fields_per_s": round(len(keys) / write_s, 1)}
        for pipeline in ("default", "zarrs"):
            if pipeline == "zarrs" and not use_zarrs(True):
                results["plate"]["zarrs"] = "not installed"
                continue
            try:
                read_field(uri, *keys[0])  # warm
                started = time.perf_counter()
                for r, c, f in keys:
                    read_field(uri, r, c, f)
                read_s = time.perf_counter() - started
                started = time.perf_counter()
                for r, c, f in keys:
                    read_field(uri, r, c, f, region=(32, 96, 32, 96))
                crop_s = time.perf_counter() - started
            finally:
                use_zarrs(False)
            results["plate"][f"read_{pipeline}_MB_per_s"] = round(len(keys) * field_mb / read_s, 1)
            results["plate"][f"read_{pipeline}_fields_per_s"] = round(len(keys) / read_s, 1)
            results["plate"][f"crop64_{pipeline}_reads_per_s"] = round(len(keys) / crop_s, 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = Path(__file__).parent / "results" / "synthetic_io.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
