"""The feature store: per (checkpoint key, plate, plate content version) an entry of field embeddings and
well profiles, as xarray Datasets in Zarr plus Parquet exports, on a local folder or ``s3://``.

Layout (``<plate>`` is the plate name, percent-encoded)::

    <store>/<key>/index.json                              consolidated index of the key's entries
    <store>/<key>/plates/<plate>/<version>/COMPLETE.json  the entry's marker, written last
    <store>/<key>/plates/<plate>/<version>/runs/<run>/    the data the marker points at:
        fields.zarr      xarray Dataset, dims (field, feature): variable ``embedding``
        wells.zarr       xarray Dataset, dims (well, feature): one variable per aggregation
                         (``mean``, ``median``) and, with a normalization, ``<aggregation>_<normalization>``
        fields.parquet, wells_<variable>.parquet
                         the same as tables for pycytominer / copairs: ``Metadata_*`` columns and
                         feature columns ``<model>_<i>`` (the contents: ``cellfm.features.entry``)

``key`` names what determines the numbers apart from the pixels (``cellfm.features.identity``):
``<model name>-<hash of the checkpoint hash and the embedding recipe>``. Coordinates along ``field``
/ ``well`` come from the manifest (plate, well, row, col, field, perturbation_id, moa, is_control,
dose, cell_line, batch, source, channel_names and the optional columns present); the Datasets'
``attrs["cellfm"]`` and the Parquet schema metadata hold the entry's lineage.

Visibility and concurrency: an entry exists only once its marker does. A writer puts the data in its
own run folder, then creates the marker exclusively (locally a hard link, which fails if the marker
exists; on S3 a conditional PUT, ``If-None-Match: *``): the first complete write wins, a later writer
of the same entry deletes its own run folder. Writers never touch each other's files, so a crash
leaves at most an unmarked run folder, invisible to readers and deleted by a later refresh
(``collect_garbage``) once unchanged for ``features.stale_run_s``. Readers list the markers:
``index.json`` is a convenience rebuilt from them after every refresh.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
import pandas as pd

from cellfm.data.plate import redact
from cellfm.features.entry import PlateFeatures, coordinates_frame, entry_datasets, entry_digest, write_run_files
from cellfm.storage import create_exclusive, filesystem, modified_time, write_file

# Entries keep Zarr v3 consolidated metadata (one read per entry on S3); zarr warns on every write and
# read that the v3 spec lacks it (readers without it read each array's own metadata).
warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")

FORMAT = 1
MARKER = "COMPLETE.json"
INDEX = "index.json"
LEVELS = ("field", "well")


class StoreError(ValueError):
    """The feature store cannot be read or written, or lacks what was asked for."""


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class FeatureStore:
    """A store root (local folder or ``s3://bucket/prefix``) opened with fsspec ``storage_options``."""

    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri = str(uri).rstrip("/")
        self.storage_options = storage_options or None
        self.local = "://" not in self.uri or self.uri.startswith("file://")
        if self.local:
            self.uri = str(Path(self.uri.removeprefix("file://")).expanduser().absolute())
        self.fs, self.root = filesystem(self.uri, self.storage_options)
        self.root = self.root.rstrip("/")

    # ---------------------------------------------------------------------------- paths and files

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *(p.strip("/") for p in parts if p)])

    def url(self, *parts: str) -> str:
        return "/".join([self.uri, *(p.strip("/") for p in parts if p)])

    @staticmethod
    def entry_dir(key: str, plate: str, version: str) -> str:
        return f"{key}/plates/{quote(plate, safe='')}/{version}"

    def _fail(self, action: str, exc: BaseException) -> StoreError:
        return StoreError(f"feature store {self.uri}: cannot {action}: "
                          f"{redact(f'{type(exc).__name__}: {exc}', self.storage_options)}")

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole file: readers see the old or the new content, never a part."""
        write_file(self.url(rel), data, self.storage_options)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create a file whole unless it exists; True if this call created it."""
        return create_exclusive(self.url(rel), data, self.storage_options)

    def read_json(self, rel: str) -> dict:
        return json.loads(self.fs.cat_file(self.path(rel)))

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def remove_tree(self, rel: str) -> None:
        path = self.path(rel)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def files(self, rel: str) -> dict[str, float]:
        """Every file under `rel` (recursively): path relative to the store root -> modification time
        (seconds since the epoch)."""
        prefix = self.path(rel)
        try:
            infos = self.fs.find(prefix, detail=True)
        except FileNotFoundError:
            return {}
        return {name[len(self.root) + 1:]: modified_time(info) for name, info in infos.items()
                if info.get("type") != "directory"}

    def zarr_store(self, rel: str, mode: str):
        from cellfm.data.plate import open_store

        return open_store(self.url(rel), mode, self.storage_options)

    # ---------------------------------------------------------------------------- writing entries

    def write_entry(self, key: str, entry: PlateFeatures, run_id: str) -> bool:
        """Write `entry` into run folder `run_id`, then create its marker. Returns True if this write
        made the entry visible, False if another writer's marker was there first (this run's folder is
        then deleted: its data would be the same)."""
        entry_dir = self.entry_dir(key, entry.plate, entry.plate_version)
        run_dir = f"{entry_dir}/runs/{run_id}"
        fields_ds, wells_ds = entry_datasets(key, entry)
        marker = {
            "format": FORMAT, "key": key, "plate": entry.plate, "plate_version": entry.plate_version, "run": run_id,
            "n_fields": int(len(entry.meta)), "n_wells": int(len(entry.wells)),
            "feature_dim": int(entry.embeddings.shape[1]),
            "well_variables": sorted(entry.well_features), "digest": entry_digest(fields_ds, wells_ds),
            "completed_at": utc_now(), "lineage": entry.lineage,
        }
        if self.exists(f"{entry_dir}/{MARKER}"):
            return False
        try:
            if self.local:
                write_run_files(Path(self.path(run_dir)), entry, fields_ds, wells_ds)
            else:
                # Staged locally, then uploaded in parallel: writing Zarr through the object store puts its
                # small files one at a time.
                with tempfile.TemporaryDirectory(prefix="cellfm-entry-") as staging:
                    write_run_files(Path(staging), entry, fields_ds, wells_ds)
                    files = sorted(str(f) for f in Path(staging).rglob("*") if f.is_file())
                    self.fs.put(files, [self.path(run_dir, str(Path(f).relative_to(staging))) for f in files])
            created = self.create_exclusive(f"{entry_dir}/{MARKER}", json.dumps(marker, indent=1, sort_keys=True).encode())
        except Exception as exc:
            self.remove_tree(run_dir)
            raise self._fail(f"write {entry_dir}", exc) from exc
        if not created:
            self.remove_tree(run_dir)
        return created

    # ---------------------------------------------------------------------------- state of a key

    def key_state(self, key: str) -> "KeyState":
        """One recursive listing of the key's entries: markers and run folders."""
        try:
            files = self.files(f"{key}/plates")
        except Exception as exc:
            raise self._fail(f"list {key}", exc) from exc
        markers: dict[tuple[str, str], str] = {}
        runs: dict[tuple[str, str, str], float] = {}
        for rel, mtime in files.items():
            parts = rel.split("/")  # key, plates, plate, version, ...
            if len(parts) == 5 and parts[4] == MARKER:
                markers[(unquote(parts[2]), parts[3])] = rel
            elif len(parts) > 6 and parts[4] == "runs":
                run = (unquote(parts[2]), parts[3], parts[5])
                runs[run] = max(runs.get(run, 0.0), mtime)
        return KeyState(key, markers, runs)

    def read_markers(self, key: str, state: "KeyState | None" = None) -> list[dict]:
        state = state or self.key_state(key)
        return [self.read_json(rel) for rel in state.markers.values()]

    def marked_run(self, state: "KeyState", plate: str, version: str) -> str | None:
        """The run folder the entry's marker points at (None: no marker). Markers are never rewritten and
        their run folder is never deleted, so a marked entry with one run folder points at that one."""
        if (plate, version) not in state.markers:
            return None
        runs = [r for p, v, r in state.runs if (p, v) == (plate, version)]
        return runs[0] if len(runs) == 1 else self.read_json(state.markers[(plate, version)])["run"]

    def collect_garbage(self, key: str, stale_s: float, state: "KeyState | None" = None) -> list[str]:
        """Delete run folders no marker points at and none of whose files changed for `stale_s`
        seconds (a writer killed mid-write; one that lost the race and died before cleaning up)."""
        state = state or self.key_state(key)
        now = time.time()
        removed = []
        for (plate, version, run), newest in sorted(state.runs.items()):
            if now - newest >= stale_s and self.marked_run(state, plate, version) != run:
                run_dir = f"{self.entry_dir(key, plate, version)}/runs/{run}"
                self.remove_tree(run_dir)
                removed.append(run_dir)
        return removed

    def read_index(self, key: str) -> dict[tuple[str, str], dict]:
        try:
            rows = self.read_json(f"{key}/{INDEX}")["entries"]
        except FileNotFoundError:
            return {}
        return {(row["plate"], row["plate_version"]): row for row in rows}

    def update_index(self, key: str, state: "KeyState | None" = None) -> list[dict]:
        """Bring ``<key>/index.json`` in line with the key's markers (reading only markers it lacks), and
        check with a listing after the write: a concurrent writer's index built from an older listing is
        then replaced, so the last index written lists every marker."""
        state = state or self.key_state(key)
        while True:
            indexed = self.read_index(key)
            rows = {entry: indexed[entry] if entry in indexed else _index_row(self.read_json(rel))
                    for entry, rel in state.markers.items()}
            if set(rows) == set(indexed):
                return [rows[e] for e in sorted(rows)]
            self.write_bytes(f"{key}/{INDEX}", json.dumps({"format": FORMAT, "key": key,
                                                           "entries": [rows[e] for e in sorted(rows)]},
                                                          indent=1, sort_keys=True).encode())
            state = self.key_state(key)

    # ---------------------------------------------------------------------------- reading

    def keys(self) -> list[str]:
        """Keys with an index (every refresh that stored something wrote one)."""
        try:
            listed = self.fs.ls(self.root, detail=False) if self.fs.exists(self.root) else []
        except Exception as exc:
            raise self._fail("list keys", exc) from exc
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in listed)
        return [name for name in names if self.exists(f"{name}/{INDEX}")]

    def entries(self, key: str) -> list[dict]:
        """The key's visible entries (from its markers), newest completion last."""
        return sorted(self.read_markers(key), key=lambda m: (m["completed_at"], m["plate"]))

    def current_entries(self, key: str, plates: list[str] | None = None) -> list[dict]:
        """Per plate the entry of its newest content version (the latest completed), plates sorted."""
        latest: dict[str, dict] = {}
        for marker in self.entries(key):
            latest[marker["plate"]] = marker
        if plates is not None:
            missing = sorted(set(plates) - set(latest))
            if missing:
                raise StoreError(f"feature store {self.uri}: key {key} has no entry for plate(s) {missing}")
            latest = {p: latest[p] for p in plates}
        return [latest[p] for p in sorted(latest)]

    def open_entry(self, marker: dict, level: str):
        """The entry's xarray Dataset at `level` ("field" or "well"), loaded into memory."""
        import xarray as xr

        if level not in LEVELS:
            raise StoreError(f"level must be one of {list(LEVELS)}, got {level!r}")
        run_dir = f"{self.entry_dir(marker['key'], marker['plate'], marker['plate_version'])}/runs/{marker['run']}"
        try:
            ds = xr.open_zarr(self.zarr_store(f"{run_dir}/{level}s.zarr", "r"), consolidated=True).load()
        except Exception as exc:
            raise self._fail(f"read {run_dir}/{level}s.zarr", exc) from exc
        return ds


