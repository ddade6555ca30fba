"""Store helpers shared by the data jobs: fsspec storage options from the command line, and
small filesystem operations (exists / write bytes / list) that work on local paths and ``s3://``.

Credentials come from the environment or standard AWS config files (s3fs/botocore read them);
``storage_options`` may carry ``endpoint_url``/``key``/``secret``/``client_kwargs`` for S3-compatible
stores. Nothing here logs option values.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from cellfm.config import ConfigError


def json_object(text: str | None, flag: str) -> dict[str, Any] | None:
    """The JSON object given to a command-line flag (None when not given); ConfigError naming the flag."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag} is not valid JSON: {exc.msg} at character {exc.pos}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object, got {type(value).__name__}")
    return value


def storage_options_from_cli(text: str | None, endpoint_url: str | None = None) -> dict[str, Any]:
    """Storage options from a JSON object string plus an optional endpoint URL shortcut."""
    options = json_object(text, "--storage-options") or {}
    if endpoint_url:
        options["endpoint_url"] = endpoint_url
    return options


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or fsspec URL."""
    if "://" not in url:
        return fsspec.filesystem("file", auto_mkdir=True), url
    return url_to_fs(url, **(storage_options or {}))


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def modified_time(info: dict) -> float:
    """An fsspec file info's modification time in seconds since the epoch (local mtime, S3 LastModified)."""
    value = info.get("mtime", info.get("LastModified"))
    if isinstance(value, datetime):
        return value.timestamp()
    return float(value) if value is not None else 0.0
