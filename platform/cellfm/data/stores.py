"""Store helpers shared by the data jobs: fsspec storage options from the command line, and
small filesystem operations (exists / write bytes / list) that work on local paths and ``s3://``.

Credentials come from the environment or standard AWS config files (s3fs/botocore read them);
``storage_options`` may carry ``endpoint_url``/``key``/``secret``/``client_kwargs`` for S3-compatible
stores. Nothing here logs option values.
"""

from __future__ import annotations

import json
from typing import Any

import fsspec
from fsspec.core import url_to_fs


def storage_options_from_cli(text: str | None, endpoint_url: str | None = None) -> dict[str, Any]:
    """Storage options from a JSON object string plus an optional endpoint URL shortcut."""
    options: dict[str, Any] = {}
    if text:
        try:
            options = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"--storage-options is not valid JSON: {exc.msg} at character {exc.pos}") from None
        if not isinstance(options, dict):
            raise SystemExit("--storage-options must be a JSON object")
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
