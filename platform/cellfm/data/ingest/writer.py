"""Writing a plan (`run_ingestion`): one plate per source plate (``<out>/<plate>.zarr``, ``s3://`` or
local), each field by exactly one Ray task (one writer per shard). A field's shard is written in one atomic
operation (a local rename / one S3 PUT) and only then its completion marker
``<out>/_ingest_state/<plate>/<row><col>_<field>.json`` (holding the SHA-256 of the field's pixels). A rerun
skips fields whose marker exists and whose stored pixels still hash to it, and writes the rest, so a run
killed at any point finishes to the same plates as a clean run. The manifest is written last, atomically."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cellfm.data.ingest.images import load_plane
from cellfm.data.ingest.plan import FieldSpec, IngestError, IngestPlan, PlatePlan, in_plate_order
from cellfm.data.manifest import write_manifest
from cellfm.data.plate import PlateError, read_field, redact
from cellfm.data.plate_writer import create_plate, write_field
from cellfm.storage import filesystem, join, write_file
from cellfm.progress import eta_seconds, format_duration

STATE_DIR = "_ingest_state"


def load_field(spec: FieldSpec, plan: PlatePlan, storage_options=None) -> np.ndarray:
    """The (C, H, W) field of ``spec``; IngestError naming plate/well/site/file on any problem."""
    planes = []
    for plane in spec.planes:
        try:
            image = load_plane(plane, storage_options)
        except Exception as exc:  # noqa: BLE001
            raise IngestError(f"{spec.where()}, channel {plane.channel}: {redact(str(exc), storage_options)}") from exc
        if image.shape != tuple(plan.shape) or str(image.dtype) != plan.dtype:
            raise IngestError(f"{spec.where()}, file {plane.uri}: shape {image.shape} dtype {image.dtype}, but the "
                              f"plate's fields are {tuple(plan.shape)} {plan.dtype}")
        planes.append(image)
    return np.stack(planes)


def _digest(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def _ingest_fields(specs: list[FieldSpec], plans: dict[str, PlatePlan], plate_uris: dict[str, str],
                   state_dirs: dict[str, str], storage_options, field_delay_s: float) -> list[tuple[str, str, str]]:
    """Write each field (the only writer of its shard) then its marker. Returns (plate, key, error or "")."""
    results = []
    for spec in specs:
        try:
            image = load_field(spec, plans[spec.plate], storage_options)
            if field_delay_s:
                time.sleep(field_delay_s)
            write_field(plate_uris[spec.plate], spec.row, spec.col, spec.field, image, storage_options)
            marker = {"sha256": _digest(image), "sources": [p.uri for p in spec.planes]}
            write_file(join(state_dirs[spec.plate], f"{spec.key}.json"), json.dumps(marker), storage_options)
            results.append((spec.plate, spec.key, ""))
        except (IngestError, PlateError) as exc:
            results.append((spec.plate, spec.key, str(exc)))
        except Exception as exc:  # noqa: BLE001
            results.append((spec.plate, spec.key, f"{spec.where()}: {redact(f'{type(exc).__name__}: {exc}', storage_options)}"))
    return results


def _field_is_done(spec: FieldSpec, plate_uri: str, state_dir: str, storage_options, verify: bool) -> bool:
    fs, path = filesystem(join(state_dir, f"{spec.key}.json"), storage_options)
    try:
        marker = json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return False
    if not verify:
        return True
    try:
        image, _ = read_field(plate_uri, spec.row, spec.col, spec.field, storage_options=storage_options)
    except PlateError:
        return False
    return _digest(image) == marker.get("sha256")


def _prepare_plate(plan: PlatePlan, plate_uri: str, state_dir: str, storage_options) -> bool:
    """Create the plate unless a previous run created it from the same plan. True if reused."""
    fs, plan_path = filesystem(join(state_dir, "plan.json"), storage_options)
    try:
        if fs.cat_file(plan_path).decode() == plan.fingerprint():
            return True
    except FileNotFoundError:
        pass
    fs_state, state_path = filesystem(state_dir, storage_options)
    if fs_state.exists(state_path):
        fs_state.rm(state_path, recursive=True)
    create_plate(plate_uri, plan.name, plan.wells, plan.n_fields, plan.channel_names, plan.shape,
                 dtype=plan.dtype, storage_options=storage_options)
    write_file(join(state_dir, "plan.json"), plan.fingerprint(), storage_options)  # only after the plate exists
    return False


def manifest_rows(plan: IngestPlan, plate_uris: Mapping[str, str]) -> pd.DataFrame:
    records = []
    for spec in plan.fields:
        pp = plan.plates[spec.plate]
        meta = dict(spec.meta)
        record = {
            "source": plan.source, "plate": spec.plate, "well": f"{spec.row}{spec.col}", "row": spec.row,
            "col": spec.col, "field": spec.field, "store_uri": plate_uris[spec.plate],
            "channel_names": list(pp.channel_names), "channel_groups": list(pp.channel_groups),
            "height": pp.shape[0], "width": pp.shape[1], "dtype": pp.dtype,
            "perturbation_id": meta.pop("perturbation_id", ""), "moa": meta.pop("moa", ""),
            "is_control": bool(meta.pop("is_control", False)), "dose": float(meta.pop("dose", float("nan"))),
            "cell_line": meta.pop("cell_line", ""), "batch": meta.pop("batch", ""),
            "original_uris": list(dict.fromkeys(p.uri for p in spec.planes)),
        }
        records.append(record | {k: str(v) for k, v in meta.items()})
    return in_plate_order(pd.DataFrame(records))


@dataclass
class IngestReport:
    plates: list[str]
    written: int
    skipped: int
    manifest: str
    seconds: float


def run_ingestion(plan: IngestPlan, out: str, manifest_path: str | Path, storage_options: dict | None = None,
                  use_ray: bool = True, fields_per_task: int = 4, verify: bool = True, field_delay_s: float = 0.0,
                  progress: Callable[[str], None] | None = print) -> IngestReport:
    """Write ``plan`` into plates under ``out`` (local folder or ``s3://`` prefix) and the manifest.

    Fields already written and verified by an earlier run are skipped. Each Ray task writes whole
    fields (never part of one), so every shard has exactly one writer.
    """
    started = time.perf_counter()
    say = progress or (lambda _msg: None)
    local = "://" not in out
    if local:
        out = str(Path(out).absolute())
        Path(out).mkdir(parents=True, exist_ok=True)
    plate_uris = {name: join(out, f"{name}.zarr") for name in plan.plates}
    state_dirs = {name: join(out, STATE_DIR, name) for name in plan.plates}
    for name, pp in plan.plates.items():
        reused = _prepare_plate(pp, plate_uris[name], state_dirs[name], storage_options)
        say(f"[ingest] plate {name}: {len(pp.wells)} wells x {pp.n_fields} fields, channels {pp.channel_names}, "
            f"{pp.shape[0]}x{pp.shape[1]} {pp.dtype} ({'resuming' if reused else 'created'} {plate_uris[name]})")
    pending = [s for s in plan.fields
               if not _field_is_done(s, plate_uris[s.plate], state_dirs[s.plate], storage_options, verify)]
    skipped = len(plan.fields) - len(pending)
    say(f"[ingest] {len(plan.fields)} fields: {skipped} already written and verified, {len(pending)} to write")
    batches = [pending[i:i + fields_per_task] for i in range(0, len(pending), max(1, fields_per_task))]
    errors: list[str] = []
    done = 0

    def report(results):
        nonlocal done
        for _plate, _key, error in results:
            done += 1
            if error:
                errors.append(error)
        elapsed = time.perf_counter() - started
        say(f"[ingest] {done}/{len(pending)} fields written ({done / max(elapsed, 1e-9):.1f} fields/s, "
            f"{len(errors)} error(s)) | ETA {format_duration(eta_seconds(done, len(pending), elapsed))}")

    if use_ray and batches:
        import ray

        from cellfm.runtime import start_embedded_ray

        if not ray.is_initialized():
            start_embedded_ray(num_cpus=None, log_to_driver=False)
        task = ray.remote(num_cpus=1)(_ingest_fields)
        plans_ref = ray.put(plan.plates)
        refs = [task.remote(batch, plans_ref, plate_uris, state_dirs, storage_options, field_delay_s)
                for batch in batches]
        while refs:
            ready, refs = ray.wait(refs, num_returns=1)
            report(ray.get(ready[0]))
    else:
        for batch in batches:
            report(_ingest_fields(batch, plan.plates, plate_uris, state_dirs, storage_options, field_delay_s))
    if errors:
        shown = "\n  ".join(errors[:20])
        raise IngestError(f"{len(errors)} field(s) failed (the other {len(pending) - len(errors)} are written; "
                          f"a rerun resumes):\n  {shown}" + ("\n  ..." if len(errors) > 20 else ""))
    df = manifest_rows(plan, plate_uris)
    write_manifest(df, manifest_path if "://" in str(manifest_path) else Path(manifest_path), storage_options)
    seconds = time.perf_counter() - started
    say(f"[ingest] done: {len(pending)} written, {skipped} skipped, {len(plan.plates)} plate(s), "
        f"manifest {manifest_path} ({len(df)} rows) in {seconds:.1f} s")
    return IngestReport(sorted(plan.plates), len(pending), skipped, str(manifest_path), seconds)

