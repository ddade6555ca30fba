"""OME-Zarr high-content-screening plates: cellfm writes 0.5 on Zarr v3 and reads 0.5 and 0.4 (Zarr v2).

Layout written: ``plate.zarr/{row}/{col}/{field}/0`` with axes ``c, y, x``; the stain of each channel is
``omero.channels[].label``. Each field array is ONE shard holding all channels (one object per
field: cheap listing, ~2 ranged GETs per read on S3) made of one-channel-plane inner chunks (reading
a channel subset decodes only those planes). Inner chunks are blosc-zstd compressed and carry a
CRC32C checksum, so corruption surfaces as an error instead of silently wrong pixels. A field is
written by exactly one call (``cellfm.data.plate_writer.write_field``): concurrent partial writes to one
shard lose data. This module opens and reads plates; `cellfm.data.plate_writer` creates and writes them.

Plates written by others are read as they are: 0.4 metadata (at the top of the attributes) or 0.5
(under ``ome``), any multiscale level, axes among ``t, c, z, y, x`` (a z-stack read as one plane or
a projection; t must be a singleton).

Nothing is cached between calls: every call re-reads metadata, so a rewritten plate is seen as is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr
import zarr.storage
from zarr.abc.store import Store

from cellfm.config import is_credential_key

IMAGE_ARRAY_PATH = "0"  # the full-resolution array of a field written by cellfm.data.plate_writer
# Conventional display colours for Cell Painting stains; other stains cycle through _PALETTE.
SUPPORTED_DTYPES = ("uint8", "uint16", "float32")  # what cellfm writes and reads
class PlateError(ValueError):
    """A plate cannot be created, written or read; the message names plate, well and field."""


def plate_location(uri: str, row: str | None = None, col: str | None = None, field: int | None = None) -> str:
    """Human-readable location used in every error message."""
    text = f"plate {uri!r}"
    if row is not None and col is not None:
        text += f", well {row}{col}"
    if field is not None:
        text += f", field {field}"
    return text


_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


def _secret_values(options: Any) -> list[str]:
    """Values in ``options`` (nested dicts) stored under a credential-like key."""
    found: list[str] = []
    if isinstance(options, dict):
        for name, value in options.items():
            if isinstance(value, dict):
                found += _secret_values(value)
            elif isinstance(value, str) and value and is_credential_key(name):
                found.append(value)
    return found


def redact(text: str, storage_options: dict | None = None) -> str:
    """``text`` with every credential from ``storage_options`` and the AWS environment masked."""
    import os

    secrets = _secret_values(storage_options or {}) + [os.environ[k] for k in _SECRET_ENV if os.environ.get(k)]
    for secret in sorted(set(secrets), key=len, reverse=True):
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def error_text(exc: BaseException, storage_options: dict | None) -> str:
    return redact(f"{type(exc).__name__}: {exc}", storage_options)


def use_zarrs(enable: bool = True) -> bool:
    """Switch zarr's codec pipeline to the Rust ``zarrs`` pipeline (optional extra ``cellfm[zarrs]``).

    Returns whether zarrs is now in use: False if it is not installed (the default pipeline stays).
    In Ray workers set ``ZARR_CODEC_PIPELINE__PATH=zarrs.ZarrsCodecPipeline`` in the runtime env instead.
    """
    if not enable:
        zarr.config.set({"codec_pipeline.path": "zarr.core.codec_pipeline.BatchedCodecPipeline"})
        return False
    try:
        import zarrs  # noqa: F401
    except ImportError:
        return False
    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
    return True


def open_store(uri: str, mode: str = "r", storage_options: dict | None = None) -> Store:
    """A Zarr store for a local path (or ``file://`` URL) or a remote fsspec URL such as ``s3://``.

    ``mode`` is ``"r"`` (read-only) or ``"w"`` (writable). Remote URLs go through
    ``FsspecStore`` so ``storage_options`` (endpoint, credentials) reach the filesystem.
    """
    if mode not in ("r", "w"):
        raise ValueError(f"mode must be 'r' or 'w', got {mode!r}")
    read_only = mode == "r"
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        return zarr.storage.FsspecStore.from_url(uri, storage_options=storage_options or {}, read_only=read_only)
    return zarr.storage.LocalStore(uri, read_only=read_only)


NO_CHANNEL_LABELS = ("no omero channel labels: cellfm selects channels by stain name, so each field must list them "
                     "in omero.channels[].label (ngff-zarr writes them when multiscales.metadata.omero is set, "
                     "e.g. by compute_omero_from_multiscales), or register the plate with "
                     "`cellfm ingest --layout ome-zarr --channel-map`")
READ_VERSIONS = ("0.4", "0.5")  # OME-Zarr versions read: 0.4 on Zarr v2, 0.5 on Zarr v3
Z_PROJECTIONS = ("max", "mean")


def open_group(store: Store, path: str = "", mode: str = "r") -> zarr.Group:
    """The Zarr group at ``path``: Zarr v3 (OME-Zarr 0.5) or v2 (OME-Zarr 0.4), whichever is there."""
    return zarr.open_group(store, path=path, mode=mode)


def ome_attrs(group: zarr.Group) -> dict[str, Any]:
    """A node's OME metadata (plate / well / multiscales / omero): under ``ome`` in 0.5, at the top
    of the attributes in 0.4 (whose version sits inside the plate, well or multiscale)."""
    attrs = group.attrs.asdict()
    if isinstance(attrs.get("ome"), dict):
        return attrs["ome"]
    ome = dict(attrs)
    for key in ("plate", "well"):
        if isinstance(attrs.get(key), dict) and "version" in attrs[key]:
            ome.setdefault("version", attrs[key]["version"])
    if attrs.get("multiscales") and isinstance(attrs["multiscales"][0], dict) and "version" in attrs["multiscales"][0]:
        ome.setdefault("version", attrs["multiscales"][0]["version"])
    return ome


def field_group_path(row: str, col: str, field: int) -> str:
    return f"{row}/{col}/{field}"


def axis_names(multiscale: dict[str, Any]) -> list[str]:
    """The axis names of a multiscale (0.4/0.5: objects with a name; 0.3: bare strings)."""
    return [axis["name"] if isinstance(axis, dict) else str(axis) for axis in multiscale["axes"]]


def open_field(uri: str, row: str, col: str, field: int, mode: str, storage_options: dict | None,
                level: int = 0, labels: list[str] | None = None):
    """Open a field's image group and the array of resolution ``level`` (0: full resolution); PlateError
    if either is absent. ``labels`` (the array's channel names in array order) stand in for omero's."""
    try:
        store = open_store(uri, mode, storage_options)
        group = open_group(store, field_group_path(row, col, field), "r" if mode == "r" else "r+")
        ome = ome_attrs(group)
        multiscale = ome["multiscales"][0]
        datasets = multiscale["datasets"]
    except Exception as exc:
        raise PlateError(f"{plate_location(uri, row, col, field)}: cannot open field image: "
                         f"{error_text(exc, storage_options)}") from exc
    if not 0 <= level < len(datasets):
        raise PlateError(f"{plate_location(uri, row, col, field)}: resolution level {level} requested (data.resolution_level) "
                         f"but the field has {len(datasets)} level(s) 0..{len(datasets) - 1}")
    try:
        array = group[datasets[level]["path"]]
    except Exception as exc:
        raise PlateError(f"{plate_location(uri, row, col, field)}: cannot open image array {datasets[level].get('path')!r}: "
                         f"{error_text(exc, storage_options)}") from exc
    if not isinstance(array, zarr.Array):
        raise PlateError(f"{plate_location(uri, row, col, field)}: image path is not an array")
    axes = axis_names(multiscale)
    if labels is None:
        channels = ome.get("omero", {}).get("channels")
        if not channels:
            raise PlateError(f"{plate_location(uri, row, col, field)}: {NO_CHANNEL_LABELS}")
        labels = [ch.get("label", f"C{i}") for i, ch in enumerate(channels)]
    return array, axes, list(labels)


def _cyx_selection(uri: str, row: str, col: str, field: int, axes: list[str], shape: tuple[int, ...],
                   channel_index: list[int], region: tuple[int, int, int, int] | None = None,
                   z_plane: int = -1, z_projection: str = "") -> tuple[tuple, list[str]]:
    """Basic selection covering ``channel_index`` in an array with axes ``c,y,x`` or ``t,c,z,y,x``,
    plus the axis names of the selected block in order. Singleton t/z are dropped; a z-stack gives
    plane ``z_plane`` (an index), or all planes (kept as axis "z") for ``z_projection``.

    The channel axis is read as one contiguous slice: zarr's orthogonal selection with an index
    list decodes chunks one by one and is several times slower than a slice of the same shard.
    """
    where = plate_location(uri, row, col, field)
    selection, kept_axes = [], []
    for name, size in zip(axes, shape):
        if name == "c":
            selection.append(slice(min(channel_index), max(channel_index) + 1))
            kept_axes.append(name)
        elif name in ("y", "x"):
            if region is None:
                selection.append(slice(None))
            else:
                start, stop = region[:2] if name == "y" else region[2:]
                selection.append(slice(start, stop))
            kept_axes.append(name)
        elif name == "z" and z_projection:
            selection.append(slice(None))
            kept_axes.append(name)
        elif name == "z" and z_plane >= 0:
            if z_plane >= size:
                raise PlateError(f"{where}: data.z_plane={z_plane} but the field has {size} z-plane(s)")
            selection.append(z_plane)
        elif name == "z" and size > 1:
            raise PlateError(f"{where}: z-stack of {size} planes; choose one with data.z_plane (an index) "
                             f"or project them with data.z_projection (max | mean)")
        elif name not in ("t", "z"):
            raise PlateError(f"{where}: unknown axis {name!r} (axes {axes}); OME-Zarr images have axes among t, c, z, y, x")
        elif size == 1:
            selection.append(0)
        else:
            raise PlateError(f"{where}: axis {name!r} has size {size}; a time series is not a field "
                             f"(axes {axes}, shape {shape})")
    if sorted(kept_axes) not in (["c", "x", "y"], ["c", "x", "y", "z"]):
        raise PlateError(f"{where}: unsupported axes {axes}; need c, y and x")
    return tuple(selection), kept_axes


def project_z(block: np.ndarray, axis: int, projection: str) -> np.ndarray:
    """A z-stack projected along ``axis``: max keeps the dtype; mean is float32 (of a float64 sum)."""
    if projection == "max":
        return block.max(axis=axis)
    return block.mean(axis=axis, dtype=np.float64).astype(np.float32)


def _check_region(uri: str, row: str, col: str, field: int, region, axes: list[str], shape: tuple[int, ...]):
    if region is None:
        return None
    try:
        y0, y1, x0, x1 = (int(v) for v in region)
    except (TypeError, ValueError) as exc:
        raise PlateError(f"{plate_location(uri, row, col, field)}: region must be (y0, y1, x0, x1), got {region!r}") from exc
    height, width = shape[axes.index("y")], shape[axes.index("x")]
    if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
        raise PlateError(f"{plate_location(uri, row, col, field)}: region (y0, y1, x0, x1) = {(y0, y1, x0, x1)} "
                         f"is empty or outside the field of {height} x {width} pixels")
    return y0, y1, x0, x1


def read_field(uri: str, row: str, col: str, field: int, channels: list[str] | None = None,
               storage_options=None, region: tuple[int, int, int, int] | None = None, *,
               z_plane: int = -1, z_projection: str = "", resolution_level: int = 0,
               labels: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Read a field as ``(C, H, W)`` in its stored dtype, with channel names in returned order.

    ``channels`` selects and orders channels by name; only planes between the first and last
    selected channel are decoded. ``region=(y0, y1, x0, x1)`` reads a crop: only the inner chunks
    (tiles) it overlaps are fetched and decoded (ranged reads of the shard on object stores).
    A z-stack needs ``z_plane`` (an index) or ``z_projection`` (max | mean; mean reads float32);
    ``resolution_level`` picks a multiscale level (``region`` is in that level's pixels).
    ``labels`` name the array's channels in array order where the plate's omero labels are missing
    or renamed (the manifest's ``channel_labels``).
    """
    if z_projection and z_projection not in Z_PROJECTIONS:
        raise PlateError(f"{plate_location(uri, row, col, field)}: z projection {z_projection!r} is not one of {Z_PROJECTIONS}")
    array, axes, labels = open_field(uri, row, col, field, "r", storage_options, resolution_level, labels)
    n_channels = array.shape[axes.index("c")] if "c" in axes else 0
    if len(labels) != n_channels:
        raise PlateError(f"{plate_location(uri, row, col, field)}: omero lists {len(labels)} channel labels {labels} "
                         f"but the array has {n_channels} channels (axes {axes}, shape {tuple(array.shape)})")
    if channels is None:
        channels = [name for name in labels if name]
    missing = [name for name in channels if not name or name not in labels]
    if missing or not channels:
        raise PlateError(f"{plate_location(uri, row, col, field)}: channel(s) {missing or channels} not in plate; "
                         f"available channels: {labels}")
    channel_index = [labels.index(name) for name in channels]
    if "y" in axes and "x" in axes:
        region = _check_region(uri, row, col, field, region, axes, tuple(array.shape))
    selection, kept_axes = _cyx_selection(uri, row, col, field, axes, tuple(array.shape), channel_index, region,
                                          z_plane, z_projection)
    try:
        block = array[selection]
        # With one shard per field a stored field is complete, while a missing shard reads as fill
        # value without error; the listing that tells them apart is only paid for all-fill reads.
        if _all_fill(block, array.fill_value) and array.nchunks_initialized == 0:
            raise PlateError(f"{plate_location(uri, row, col, field)}: field has no stored data (missing shard)")
    except PlateError:
        raise
    except Exception as exc:
        raise PlateError(f"{plate_location(uri, row, col, field)}: cannot read field data "
                         f"(corrupt or unreadable chunk): {error_text(exc, storage_options)}") from exc
    if "z" in kept_axes:
        block = project_z(block, kept_axes.index("z"), z_projection)
        kept_axes.remove("z")
    block = np.transpose(block, [kept_axes.index(a) for a in ("c", "y", "x")])
    first = min(channel_index)
    order = [i - first for i in channel_index]
    if order != list(range(block.shape[0])):  # a reorder or a subset: one copy; else the decoded block as is
        block = block[order]
    return np.ascontiguousarray(block), list(channels)


def _all_fill(block: np.ndarray, fill) -> bool:
    """Whether every value of ``block`` equals ``fill``. A strided sample settles real fields (almost
    never all fill) without the full-size comparison temporary; only all-fill-looking blocks pay for it."""
    flat = block.reshape(-1)
    if flat.size == 0:
        return True
    if np.any(flat[:: max(1, flat.size // 4096)] != fill):
        return False
    return not np.any(block != fill)


def _plate_metadata(uri: str, storage_options: dict | None) -> dict[str, Any]:
    try:
        return ome_attrs(open_group(open_store(uri, "r", storage_options)))["plate"]
    except Exception as exc:
        raise PlateError(f"{plate_location(uri)}: cannot open plate metadata: {error_text(exc, storage_options)}") from exc


def plate_wells(uri: str, storage_options=None) -> tuple[list[str], int | None]:
    """Well paths (``"B/03"``) listed in the plate metadata and the plate's field count (optional
    in OME-Zarr, so possibly None)."""
    plate = _plate_metadata(uri, storage_options)
    field_count = plate.get("field_count")
    return [well["path"] for well in plate["wells"]], None if field_count is None else int(field_count)


def plate_channel_names(uri: str, storage_options=None) -> list[str]:
    """Channel names of a plate, read from the first field of its first well."""
    plate = _plate_metadata(uri, storage_options)
    if not plate.get("wells"):
        raise PlateError(f"{plate_location(uri)}: plate metadata lists no wells")
    row, col = plate["wells"][0]["path"].split("/")
    try:
        well = open_group(open_store(uri, "r", storage_options), f"{row}/{col}")
        first_field = int(ome_attrs(well)["well"]["images"][0]["path"])
    except Exception as exc:
        raise PlateError(f"{plate_location(uri, row, col)}: cannot open well metadata: {error_text(exc, storage_options)}") from exc
    _, _, labels = open_field(uri, row, col, first_field, "r", storage_options)
    return labels