@dataclass
class KeyState:
    """What a key holds: (plate, version) -> marker path, (plate, version, run) -> newest file time."""

    key: str
    markers: dict[tuple[str, str], str]
    runs: dict[tuple[str, str, str], float]


def _index_row(marker: dict) -> dict:
    lineage = marker["lineage"]
    return {"plate": marker["plate"], "plate_version": marker["plate_version"], "run": marker["run"],
            "n_fields": marker["n_fields"], "n_wells": marker["n_wells"], "feature_dim": marker["feature_dim"],
            "well_variables": marker["well_variables"], "digest": marker["digest"],
            "completed_at": marker["completed_at"], "checkpoint_hash": lineage["checkpoint"]["hash"],
            "checkpoint": lineage["checkpoint"]["uri"]}


# -------------------------------------------------------------------------------- the one-call reader


def read_features(store_uri: str, checkpoint_key: str, level: str = "well", variable: str = "mean",
                  plates: list[str] | None = None, storage_options: dict | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Every stored feature of one key across plates, in one call.

    level "field": the field embeddings; "well": the well variable `variable` (``mean``, ``median``, or a
    normalized one such as ``mean_robust_mad`` when the store was filled with features.normalization).
    Per plate the newest content version is read; `plates` restricts (and requires) plates.
    Returns (metadata, features): one row per field/well, plates sorted then wells (and fields) sorted;
    metadata columns as in the manifest (plate, well, [field,] perturbation_id, moa, is_control, ...;
    channel_names comma-joined), features float32 (n, D)."""
    store = FeatureStore(store_uri, storage_options)
    entries = store.current_entries(checkpoint_key, plates)
    if not entries:
        raise StoreError(f"feature store {store.uri}: no entries for key {checkpoint_key!r} "
                         f"(keys with entries: {', '.join(store.keys()) or 'none'})")
    metas, matrices = [], []
    for marker in entries:
        ds = store.open_entry(marker, level)
        name = "embedding" if level == "field" else variable
        if name not in ds.data_vars:
            raise StoreError(f"feature store {store.uri}: key {checkpoint_key} plate {marker['plate']} has no well "
                             f"variable {variable!r}; stored: {sorted(map(str, ds.data_vars))}")
        metas.append(coordinates_frame(ds, level))
        matrices.append(ds[name].values.astype(np.float32))
    return pd.concat(metas, ignore_index=True), np.concatenate(matrices)


def open_features(store_uri: str, checkpoint_key: str, plate: str, level: str = "well",
                  storage_options: dict | None = None):
    """One plate's entry (its newest content version) as the stored xarray Dataset: dims (field|well,
    feature), manifest coordinates, lineage in attrs["cellfm"]."""
    store = FeatureStore(store_uri, storage_options)
    return store.open_entry(store.current_entries(checkpoint_key, [plate])[0], level)


def list_entries(store_uri: str, storage_options: dict | None = None) -> pd.DataFrame:
    """The consolidated index of a store: one row per entry of every key (from each key's index.json)."""
    store = FeatureStore(store_uri, storage_options)
    rows = [{"key": key, **row} for key in store.keys() for row in store.read_json(f"{key}/{INDEX}")["entries"]]
    return pd.DataFrame(rows)
