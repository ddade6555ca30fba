"""MultiCrop on CPU against a torchvision-style per-view loop, and why it is built the way it is: each
design choice measured against its alternative, all in one run.

  vs loop      the batched MultiCrop against per_view_loop (per image and view: crop, F.interpolate,
               flip, rot90, gain) at 64 px (a batch of 64 5-channel 128x128 images; 2 global 64-px +
               4 local 32-px views) and 224 px (16 5-channel 512x512 images; 2 global 224-px + 6
               local 96-px views): wall time on all cores, and CPU time of one thread; and the
               loop against the F.interpolate calls alone (resize_only: the most that a MultiCrop
               resizing with F.interpolate can gain on the loop)
  resampler    whole MultiCrop calls with every view through batched grid_sample vs one F.interpolate
               per view, for each view set of both sizes (view size, input size, box scales) and 128-px
               views from 256 and 512-px fields (where _PER_VIEW_MIN_SIZE comes from)

and, at the 224-px size (its 224-px globals are resized per view):

  transposed   a transposed view as the upright box's resize, transposed (as built), vs a resize of
               the transposed box

and, at the 64-px size (all views through grid_sample):

  block size   whole MultiCrop calls with _CPU_BLOCK_BYTES_PER_THREAD at 2..64 MB (32 MB is used)
  streaming    whole MultiCrop calls without (as built) and with a streaming read (sum) of each
  read         block's input before its grid_sample
  grid         the sampling grid of a block as one complex broadcast add vs one strided add per
               coordinate into the interleaved (x, y) pairs
  intensity    the jitter pass as mul + add_ vs one addcmul
  dtype        F.grid_sample of a block in float32 vs float16 / bfloat16

Every comparison is timed interleaved (medians), and reported as a ratio of the alternative's time
to the chosen one's (> 1: the choice is faster). The machine's load average is recorded before and
after: on a shared machine wall-time ratios of multithreaded ops suffer most (a descheduled thread
stalls the op), the one-thread CPU-time ratios least. Writes benchmarks/results/multicrop_ablation.json.

    python benchmarks/multicrop_ablation.py      # under a minute on 2 idle cores
"""

from __future__ import annotations

import argparse
import contextlib
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
BLOCK_MB = (2, 4, 8, 16, 32, 64)
CHOSEN_BLOCK_MB = multicrop._CPU_BLOCK_BYTES_PER_THREAD >> 20
# (batch, input size, global size, local size, n_local) of the comparisons with the per-view loop
LOOP_SETTINGS = {"64px": (64, 128, 64, 32, 4), "224px": (16, 512, 224, 96, 6)}
GLOBAL_SCALE, LOCAL_SCALE = (0.32, 1.0), (0.05, 0.32)  # MultiCrop's defaults
# (view size, input size, box scale range) of the resampler section: each view set of LOOP_SETTINGS,
# and 128-px globals, the threshold's size, from 256 and 512-px fields
RESAMPLER_CASES = ((32, 128, LOCAL_SCALE), (64, 128, GLOBAL_SCALE), (96, 512, LOCAL_SCALE),
                   (128, 256, GLOBAL_SCALE), (128, 512, GLOBAL_SCALE), (224, 512, GLOBAL_SCALE))


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
        for size, scale, n, out in ((global_size, GLOBAL_SCALE, 2, views_g), (local_size, LOCAL_SCALE, n_local, views_l)):
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


