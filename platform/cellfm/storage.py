"""Storage on a local folder or ``s3://``: filesystems for a URL, joins, whole-file writes (a reader sees
the old content or the new, never a part), exclusive create, and whole-folder copies for runs and
checkpoints.

Two filesystem kinds: fsspec (plates, manifests, the feature store, markers and records) and pyarrow
(what Ray Train and Ray Tune write runs through). Both take the same s3fs-style ``storage_options``
(``endpoint_url``/``key``/``secret``/``token``/``client_kwargs``); missing ones come from the
environment or the standard AWS config files. Nothing here logs option values.
"""

from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from cellfm.config import Config, ConfigError


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


# ------------------------------------------------------------------------------------ URLs and fsspec


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def join(base: str, *parts: str) -> str:
    """`base` and `parts` joined by single slashes (a local path or a URL such as ``s3://bucket/prefix``)."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem(url: str | os.PathLike, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) for a local path or fsspec URL."""
    url = str(url)
    if "://" not in url:
        return fsspec.filesystem("file", auto_mkdir=True), url
    return url_to_fs(url, **(storage_options or {}))


def modified_time(info: dict) -> float:
    """An fsspec file info's modification time in seconds since the epoch (local mtime, S3 LastModified)."""
    value = info.get("mtime", info.get("LastModified"))
    if isinstance(value, datetime):
        return value.timestamp()
    return float(value) if value is not None else 0.0


def run_directory(cfg: Config) -> Path | str:
    """The run's folder: a local path, or an s3:// URI when `train.storage_path` is one. Here, not in the
    trainer, so finding a run's checkpoints imports no training code."""
    if is_remote(cfg.train.storage_path):
        return join(cfg.train.storage_path, cfg.train.run_name)
    return Path(cfg.train.storage_path).expanduser().resolve() / cfg.train.run_name


# ------------------------------------------------------------------------------------ whole files


def _sibling(path: Path) -> Path:
    """A new hidden name beside `path`, with its suffix (writers such as savefig go by it), for a file that
    is then renamed or linked into place. Its writer creates it, so it gets the usual permissions."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{path.suffix}")


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside local `path` for the block to write; renamed over `path` when the block
    completes, removed when it raises: readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_file(url: str | os.PathLike, data: bytes | str, storage_options: dict | None = None) -> None:
    """Write `data` (str as UTF-8) to `url` whole: locally through a temporary file renamed over it, on an
    object store as one PUT (all or nothing)."""
    data = data.encode() if isinstance(data, str) else data
    fs, path = filesystem(url, storage_options)
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def create_exclusive(url: str | os.PathLike, data: bytes, storage_options: dict | None = None) -> bool:
    """Create `url` whole unless it exists; True if this call created it. Locally a hard link to a complete
    temporary file (the link fails if the name exists); on S3 a conditional PUT (``If-None-Match: *``)."""
    fs, path = filesystem(url, storage_options)
    if not isinstance(fs, LocalFileSystem):
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path)
    try:
        tmp.write_bytes(data)
        os.link(tmp, path)  # atomic, and fails if `path` exists
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ pyarrow (Ray Train / Tune)


def _split_s3(uri: str) -> str:
    scheme, sep, rest = str(uri).partition("://")
    if scheme != "s3" or not rest.strip("/"):
        raise ConfigError(f"{uri!r}: only local paths and s3://bucket/prefix URIs are supported")
    return rest.strip("/")


# s3fs option -> pyarrow.fs.S3FileSystem argument.
_S3FS_TO_PYARROW = {"endpoint_url": "endpoint_override", "key": "access_key", "secret": "secret_key",
                    "token": "session_token", "anon": "anonymous"}


def s3_filesystem(storage_options: dict | None):
    """pyarrow S3FileSystem from s3fs-style options (`endpoint_url`, `key`, `secret`, `token`, `anon`,
    `client_kwargs.region_name`); missing ones come from the environment as for the AWS CLI
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, ...)."""
    import pyarrow.fs

    options = dict(storage_options or {})
    kwargs: dict = {}
    region = (options.pop("client_kwargs", None) or {}).get("region_name")
    for key, value in options.items():
        if key not in _S3FS_TO_PYARROW:
            raise ConfigError(f"data.storage_options.{key} has no equivalent for train.storage_path on s3:// "
                              f"(supported: {', '.join(sorted(_S3FS_TO_PYARROW))}, client_kwargs.region_name)")
        kwargs[_S3FS_TO_PYARROW[key]] = value
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if "endpoint_override" not in kwargs and endpoint:
        kwargs["endpoint_override"] = endpoint
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pyarrow.fs.S3FileSystem(**kwargs)


def filesystem_and_path(uri: str, storage_options: dict | None):
    """(pyarrow filesystem, path on it) of an s3:// URI."""
    return s3_filesystem(storage_options), _split_s3(uri)


def filesystem_of(path: str | os.PathLike, storage_options: dict | None):
    """(pyarrow filesystem, path on it) of a local path (made absolute) or an s3:// URI."""
    import pyarrow.fs

    if is_remote(path):
        return filesystem_and_path(str(path), storage_options)
    return pyarrow.fs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def upload_directory(local: Path, uri: str, storage_options: dict | None) -> None:
    """Copy every file under `local` to `uri` (each object is written whole)."""
    import pyarrow.fs

    fs, path = filesystem_and_path(uri, storage_options)
    pyarrow.fs.copy_files(str(local), path, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)


def download_directory(uri: str, local: Path, storage_options: dict | None) -> Path:
    import pyarrow.fs

    fs, path = filesystem_and_path(uri, storage_options)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        raise FileNotFoundError(f"{uri} does not exist or is not a folder")
    pyarrow.fs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem())
    return local


def read_text(uri: str, storage_options: dict | None) -> str:
    fs, path = filesystem_and_path(uri, storage_options)
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def list_folders(uri: str, storage_options: dict | None) -> list[str]:
    """URIs of the folders directly under `uri`."""
    import pyarrow.fs

    fs, path = filesystem_and_path(uri, storage_options)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return [f"s3://{info.path}" for info in infos if info.type == pyarrow.fs.FileType.Directory]
