"""Bytes a training read pulls from the object store per field, for sizing a cluster's network
(docs/scaling.md): one plate of JUMP-sized fields (5 x 1080 x 1080 uint16) written by
cellfm.data.plate with the same synthetic content as benchmarks/pipeline.py (smooth multi-scale blobs
+ Gaussian noise), then each field's stored shard measured on disk. A whole-field read fetches its
whole shard (one object per field; about 2 ranged GETs on S3: the shard index, then the chunks).

The compression ratio depends on the content: real images with large dark backgrounds compress
better than this noisy synthetic content, so the stored size here is an upper-side figure for sizing.

    python benchmarks/field_bytes.py        # ~20 s; writes benchmarks/results/field_bytes.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "platform"))

from pipeline import CHANNELS, _write_plate  # noqa: E402  (benchmarks/pipeline.py's plates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1080, help="field edge in pixels (JUMP: 1080)")
    parser.add_argument("--fields", type=int, default=8, help="fields written and measured")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "field_bytes.json"))
    args = parser.parse_args()
    if args.size < 16 or args.fields < 1:
        parser.error(f"--size must be >= 16 and --fields >= 1, got {args.size}, {args.fields}")
    import numpy as np

    from cellfm.data.plate import read_field
    from cellfm.data.plate_writer import DEFAULT_TILE_SIZE
    from cellfm.storage import write_file

    work = Path(tempfile.mkdtemp(prefix="cellfm-field-bytes-"))
    try:
        uri = str(work / "BYTES-00.zarr")
        wells = [("A", "01")]
        _write_plate((uri, "BYTES-00", wells, args.fields, args.size, 0))
        stored = []
        read_s = []
        for field in range(args.fields):
            stored.append(sum(f.stat().st_size for f in (work / "BYTES-00.zarr" / "A" / "01" / str(field)).rglob("*")
                              if f.is_file()))
            t0 = time.perf_counter()
            image, _ = read_field(uri, "A", "01", field)
            read_s.append(time.perf_counter() - t0)
        raw = int(image.nbytes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tiles = -(-args.size // DEFAULT_TILE_SIZE) if args.size > DEFAULT_TILE_SIZE else 1
    result = {
        "benchmark": "stored bytes per field",
        "field_shape": [len(CHANNELS), args.size, args.size],
        "dtype": "uint16",
        "codec": f"sharded zarr v3, one shard per field, {DEFAULT_TILE_SIZE}x{DEFAULT_TILE_SIZE} inner chunks, "
                 "blosc-zstd(5)+bitshuffle, crc32c",
        "content": "benchmarks/pipeline.py synthetic fields: smooth blobs + Gaussian noise (sigma 25 counts)",
        "fields": args.fields,
        "inner_chunks_per_field": len(CHANNELS) * tiles * tiles,
        "raw_mb_per_field": raw / 2**20,
        "stored_mb_per_field_mean": float(np.mean(stored)) / 2**20,
        "stored_mb_per_field_max": float(np.max(stored)) / 2**20,
        "compression_ratio": raw / float(np.mean(stored)),
        "read_field_s_median_one_process": float(np.median(read_s)),
    }
    out = Path(args.out)
    write_file(out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