def resize_only(images, crop: MultiCrop):
    """One call's F.interpolate work and nothing else: every box MultiCrop draws (seed 0) cropped and
    resized to its view size, image by image. Every implementation that resizes with F.interpolate,
    the loop included, does this much; loop / resize_only bounds what such a MultiCrop can gain."""
    B, _, H, W = images.shape
    gen = torch.Generator().manual_seed(0)
    view_sets = [(crop._draw_boxes(B * n, H, W, scale, gen), n, size)
                 for n, size, scale in ((2, crop.global_size, crop.global_scale),
                                        (crop.n_local, crop.local_size, crop.local_scale))]
    regions = [[(images[b:b + 1, :, y:y + h, x:x + w], size)
                for boxes, n, size in view_sets
                for x, y, w, h in zip(*(c[b * n:(b + 1) * n].tolist() for c in (boxes.x0, boxes.y0, boxes.w, boxes.h)))]
               for b in range(B)]

    def run():
        for image_regions in regions:
            for region, size in image_regions:
                F.interpolate(region, size=(size, size), mode="bilinear", align_corners=False)
    return run


def versus_loop(cores: int, repeats: int) -> dict:
    """Batched MultiCrop / per-view loop time at each LOOP_SETTINGS size: wall time on all cores and
    CPU time of one thread (time.thread_time: what the work costs, whatever else the machine runs);
    and the loop against resize_only, the F.interpolate calls alone."""
    result = {}
    for name, (batch, size, global_size, local_size, n_local) in LOOP_SETTINGS.items():
        images, mask = padded_batch(batch, size)
        crop = MultiCrop(global_size, local_size, n_local)
        fns = {"batched": lambda: crop(images, torch.Generator().manual_seed(0), channel_mask=mask),
               "per_view_loop": lambda: per_view_loop(images, global_size, local_size, n_local,
                                                      torch.Generator().manual_seed(0)),
               "resize_only": resize_only(images, crop)}
        entry = {"batch": batch, "channels": CHANNELS, "input": size, "global": global_size, "local": local_size,
                 "n_local": n_local, "crops_per_call": batch * (2 + n_local)}
        for threads, clock, key in ((cores, time.perf_counter, f"wall_{cores}threads"),
                                    (1, time.thread_time, "cpu_1thread")):
            torch.set_num_threads(threads)
            ms = interleaved_ms(fns, repeats, clock)
            entry[key] = {"ms_per_call": ms, "loop_over_batched": ms["per_view_loop"] / ms["batched"],
                          "loop_over_resize_only": ms["per_view_loop"] / ms["resize_only"]}
        torch.set_num_threads(cores)
        result[name] = entry
    return result


def resamplers(repeats: int, cores: int) -> dict:
    """MultiCrop calls with every view through batched grid_sample vs one F.interpolate per view, for
    each view set of the LOOP_SETTINGS (16 images; one view size, its scale range and input size per
    case, 4 views per image) and 128-px views, the threshold's size, from 256 and 512-px fields: CPU
    time of one thread."""
    torch.set_num_threads(1)
    result = {}
    for size, input_size, scale in RESAMPLER_CASES:
        images, mask = padded_batch(16, input_size)
        crop = MultiCrop(size, size, n_local=2, global_scale=scale, local_scale=scale)

        def call_with(min_size: int):
            def call():
                with mock.patch.object(multicrop, "_PER_VIEW_MIN_SIZE", min_size):
                    crop(images, torch.Generator().manual_seed(0), channel_mask=mask)
            return call

        ms = interleaved_ms({"grid_sample": call_with(1 << 30), "per_view_interpolate": call_with(1)}, repeats,
                            time.thread_time)
        result[f"{size}px_from_{input_size}px_scale_{scale[0]}-{scale[1]}"] = {
            "cpu_ms_per_call": ms, "grid_over_per_view": ms["grid_sample"] / ms["per_view_interpolate"],
            "chosen": "per_view_interpolate" if size >= multicrop._PER_VIEW_MIN_SIZE else "grid_sample"}
    result["per_view_min_size"] = multicrop._PER_VIEW_MIN_SIZE
    torch.set_num_threads(cores)
    return result


