"""MultiCrop on CPU against a torchvision-style per-view loop, and why it is built the way it is: each
design choice measured against its alternative, all in one run.

  vs loop      the batched MultiCrop against per_view_loop (per image and view: crop, F.interpolate,
               flip, rot90, gain) at 64 px (a batch of 64 5-channel 128x128 images; 2 global 64-px +
               4 local 32-px views) and 224 px (16 5-channel 512x512 images; 2 global 224-px + 6
               local 96-px views): wall time on all cores, and CPU time of one thread
  resampler    whole MultiCrop calls (globals only) with every view through batched grid_sample vs
               one F.interpolate per view, per view size (where _PER_VIEW_MIN_SIZE comes from)

and, at the 64-px size (all views through grid_sample):

  block size   whole MultiCrop calls with _CPU_BLOCK_BYTES_PER_THREAD at 1..16 MB (4 MB is used)
  streaming    F.grid_sample over the batch's real blocks and grids, in order, with and without a
  read         streaming read (sum) of each block's input first
  grid         the sampling grid of a block as one complex broadcast add vs one strided add per
               coordinate into the interleaved (x, y) pairs
  intensity    the jitter pass as mul + add_ vs one addcmul
  dtype        F.grid_sample of a block in float32 vs float16 / bfloat16

Every comparison is timed interleaved (medians), and reported as a ratio of the alternative's time
to the chosen one's (> 1: the choice is faster). The machine's load average is recorded before and
after: on a shared machine wall-time ratios of multithreaded ops suffer most (a descheduled thread
stalls the op), the one-thread CPU-time ratios least. Writes benchmarks/results/multicrop_ablation.json.

    python benchmarks/multicrop_ablation.py      # about 1 min on 2 idle cores
"""

from __future__ import annotations

import argparse
import json
import math
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
# (batch, input size, global size, local size, n_local) of the comparisons with the per-view loop
LOOP_SETTINGS = {"64px": (64, 128, 64, 32, 4), "224px": (16, 512, 224, 96, 6)}
RESAMPLER_SIZES = (32, 64, 96, 128, 224)


def interleaved_ms(fns: dict, repeats: int, clock=time.perf_counter) -> dict[str, float]:
    """Median ms per call of each function, the functions taking turns (a noisy machine drifts)."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return {name: 1e3 * float(np.median(ts)) for name, ts in times.items()}


def per_view_loop(images, global_size, local_size, n_local, gen):
    """torchvision-style: per image, per view, crop a random box, resize, flip/rotate, jitter."""
    B, C, H, W = images.shape
    views_g, views_l = [], []
    for b in range(B):
        for size, scale, n, out in ((global_size, (0.32, 1.0), 2, views_g), (local_size, (0.05, 0.32), n_local, views_l)):
            for _ in range(n):
                area = H * W * float(torch.empty(1).uniform_(*scale, generator=gen))
                ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)))
                w = min(W, int(round(math.sqrt(area * ratio))))
                h = min(H, int(round(math.sqrt(area / ratio))))
                y = int(torch.randint(0, H - h + 1, (1,), generator=gen))
                x = int(torch.randint(0, W - w + 1, (1,), generator=gen))
                view = F.interpolate(images[b:b + 1, :, y:y + h, x:x + w], size=(size, size), mode="bilinear",
                                     align_corners=False)[0]
                if torch.rand(1, generator=gen) < 0.5:
                    view = view.flip(-1)
                view = torch.rot90(view, int(torch.randint(0, 4, (1,), generator=gen)), dims=(-2, -1))
                gain = 1 + 0.2 * (2 * torch.rand(C, 1, 1, generator=gen) - 1)
                view = view * gain
                out.append(view)
    return torch.stack(views_g), torch.stack(views_l)


def padded_batch(batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 5-channel images, half of them with a padded (zero, masked) last channel, as the
    data pipeline delivers a mix of 4- and 5-channel plates."""
    images = torch.rand(batch, CHANNELS, size, size)
    mask = torch.ones(batch, CHANNELS, dtype=torch.bool)
    mask[::2, -1] = False
    images[~mask] = 0
    return images, mask


