"""OME-Zarr high-content-screening plates: cellfm writes 0.5 on Zarr v3 and reads 0.5 and 0.4 (Zarr v2).

Layout written: ``plate.zarr/{row}/{col}/{field}/0`` with axes ``c, y, x``; the stain of each channel is
``omero.channels[].label``. Each field array is ONE shard holding all channels (one object per
field: cheap listing, ~2 ranged GETs per read on S3) made of one-channel-plane inner chunks (reading
a channel subset decodes only those planes). Inner chunks are blosc-zstd compressed and carry a
CRC32C checksum, so corruption surfaces as an error instead of silently wrong pixels. A field is
written by exactly one call (``write_field``): concurrent partial writes to one shard lose data.

Plates written by others are read as they are: 0.4 metadata (at the top of the attributes) or 0.5
(under ``ome``), any multiscale level, axes among ``t, c, z, y, x`` (a z-stack read as one plane or
a projection; t must be a singleton).

Nothing is cached between calls: every call re-reads metadata, so a rewritten plate is seen as is.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import zarr
import zarr.storage
from zarr.abc.store import Store
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.group import GroupMetadata

from cellfm.config import is_credential_key

OME_VERSION = "0.5"
_IMAGE_ARRAY_PATH = "0"
_SPATIAL_UNIT = "micrometer"
# Conventional display colours for Cell Painting stains; other stains cycle through _PALETTE.
_STAIN_COLORS = {"DNA": "0000FF", "ER": "00FF00", "RNA": "FFFF00", "AGP": "FF0000", "Mito": "FF00FF"}
_PALETTE = ("00FFFF", "FF8000", "8000FF", "80FF00", "FF0080", "FFFFFF")
_SUPPORTED_DTYPES = ("uint8", "uint16", "float32")
DEFAULT_TILE_SIZE = 256  # inner chunk edge (px) for fields larger than this; smaller fields: one plane


class PlateError(ValueError):
    """A plate cannot be created, written or read; the message names plate, well and field."""


def _where(uri: str, row: str | None = None, col: str | None = None, field: int | None = None) -> str:
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


def _exc_text(exc: BaseException, storage_options: dict | None) -> str:
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


def _field_path(row: str, col: str, field: int) -> str:
    return f"{row}/{col}/{field}"


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
                    "path": _IMAGE_ARRAY_PATH,
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
        raise PlateError(f"{_where(uri)}: no wells given")
    for row, col in wells:
        if not (row.isalnum() and col.isalnum() and row.isascii() and col.isascii()):
            raise PlateError(f"{_where(uri, row, col)}: row and column names must be ASCII letters/digits")
    duplicates = sorted(f"{r}{c}" for (r, c), n in Counter(wells).items() if n > 1)
    if duplicates:
        raise PlateError(f"{_where(uri)}: duplicate wells {duplicates}")
    if n_fields < 1:
        raise PlateError(f"{_where(uri)}: n_fields must be >= 1, got {n_fields}")
    if not channel_names or any(not name for name in channel_names) or len(set(channel_names)) != len(channel_names):
        raise PlateError(f"{_where(uri)}: channel names must be non-empty and unique, got {channel_names}")
    if len(field_shape) != 2 or min(field_shape) < 1:
        raise PlateError(f"{_where(uri)}: field_shape must be (H, W) with positive sizes, got {field_shape}")
    if str(np.dtype(dtype)) not in _SUPPORTED_DTYPES:
        raise PlateError(f"{_where(uri)}: dtype {dtype!r} not supported, use one of {_SUPPORTED_DTYPES}")
    if tile_size < 1:
        raise PlateError(f"{_where(uri)}: tile_size must be >= 1, got {tile_size}")


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
                path = _field_path(row, col, field)
                nodes[path] = GroupMetadata(attributes=_image_attributes(
                    f"{name} {row}{col} field {field}", channel_names, np_dtype, pixel_size_um))
                nodes[f"{path}/{_IMAGE_ARRAY_PATH}"] = array_metadata
        store = open_store(uri, "w", storage_options)
        zarr.create_group(store, zarr_format=3, overwrite=True)  # clear whatever was at uri
        # Writes all metadata documents concurrently: one round of requests instead of one per node.
        for _ in zarr.create_hierarchy(store=store, nodes=nodes, overwrite=True):
            pass
    except Exception as exc:
        raise PlateError(f"{_where(uri)}: cannot create plate: {_exc_text(exc, storage_options)}") from exc


def axis_names(multiscale: dict[str, Any]) -> list[str]:
    """The axis names of a multiscale (0.4/0.5: objects with a name; 0.3: bare strings)."""
    return [axis["name"] if isinstance(axis, dict) else str(axis) for axis in multiscale["axes"]]


def _open_field(uri: str, row: str, col: str, field: int, mode: str, storage_options: dict | None,
                level: int = 0, labels: list[str] | None = None):
    """Open a field's image group and the array of resolution ``level`` (0: full resolution); PlateError
    if either is absent. ``labels`` (the array's channel names in array order) stand in for omero's."""
    try:
        store = open_store(uri, mode, storage_options)
        group = open_group(store, _field_path(row, col, field), "r" if mode == "r" else "r+")
        ome = ome_attrs(group)
        multiscale = ome["multiscales"][0]
        datasets = multiscale["datasets"]
    except Exception as exc:
        raise PlateError(f"{_where(uri, row, col, field)}: cannot open field image: "
                         f"{_exc_text(exc, storage_options)}") from exc
    if not 0 <= level < len(datasets):
        raise PlateError(f"{_where(uri, row, col, field)}: resolution level {level} requested (data.resolution_level) "
                         f"but the field has {len(datasets)} level(s) 0..{len(datasets) - 1}")
    try:
        array = group[datasets[level]["path"]]
    except Exception as exc:
        raise PlateError(f"{_where(uri, row, col, field)}: cannot open image array {datasets[level].get('path')!r}: "
                         f"{_exc_text(exc, storage_options)}") from exc
    if not isinstance(array, zarr.Array):
        raise PlateError(f"{_where(uri, row, col, field)}: image path is not an array")
    axes = axis_names(multiscale)
    if labels is None:
        channels = ome.get("omero", {}).get("channels")
        if not channels:
            raise PlateError(f"{_where(uri, row, col, field)}: {NO_CHANNEL_LABELS}")
        labels = [ch.get("label", f"C{i}") for i, ch in enumerate(channels)]
    return array, axes, list(labels)


def write_field(uri: str, row: str, col: str, field: int, image: np.ndarray, storage_options=None) -> None:
    """Write one whole field (all channels) in a single call, i.e. one writer for its shard."""
    array, _, labels = _open_field(uri, row, col, field, "w", storage_options)
    image = np.asarray(image)
    if image.shape != array.shape or image.dtype != array.dtype:
        raise PlateError(
            f"{_where(uri, row, col, field)}: expected image of shape {tuple(array.shape)} and dtype {array.dtype} "
            f"(channels {labels}), got shape {image.shape} and dtype {image.dtype}"
        )
    try:
        # Store every channel plane, even all-zero ones: a stored field is then complete, and a
        # field that reads as all fill value must be missing (see read_field).
        array.with_config({"write_empty_chunks": True})[...] = image
    except Exception as exc:
        raise PlateError(f"{_where(uri, row, col, field)}: write failed: {_exc_text(exc, storage_options)}") from exc


def _cyx_selection(uri: str, row: str, col: str, field: int, axes: list[str], shape: tuple[int, ...],
                   channel_index: list[int], region: tuple[int, int, int, int] | None = None,
                   z_plane: int = -1, z_projection: str = "") -> tuple[tuple, list[str]]:
    """Basic selection covering ``channel_index`` in an array with axes ``c,y,x`` or ``t,c,z,y,x``,
    plus the axis names of the selected block in order. Singleton t/z are dropped; a z-stack gives
    plane ``z_plane`` (an index), or all planes (kept as axis "z") for ``z_projection``.

    The channel axis is read as one contiguous slice: zarr's orthogonal selection with an index
    list decodes chunks one by one and is several times slower than a slice of the same shard.
    """
    where = _where(uri, row, col, field)
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
        raise PlateError(f"{_where(uri, row, col, field)}: region must be (y0, y1, x0, x1), got {region!r}") from exc
    height, width = shape[axes.index("y")], shape[axes.index("x")]
    if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
        raise PlateError(f"{_where(uri, row, col, field)}: region (y0, y1, x0, x1) = {(y0, y1, x0, x1)} "
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
        raise PlateError(f"{_where(uri, row, col, field)}: z projection {z_projection!r} is not one of {Z_PROJECTIONS}")
    array, axes, labels = _open_field(uri, row, col, field, "r", storage_options, resolution_level, labels)
    n_channels = array.shape[axes.index("c")] if "c" in axes else 0
    if len(labels) != n_channels:
        raise PlateError(f"{_where(uri, row, col, field)}: omero lists {len(labels)} channel labels {labels} "
                         f"but the array has {n_channels} channels (axes {axes}, shape {tuple(array.shape)})")
    if channels is None:
        channels = [name for name in labels if name]
    missing = [name for name in channels if not name or name not in labels]
    if missing or not channels:
        raise PlateError(f"{_where(uri, row, col, field)}: channel(s) {missing or channels} not in plate; "
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
            raise PlateError(f"{_where(uri, row, col, field)}: field has no stored data (missing shard)")
    except PlateError:
        raise
    except Exception as exc:
        raise PlateError(f"{_where(uri, row, col, field)}: cannot read field data "
                         f"(corrupt or unreadable chunk): {_exc_text(exc, storage_options)}") from exc
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
        raise PlateError(f"{_where(uri)}: cannot open plate metadata: {_exc_text(exc, storage_options)}") from exc


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
        raise PlateError(f"{_where(uri)}: plate metadata lists no wells")
    row, col = plate["wells"][0]["path"].split("/")
    try:
        well = open_group(open_store(uri, "r", storage_options), f"{row}/{col}")
        first_field = int(ome_attrs(well)["well"]["images"][0]["path"])
    except Exception as exc:
        raise PlateError(f"{_where(uri, row, col)}: cannot open well metadata: {_exc_text(exc, storage_options)}") from exc
    _, _, labels = _open_field(uri, row, col, first_field, "r", storage_options)
    return labels
