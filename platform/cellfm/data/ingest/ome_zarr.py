"""Existing OME-Zarr HCS plates (0.4 on Zarr v2 or 0.5 on Zarr v3, local or ``s3://``) registered in place:
``plan_ome_zarr`` lists every field of every well from the plate metadata (no pixel read, nothing copied),
with channel names from ``omero.channels[].label`` or a channel map, and well metadata joined from a
platemap (JUMP / pycytominer ``Metadata_Plate`` / ``Metadata_Well`` names, or a column map);
``register_ome_zarr`` writes that manifest. Each plate's content version (the feature store's listing
digest) goes into the manifest, so a rerun on unchanged plates writes nothing and a changed plate rewrites
its rows."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cellfm.data.content_version import plate_content_version
from cellfm.data.ingest.metadata import (
    PERTURBATION_SOURCE_COLUMNS,
    PLATEMAP_PLATE_COLUMNS,
    PLATEMAP_WELL_COLUMNS,
    perturbation_meta,
    platemap_lookup,
    read_platemap,
)
from cellfm.data.ingest.plan import IngestError, check_plate_name, default_groups, in_plate_order
from cellfm.data.manifest import MANIFEST_COLUMNS, manifest_unchanged, write_manifest
from cellfm.data.plate import SUPPORTED_DTYPES, axis_names, ome_attrs, open_group, open_store, redact


@dataclass(frozen=True)
class _FieldInfo:
    """What registration records of one field image (its level-0 array)."""

    row: str
    col: str
    field: int
    acquisition: str
    labels: list[str] | None   # omero labels, None when absent
    n_channels: int
    height: int
    width: int
    size_z: int
    dtype: str


def _field_info(root, uri: str, row: str, col: str, image: dict) -> _FieldInfo:
    """Metadata of one well image; IngestError naming plate/well/field for what cellfm cannot read."""
    path = str(image.get("path", ""))
    where = f"plate {uri!r}, well {row}{col}, field {path}"
    if not path.isdigit():
        raise IngestError(f"{where}: image path {path!r} is not a field number (0, 1, ...)")
    try:
        group = root[f"{row}/{col}/{path}"]
        ome = ome_attrs(group)
        multiscale = ome["multiscales"][0]
        array = group[multiscale["datasets"][0]["path"]]
        axes = axis_names(multiscale)
    except Exception as exc:  # noqa: BLE001 - any missing key or node: the image is unreadable
        raise IngestError(f"{where}: cannot open the field image: {type(exc).__name__}: {exc}") from exc
    unknown = [a for a in axes if a not in ("t", "c", "z", "y", "x")]
    if unknown or not {"y", "x"} <= set(axes):
        raise IngestError(f"{where}: axes {axes}: " + (f"unknown axis {unknown[0]!r}" if unknown else "no y and x")
                          + "; OME-Zarr images have axes among t, c, z, y, x")
    sizes = dict(zip(axes, (int(s) for s in array.shape)))
    if sizes.get("t", 1) != 1:
        raise IngestError(f"{where}: {sizes['t']} time points; a time series is not a field")
    if str(array.dtype) not in SUPPORTED_DTYPES:
        raise IngestError(f"{where}: dtype {array.dtype} not supported (use one of {SUPPORTED_DTYPES})")
    channels = ome.get("omero", {}).get("channels") or []
    labels = [str(ch.get("label", "")) for ch in channels] or None
    acquisition = "" if image.get("acquisition") is None else str(image["acquisition"])
    return _FieldInfo(row, col, int(path), acquisition, labels, sizes.get("c", 1), sizes["y"], sizes["x"],
                      sizes.get("z", 1), str(array.dtype))


def _channel_names(info: _FieldInfo, channel_map: Mapping[str, str | None] | None, uri: str) -> tuple[list[str], list[str]]:
    """(names cellfm uses for the kept channels, the array's channels under those names, "" = left out).

    Without a map the omero labels are the names. A map renames each channel, keyed by its label or
    (labels missing) its index "0", "1", ...; null leaves a channel out; a channel the map lacks is refused."""
    where = f"plate {uri!r}, well {info.row}{info.col}, field {info.field}"
    if channel_map is None:
        if info.labels is None:
            raise IngestError(f"{where}: no omero channel labels; name the {info.n_channels} channels with "
                              f"--channel-map '{{\"0\": \"DNA\", ...}}' (keys: channel indices)")
        if len(info.labels) != info.n_channels:
            raise IngestError(f"{where}: omero lists {len(info.labels)} labels {info.labels} for {info.n_channels} channels")
        return list(info.labels), list(info.labels)
    keys = info.labels if info.labels is not None and len(info.labels) == info.n_channels else \
        [str(i) for i in range(info.n_channels)]
    missing = [k for i, k in enumerate(keys) if k not in channel_map and str(i) not in channel_map]
    if missing:
        raise IngestError(f"{where}: channel(s) {missing} not in --channel-map {sorted(channel_map)}; map each "
                          f"(by label or index) to a stain name, or to null to leave it out")
    mapped = [channel_map[k] if k in channel_map else channel_map[str(i)] for i, k in enumerate(keys)]
    labels = [str(name) if name else "" for name in mapped]
    names = [name for name in labels if name]
    if not names or len(set(names)) != len(names):
        raise IngestError(f"{where}: --channel-map gives channel names {labels}; they must be non-empty and unique")
    return names, labels


def _plate_fields(uri: str, acquisition: str | None, storage_options) -> tuple[str, list[_FieldInfo]]:
    """(plate name, every field of the plate's wells, of one acquisition or all) from the plate metadata."""
    try:
        root = open_group(open_store(uri, "r", storage_options))
        plate = ome_attrs(root)["plate"]
        well_paths = [w["path"] for w in plate["wells"]]
    except Exception as exc:  # noqa: BLE001
        raise IngestError(f"plate {uri!r}: not an OME-Zarr HCS plate: "
                          f"{redact(f'{type(exc).__name__}: {exc}', storage_options)}") from exc
    name = check_plate_name(plate.get("name") or Path(uri.rstrip("/")).name.removesuffix(".zarr"), f"plate {uri!r}")
    known = [str(a.get("id")) for a in plate.get("acquisitions") or []]
    if acquisition is not None and acquisition not in known:
        raise IngestError(f"plate {uri!r}: no acquisition {acquisition!r} (the plate lists {known or 'none'})")
    jobs = []
    for path in well_paths:
        row, _, col = str(path).partition("/")
        try:
            images = ome_attrs(root[path])["well"]["images"]
        except Exception as exc:  # noqa: BLE001
            raise IngestError(f"plate {uri!r}, well {row}{col}: well metadata missing or unreadable: "
                              f"{type(exc).__name__}: {exc}") from exc
        jobs += [(row, col, image) for image in images
                 if acquisition is None or str(image.get("acquisition")) == acquisition]
    if not jobs:
        raise IngestError(f"plate {uri!r}: no fields" + (f" of acquisition {acquisition!r}" if acquisition else ""))
    if "://" not in uri:
        return name, [_field_info(root, uri, *job) for job in jobs]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:  # remote metadata: one request per document, many in flight
        return name, list(pool.map(lambda job: _field_info(root, uri, *job), jobs))


def plan_ome_zarr(plates: Sequence[str], platemap: str | Path | None = None,
                  channel_map: Mapping[str, str | None] | None = None, column_map: Mapping[str, str] | None = None,
                  acquisition: str | None = None, source: str = "ome-zarr", cell_line: str = "", batch: str = "",
                  storage_options=None) -> pd.DataFrame:
    """The manifest of existing OME-Zarr HCS plates (0.4 or 0.5, local or fsspec URLs), registered in place.

    One row per field of every well (of ``acquisition``, or of all acquisitions as separate fields),
    with the level-0 shape, dtype and channel names (omero labels or ``channel_map``), joined with the
    platemap on plate + well, and each plate's ``content_version`` (its listing digest, as the feature
    store computes it). Reads metadata only, never pixels."""
    found = {}
    for uri in plates:
        uri = uri if "://" in uri else str(Path(uri).absolute())
        name, infos = _plate_fields(uri, acquisition, storage_options)
        if name in {n for n, _ in found.values()}:
            raise IngestError(f"plate {uri!r}: plate name {name!r} is also the name of another plate given")
        found[uri] = (name, infos)
    lookup = {}
    if platemap is not None:
        wells = {name: list(dict.fromkeys(f"{i.row}{i.col}" for i in infos)) for name, infos in found.values()}
        lookup = platemap_lookup(read_platemap(platemap, column_map, storage_options), wells, f"platemap {platemap}")
    key_columns = set(PLATEMAP_PLATE_COLUMNS + PLATEMAP_WELL_COLUMNS)
    records = []
    for uri, (name, infos) in found.items():
        version = plate_content_version(uri, pd.DataFrame(columns=["well", "field"]), storage_options)
        for info in infos:
            names, labels = _channel_names(info, channel_map, uri)
            record = lookup.get((name, f"{info.row}{info.col}"), {})
            meta = perturbation_meta(record, cell_line, batch)
            taken = (key_columns | set(MANIFEST_COLUMNS) | set(meta) | PERTURBATION_SOURCE_COLUMNS
                     | {"channel_labels", "acquisition", "size_z", "content_version"})
            extra = {k: str(v) for k, v in record.items() if k not in taken}
            records.append({
                "source": source, "plate": name, "well": f"{info.row}{info.col}", "row": info.row, "col": info.col,
                "field": info.field, "store_uri": uri, "channel_names": names, "channel_groups": default_groups(names),
                "height": info.height, "width": info.width, "dtype": info.dtype,
                **meta,
                "channel_labels": labels, "acquisition": info.acquisition, "size_z": info.size_z,
                "content_version": version, **extra,
            })
    df = pd.DataFrame(records)
    if not (channel_map is not None or (df["channel_labels"].map(tuple) != df["channel_names"].map(tuple)).any()):
        df = df.drop(columns="channel_labels")  # omero labels name every channel: readers need nothing more
    if not df["acquisition"].astype(bool).any():
        df = df.drop(columns="acquisition")
    return in_plate_order(df)


def register_ome_zarr(df: pd.DataFrame, manifest_path: str | Path, storage_options=None,
                      progress: Callable[[str], None] | None = print) -> bool:
    """Write the manifest ``df`` of registered plates, unless ``manifest_path`` holds exactly these rows
    already (a rerun: nothing written). Returns whether it wrote."""
    say = progress or (lambda _msg: None)
    for plate, rows in df.groupby("plate", sort=False):
        say(f"[ingest] plate {plate}: {rows['well'].nunique()} wells, {len(rows)} fields, channels "
            f"{list(rows['channel_names'].iloc[0])}, {rows['height'].iloc[0]}x{rows['width'].iloc[0]} "
            f"{rows['dtype'].iloc[0]}, z {rows['size_z'].max()}, content version {rows['content_version'].iloc[0]} "
            f"(registered in place: {rows['store_uri'].iloc[0]})")
    if manifest_unchanged(df, manifest_path, storage_options):
        say(f"[ingest] manifest {manifest_path} already holds these {len(df)} fields (plates unchanged): nothing written")
        return False
    write_manifest(df, manifest_path if "://" in str(manifest_path) else Path(manifest_path), storage_options)
    say(f"[ingest] wrote manifest {manifest_path}: {len(df)} fields of {df['plate'].nunique()} plate(s); no pixel copied")
    return True
