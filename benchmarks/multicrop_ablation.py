"""Why MultiCrop's CPU path is built the way it is: each design choice measured against its
alternative in one run, at the demo size of benchmarks/pipeline.py's multi-crop section (a batch
of 64 5-channel 128x128 images; 2 global 64-px + 4 local 32-px views), on all cores.

  block size   whole MultiCrop calls with _CPU_BLOCK_BYTES_PER_THREAD at 1..16 MB (4 MB is used)
  streaming    F.grid_sample over the batch's real blocks and grids, in order, with and without a
  read         streaming read (sum) of each block's input first
  grid         the sampling grid of a block as one complex broadcast add vs one strided add per
               coordinate into the interleaved (x, y) pairs
  intensity    the jitter pass as mul + add_ vs one addcmul
  dtype        F.grid_sample of a block in float32 vs float16 / bfloat16

Every comparison is timed interleaved (medians), and reported as a ratio of the alternative's time
to the chosen one's (> 1: the choice is faster). Writes benchmarks/results/multicrop_ablation.json.

    python benchmarks/multicrop_ablation.py      # about 10 s on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

from cellfm.ssl import multicrop  # noqa: E402
from cellfm.ssl.multicrop import MultiCrop  # noqa: E402

BATCH, CHANNELS, SIZE, GLOBAL, LOCAL, N_LOCAL = 64, 5, 128, 64, 32, 4
BLOCK_MB = (1, 2, 4, 6, 8, 16)


def interleaved_ms(fns: dict, repeats: int) -> dict[str, float]:
    """Median ms per call of each function, the functions taking turns (a noisy machine drifts)."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * float(np.median(ts)) for name, ts in times.items()}


def block_sizes(images, mask, crop, repeats: int) -> dict:
    def call_with(mb: int):
        def call():
            with mock.patch.object(multicrop, "_CPU_BLOCK_BYTES_PER_THREAD", mb << 20):
                crop(images, torch.Generator().manual_seed(0), channel_mask=mask)
        return call

    ms = interleaved_ms({f"{mb}MB": call_with(mb) for mb in BLOCK_MB}, repeats)
    return {"ms_per_call": ms, "time_over_4MB": {k: v / ms["4MB"] for k, v in ms.items()}}


def recorded_grid_samples(images, mask, crop) -> list[tuple]:
    """The (input block, grid) of every grid_sample call of one MultiCrop call, in order."""
    with mock.patch.object(multicrop.F, "grid_sample", wraps=F.grid_sample) as spy:
        crop(images, torch.Generator().manual_seed(0), channel_mask=mask)
    return [(c.args[0], c.args[1].clone(), c.kwargs) for c in spy.call_args_list]


def streaming_read(calls, repeats: int) -> dict:
    def replay(prefetch: bool):
        def run():
            previous = None
            for block, grid, kwargs in calls:
                if prefetch and block.data_ptr() != previous:  # once per block, as MultiCrop does
                    block.sum()
                previous = block.data_ptr()
                F.grid_sample(block, grid, **kwargs)
        return run

    ms = interleaved_ms({"with_streaming_read": replay(True), "without": replay(False)}, repeats)
    return {"ms_all_blocks": ms, "without_over_with": ms["without"] / ms["with_streaming_read"]}


def grid_build(block: int, repeats: int) -> dict:
    n_views, size = 2, GLOBAL
    column = torch.rand(block, n_views, 1, size, dtype=torch.complex64)
    row = torch.rand(block, n_views, size, 1, dtype=torch.complex64)
    column_xy, row_xy = torch.view_as_real(column).movedim(-1, 0), torch.view_as_real(row).movedim(-1, 0)
    grid = torch.empty(block, n_views, size, size, 2)

    def complex_add():
        torch.add(column, row, out=torch.view_as_complex(grid))

    def per_coordinate():
        for axis in range(2):
            torch.add(column_xy[axis], row_xy[axis], out=grid[..., axis])

    complex_add()
    expected = grid.clone()
    per_coordinate()
    assert torch.equal(grid, expected)  # the same grid either way
    ms = interleaved_ms({"complex_add": complex_add, "per_coordinate_strided": per_coordinate}, repeats)
    return {"ms_per_block": ms, "per_coordinate_over_complex": ms["per_coordinate_strided"] / ms["complex_add"]}


def intensity_pass(block: int, repeats: int) -> dict:
    n_views, size = 2, GLOBAL
    sampled = torch.rand(block, CHANNELS, n_views * size, size)
    views = sampled.view(block, CHANNELS, n_views, size, size).permute(2, 0, 1, 3, 4)
    slope, offset = torch.rand(n_views, block, CHANNELS, 1, 1), torch.rand(n_views, block, CHANNELS, 1, 1)
    out = torch.empty(n_views, block, CHANNELS, size, size)

    def mul_add():
        torch.mul(views, slope, out=out)
        out.add_(offset)

    def addcmul():
        torch.addcmul(offset, views, slope, out=out)

    ms = interleaved_ms({"mul_add_": mul_add, "addcmul": addcmul}, repeats)
    return {"ms_per_block": ms, "addcmul_over_mul_add_": ms["addcmul"] / ms["mul_add_"]}


def grid_sample_dtypes(block_input, grid, kwargs, repeats: int) -> dict:
    fns = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x, g = block_input.to(dtype), grid.to(dtype)
        fns[str(dtype).removeprefix("torch.")] = lambda x=x, g=g: F.grid_sample(x, g, **kwargs)
    ms = interleaved_ms(fns, repeats)
    return {"ms_per_block": ms, "time_over_float32": {k: v / ms["float32"] for k, v in ms.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "multicrop_ablation.json"))
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    torch.manual_seed(0)
    images = torch.rand(BATCH, CHANNELS, SIZE, SIZE)
    mask = torch.ones(BATCH, CHANNELS, dtype=torch.bool)
    mask[::2, -1] = False  # as in benchmarks/pipeline.py: half the images carry a padded channel
    images[~mask] = 0
    crop = MultiCrop(GLOBAL, LOCAL, N_LOCAL)
    block = crop._images_per_block(images)
    t0 = time.perf_counter()

    calls = recorded_grid_samples(images, mask, crop)
    result = {
        "benchmark": "MultiCrop CPU design choices",
        "machine": {"cores": cores, "torch_threads": cores, "python": sys.version.split()[0],
                    "platform": platform.platform(), "torch": torch.__version__},
        "setting": {"batch": BATCH, "channels": CHANNELS, "input": SIZE, "global": GLOBAL, "local": LOCAL,
                    "n_local": N_LOCAL, "images_per_block": block, "repeats_interleaved": args.repeats},
        "block_size": block_sizes(images, mask, crop, args.repeats),
        "streaming_read": streaming_read(calls, args.repeats),
        "grid_build": grid_build(block, 5 * args.repeats),
        "intensity_pass": intensity_pass(block, 5 * args.repeats),
        "grid_sample_dtype": grid_sample_dtypes(*calls[0], args.repeats),
    }
    result["runtime_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