def transposed_views(repeats: int, cores: int) -> dict:
    """The transposed global views of one 224-px-setting call, resized as the upright box then
    transposed (as built) vs as the transposed box (which F.interpolate reads across its rows): CPU
    time of one thread for all of them, each then written to a view-sized output as MultiCrop does."""
    torch.set_num_threads(1)
    batch, size, global_size, _, _ = LOOP_SETTINGS["224px"]
    images, _ = padded_batch(batch, size)
    crop = MultiCrop(global_size, 8, n_local=0)
    boxes = crop._draw_boxes(2 * batch, size, size, crop.global_scale, torch.Generator().manual_seed(0))
    regions = [images[n // 2:n // 2 + 1, :, y:y + h, x:x + w]
               for n, (x, y, w, h, t) in enumerate(zip(*(c.tolist() for c in (boxes.x0, boxes.y0, boxes.w, boxes.h,
                                                                                 boxes.transpose)))) if t]
    out = torch.empty(CHANNELS, global_size, global_size)

    def resize(upright: bool):
        def run():
            for region in regions:
                if upright:
                    view = F.interpolate(region, size=(global_size,) * 2, mode="bilinear", align_corners=False)
                    out.copy_(view[0].transpose(-1, -2))
                else:
                    out.copy_(F.interpolate(region.transpose(-1, -2), size=(global_size,) * 2, mode="bilinear",
                                            align_corners=False)[0])
        return run

    ms = interleaved_ms({"upright_then_transposed": resize(True), "transposed_box": resize(False)}, repeats,
                        time.thread_time)
    torch.set_num_threads(cores)
    return {"views": len(regions), "cpu_ms_all_views": ms,
            "transposed_box_over_upright": ms["transposed_box"] / ms["upright_then_transposed"]}


def block_sizes(images, mask, crop, repeats: int) -> dict:
    def call_with(mb: int):
        def call():
            with mock.patch.object(multicrop, "_CPU_BLOCK_BYTES_PER_THREAD", mb << 20):
                crop(images, torch.Generator().manual_seed(0), channel_mask=mask)
        return call

    ms = interleaved_ms({f"{mb}MB": call_with(mb) for mb in BLOCK_MB}, repeats)
    chosen = ms[f"{CHOSEN_BLOCK_MB}MB"]
    return {"ms_per_call": ms, f"time_over_{CHOSEN_BLOCK_MB}MB": {k: v / chosen for k, v in ms.items()}}


def recorded_grid_samples(images, mask, crop) -> list[tuple]:
    """The (input block, grid) of every grid_sample call of one MultiCrop call, in order."""
    with mock.patch.object(multicrop.F, "grid_sample", wraps=F.grid_sample) as spy:
        crop(images, torch.Generator().manual_seed(0), channel_mask=mask)
    return [(c.args[0], c.args[1].clone(), c.kwargs) for c in spy.call_args_list]


def streaming_read(images, mask, crop, repeats: int) -> dict:
    """Whole calls as built vs with a streaming read (sum) of each block's input before its first
    grid_sample, which a block held in cache would turn into cache hits."""
    resample = multicrop._ViewSet.resample

    def reading_first(view_set, block_images, start, stop):
        if start != read_block[0]:
            block_images[start:stop].sum()
            read_block[0] = start
        resample(view_set, block_images, start, stop)

    read_block = [-1]

    def call(read: bool):
        def run():
            read_block[0] = -1
            with mock.patch.object(multicrop._ViewSet, "resample", reading_first) if read else contextlib.nullcontext():
                crop(images, torch.Generator().manual_seed(0), channel_mask=mask)
        return run

    ms = interleaved_ms({"as_built": call(False), "with_streaming_read": call(True)}, repeats)
    return {"ms_per_call": ms, "with_read_over_as_built": ms["with_streaming_read"] / ms["as_built"]}


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
        "transposed": transposed_views(max(3, args.repeats // 8), cores),
        "block_size": block_sizes(images, mask, crop, args.repeats),
        "streaming_read": streaming_read(images, mask, crop, args.repeats),
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
