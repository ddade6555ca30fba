"""A plate's content version: what the feature store keys stored features by and what `cellfm ingest`
records per registered plate, so a plate changed after it was embedded or registered is caught."""

from __future__ import annotations

import hashlib
import json

import pandas as pd

from cellfm.data.manifest import ManifestError
from cellfm.data.plate import redact
from cellfm.storage import filesystem, modified_time


def plate_content_version(plate_uri: str, rows: pd.DataFrame, storage_options: dict | None = None) -> str:
    """The plate's content version: sha256 (16 hex) over the plate store's listing (every object's path relative
    to the plate, size, and its S3 ETag, or locally its modification time) plus the plate's manifest `rows`
    (every column but store_uri). One listing of the plate, no pixel read: any rewritten chunk, shard or
    metadata document, or any changed manifest annotation, gives a new version."""
    fs, root = filesystem(plate_uri, storage_options)
    root = root.rstrip("/")
    try:
        infos = fs.find(root, detail=True)
    except Exception as exc:
        reason = redact(f"{type(exc).__name__}: {exc}", storage_options)
        raise ManifestError(f"plate {plate_uri}: cannot list: {reason}") from exc
    if not infos:
        raise ManifestError(f"plate {plate_uri}: no files (the manifest names a plate that is not there)")
    digest = hashlib.sha256(b"cellfm plate content version 1\n")
    for name in sorted(infos):
        info = infos[name]
        if info.get("type") == "directory":
            continue
        stamp = info.get("ETag") or repr(modified_time(info))
        digest.update(f"{name[len(root) + 1:]}\t{info.get('size')}\t{stamp}\n".encode())
    annotations = rows.drop(columns=["store_uri"], errors="ignore").sort_values(["well", "field"])
    digest.update(json.dumps(annotations.to_dict("records"), sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]
