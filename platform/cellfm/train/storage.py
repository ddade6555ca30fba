"""Run storage on `s3://`: the pyarrow filesystem Ray Train writes checkpoints through, built from the
same s3fs-style options as `data.storage_options` (or, when those are empty, from the environment:
AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, ...), plus upload/download of
whole folders."""

from __future__ import annotations

import os
from pathlib import Path

from cellfm.config import Config, ConfigError


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def run_directory(cfg: Config) -> Path | str:
    """The run's folder: a local path, or an s3:// URI when `train.storage_path`
    is one. Here, not in the trainer, so finding a run's checkpoints imports no training code."""
    if is_remote(cfg.train.storage_path):
        return f"{cfg.train.storage_path.rstrip('/')}/{cfg.train.run_name}"
    return Path(cfg.train.storage_path).expanduser().resolve() / cfg.train.run_name


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
    `client_kwargs.region_name`); missing ones come from the environment as for the AWS CLI."""
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


def filesystem_of(path: str | os.PathLike, storage_options: dict | None):
    """(pyarrow filesystem, path on it) of a local path (made absolute) or an s3:// URI."""
    import pyarrow.fs

    if is_remote(path):
        return filesystem_and_path(str(path), storage_options)
    return pyarrow.fs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def write_file(fs, path: str, data: bytes) -> None:
    """Write `data` to `path` on `fs` whole: locally through a temporary file renamed into place, on S3 as
    one object (a PUT is all or nothing), so a reader never sees half a file."""
    import pyarrow.fs

    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.{os.getpid()}.tmp"
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as out:
            out.write(data)