def versus_loop(cores: int, repeats: int) -> dict:
    """Batched MultiCrop / per-view loop time at each LOOP_SETTINGS size: wall time on all cores and
    CPU time of one thread (time.thread_time: what the work costs, whatever else the machine runs)."""
    result = {}
    for name, (batch, size, global_size, local_size, n_local) in LOOP_SETTINGS.items():
        images, mask = padded_batch(batch, size)
        crop = MultiCrop(global_size, local_size, n_local)
        fns = {"batched": lambda: crop(images, torch.Generator().manual_seed(0), channel_mask=mask),
               "per_view_loop": lambda: per_view_loop(images, global_size, local_size, n_local,
                                                      torch.Generator().manual_seed(0))}
        entry = {"batch": batch, "channels": CHANNELS, "input": size, "global": global_size, "local": local_size,
                 "n_local": n_local, "crops_per_call": batch * (2 + n_local)}
        for threads, clock, key in ((cores, time.perf_counter, f"wall_{cores}threads"),
                                    (1, time.thread_time, "cpu_1thread")):
            torch.set_num_threads(threads)
            ms = interleaved_ms(fns, repeats if size < 256 else max(3, repeats // 3), clock)
            entry[key] = {"ms_per_call": ms, "loop_over_batched": ms["per_view_loop"] / ms["batched"]}
        torch.set_num_threads(cores)
        result[name] = entry
    return result


def resamplers(repeats: int, cores: int) -> dict:
    """Globals-only MultiCrop calls (16 images of twice the view size, 5 channels) with every view
    through batched grid_sample vs one F.interpolate per view, by view size: CPU time of one thread."""
    torch.set_num_threads(1)
    result = {}
    for size in RESAMPLER_SIZES:
        images, mask = padded_batch(16, 2 * size)
        crop = MultiCrop(size, 8, n_local=0)

        def call_with(min_size: int):
            def call():
                with mock.patch.object(multicrop, "_PER_VIEW_MIN_SIZE", min_size):
                    crop(images, torch.Generator().manual_seed(0), channel_mask=mask)
            return call

        ms = interleaved_ms({"grid_sample": call_with(1 << 30), "per_view_interpolate": call_with(1)}, repeats,
                            time.thread_time)
        result[f"{size}px"] = {"cpu_ms_per_call": ms, "grid_over_per_view": ms["grid_sample"] / ms["per_view_interpolate"]}
    result["per_view_min_size"] = multicrop._PER_VIEW_MIN_SIZE
    torch.set_num_threads(cores)
    return result


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
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "multicrop_ablation.json"))
    args = parser.parse_args()
    if args.repeats < 4:
        parser.error(f"--repeats must be >= 4, got {args.repeats}")
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    torch.manual_seed(0)
    images, mask = padded_batch(BATCH, SIZE)
    crop = MultiCrop(GLOBAL, LOCAL, N_LOCAL)
    block = crop._images_per_block(images, [crop._view_set(images, 2, GLOBAL, crop.global_scale, None, mask),
                                             crop._view_set(images, N_LOCAL, LOCAL, crop.local_scale, None, mask)])
    t0 = time.perf_counter()
    load_before = os.getloadavg()

    calls = recorded_grid_samples(images, mask, crop)
    result = {
        "benchmark": "MultiCrop CPU design choices",
        "machine": {"cores": cores, "torch_threads": cores, "python": sys.version.split()[0],
                    "platform": platform.platform(), "torch": torch.__version__},
        "setting": {"batch": BATCH, "channels": CHANNELS, "input": SIZE, "global": GLOBAL, "local": LOCAL,
                    "n_local": N_LOCAL, "images_per_block": block, "repeats_interleaved": args.repeats},
        "vs_per_view_loop": versus_loop(cores, args.repeats // 4),
        "resampler": resamplers(args.repeats // 4, cores),
        "block_size": block_sizes(images, mask, crop, args.repeats),
        "streaming_read": streaming_read(calls, args.repeats),
        "grid_build": grid_build(block, 5 * args.repeats),
        "intensity_pass": intensity_pass(block, 5 * args.repeats),
        "grid_sample_dtype": grid_sample_dtypes(*calls[0], args.repeats),
    }
    result["runtime_s"] = time.perf_counter() - t0
    result["load_average_1min"] = {"before": load_before[0], "after": os.getloadavg()[0]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
