"""Creating and writing OME-Zarr 0.5 HCS plates (the layout `cellfm.data.plate` describes and reads): every
field one sharded ``(C, H, W)`` array of one-channel-plane inner chunks, blosc-zstd + CRC32C, written whole
by one ``write_field`` call."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import zarr
import zarr.storage
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.group import GroupMetadata

from cellfm.data.plate import (IMAGE_ARRAY_PATH, SUPPORTED_DTYPES, PlateError, error_text, field_group_path,
                               open_field, open_store, plate_location)

OME_VERSION = "0.5"
_SPATIAL_UNIT = "micrometer"
_STAIN_COLORS = {"DNA": "0000FF", "ER": "00FF00", "RNA": "FFFF00", "AGP": "FF0000", "Mito": "FF00FF"}
_PALETTE = ("00FFFF", "FF8000", "8000FF", "80FF00", "FF0080", "FFFFFF")
DEFAULT_TILE_SIZE = 256  # inner chunk edge (px) for fields larger than this; smaller fields: one plane


def _channel_colors(channel_names: list[str]) -> list[str]:
    others = iter(_PALETTE * (len(channel_names) // len(_PALETTE) + 1))
    return [_STAIN_COLORS.get(name) or next(others) for name in channel_names]


def _display_window(dtype: np.dtype) -> dict[str, float]:
    if np.issubdtype(dtype, np.integer):
        top = float(np.iinfo(dtype).max)
        return {"min": 0.0, "max": top, "start": 0.0, "end": top}
    return {"min": 0.0, "max": 1.0, "start": 0.0, "end": 1.0}


def _image_attributes(name: str, channel_names: list[str], dtype: np.dtype, pixel_size_um: float) -> dict[str, Any]:
    window = _display_window(dtype)
    return {
        "ome": {
            "version": OME_VERSION,
            "multiscales": [{
                "name": name,
                "axes": [
                    {"name": "c", "type": "channel"},
                    {"name": "y", "type": "space", "unit": _SPATIAL_UNIT},
                    {"name": "x", "type": "space", "unit": _SPATIAL_UNIT},
                ],
                "datasets": [{
                    "path": IMAGE_ARRAY_PATH,
                    "coordinateTransformations": [{"type": "scale", "scale": [1.0, pixel_size_um, pixel_size_um]}],
                }],
            }],
            "omero": {
                "channels": [
                    {"label": label, "color": color, "window": dict(window), "active": True}
                    for label, color in zip(channel_names, _channel_colors(channel_names))
                ],
                "rdefs": {"model": "color"},
            },
        }
    }


def _validate_plate_request(uri: str, wells: list[tuple[str, str]], n_fields: int, channel_names: list[str],
                            field_shape: tuple[int, int], dtype: str, tile_size: int = 1) -> None:
    if not wells:
        raise PlateError(f"{plate_location(uri)}: no wells given")
    for row, col in wells:
        if not (row.isalnum() and col.isalnum() and row.isascii() and col.isascii()):
            raise PlateError(f"{plate_location(uri, row, col)}: row and column names must be ASCII letters/digits")
    duplicates = sorted(f"{r}{c}" for (r, c), n in Counter(wells).items() if n > 1)
    if duplicates:
        raise PlateError(f"{plate_location(uri)}: duplicate wells {duplicates}")
    if n_fields < 1:
        raise PlateError(f"{plate_location(uri)}: n_fields must be >= 1, got {n_fields}")
    if not channel_names or any(not name for name in channel_names) or len(set(channel_names)) != len(channel_names):
        raise PlateError(f"{plate_location(uri)}: channel names must be non-empty and unique, got {channel_names}")
    if len(field_shape) != 2 or min(field_shape) < 1:
        raise PlateError(f"{plate_location(uri)}: field_shape must be (H, W) with positive sizes, got {field_shape}")
    if str(np.dtype(dtype)) not in SUPPORTED_DTYPES:
        raise PlateError(f"{plate_location(uri)}: dtype {dtype!r} not supported, use one of {SUPPORTED_DTYPES}")
    if tile_size < 1:
        raise PlateError(f"{plate_location(uri)}: tile_size must be >= 1, got {tile_size}")


def _plate_order(name: str) -> tuple[int, str]:
    """Sort key putting row/column names in plate order: "Z" before "AA", "9" before "10"."""
    return len(name), name


def create_plate(uri: str, name: str, wells: list[tuple[str, str]], n_fields: int,
                 channel_names: list[str], field_shape: tuple[int, int], dtype: str = "uint16",
                 pixel_size_um: float = 0.65, storage_options: dict | None = None,
                 tile_size: int = DEFAULT_TILE_SIZE) -> None:
    """Create an empty plate (replacing anything at ``uri``): metadata for plate, wells and fields,
    and one empty sharded ``(C, H, W)`` array per field, ready for ``write_field``.

    Inner chunks are one channel plane, cut into ``tile_size`` x ``tile_size`` tiles when the
    field is larger, so a crop (``read_field(region=...)``) decodes only the tiles it covers.

    Rows and columns list the names used by ``wells`` in plate order (``rowIndex``/``columnIndex``
    index into them); every well holds ``n_fields`` fields named ``0..n_fields-1``.
    """
    wells = [(str(r), str(c)) for r, c in wells]
    _validate_plate_request(uri, wells, n_fields, channel_names, field_shape, dtype, tile_size)
    np_dtype = np.dtype(dtype)
    rows = sorted({r for r, _ in wells}, key=_plate_order)
    cols = sorted({c for _, c in wells}, key=_plate_order)
    plate_attrs = {
        "ome": {
            "version": OME_VERSION,
            "plate": {
                # 0.5 moved the version up to "ome", but its text still says the plate MUST carry one.
                "version": OME_VERSION,
                "name": name,
                "rows": [{"name": r} for r in rows],
                "columns": [{"name": c} for c in cols],
                "wells": [{"path": f"{r}/{c}", "rowIndex": rows.index(r), "columnIndex": cols.index(c)}
                          for r, c in wells],
                "field_count": n_fields,
            },
        }
    }
    well_attrs = {"ome": {"version": OME_VERSION, "well": {"images": [{"path": str(f)} for f in range(n_fields)]}}}
    height, width = (int(s) for s in field_shape)
    n_channels = len(channel_names)
    # One shard spans the whole field (rounded up to whole tiles: a shard must hold whole chunks).
    tile_h, tile_w = min(height, tile_size), min(width, tile_size)
    try:
        # Every field array has the same metadata; build it once (in memory) and reuse it.
        array_metadata = zarr.create_array(
            zarr.storage.MemoryStore(), shape=(n_channels, height, width), dtype=np_dtype,
            chunks=(1, tile_h, tile_w), shards=(n_channels, -(-height // tile_h) * tile_h, -(-width // tile_w) * tile_w),
            compressors=[BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"), Crc32cCodec()],
            fill_value=0, dimension_names=["c", "y", "x"],
        ).metadata
        nodes: dict[str, Any] = {"": GroupMetadata(attributes=plate_attrs)}
        nodes |= {row: GroupMetadata() for row in rows}
        for row, col in wells:
            nodes[f"{row}/{col}"] = GroupMetadata(attributes=well_attrs)
            for field in range(n_fields):
                path = field_group_path(row, col, field)
                nodes[path] = GroupMetadata(attributes=_image_attributes(
                    f"{name} {row}{col} field {field}", channel_names, np_dtype, pixel_size_um))
                nodes[f"{path}/{IMAGE_ARRAY_PATH}"] = array_metadata
        store = open_store(uri, "w", storage_options)
        zarr.create_group(store, zarr_format=3, overwrite=True)  # clear whatever was at uri
        # Writes all metadata documents concurrently: one round of requests instead of one per node.
        for _ in zarr.create_hierarchy(store=store, nodes=nodes, overwrite=True):
            pass
    except Exception as exc:
        raise PlateError(f"{plate_location(uri)}: cannot create plate: {error_text(exc, storage_options)}") from exc


def write_field(uri: str, row: str, col: str, field: int, image: np.ndarray, storage_options=None) -> None:
    """Write one whole field (all channels) in a single call, i.e. one writer for its shard."""
    array, _, labels = open_field(uri, row, col, field, "w", storage_options)
    image = np.asarray(image)
    if image.shape != array.shape or image.dtype != array.dtype:
        raise PlateError(
            f"{plate_location(uri, row, col, field)}: expected image of shape {tuple(array.shape)} and dtype {array.dtype} "
            f"(channels {labels}), got shape {image.shape} and dtype {image.dtype}"
        )
    try:
        # Store every channel plane, even all-zero ones: a stored field is then complete, and a
        # field that reads as all fill value must be missing (see read_field).
        array.with_config({"write_empty_chunks": True})[...] = image
    except Exception as exc:
        raise PlateError(f"{plate_location(uri, row, col, field)}: write failed: {error_text(exc, storage_options)}") from exc


