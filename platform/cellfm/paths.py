"""Whether a job can use the paths it is given, before anything starts: output folders that a file blocks,
and relative paths a `ray job submit` job cannot see (`check_paths`, the preflight of commands that take
paths rather than a config)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

from cellfm.config import PreflightError
from cellfm.runtime import RAY_JOB_CONFIG_ENV


def check_paths(inputs: Mapping[str, str | None] | None = None, outputs: Mapping[str, str | None] | None = None) -> None:
    """`PreflightError` listing every `path_problem` of the inputs and outputs (name -> path; None
    skipped): the preflight of commands that take paths rather than a config (ingest, validate)."""
    problems = [p for key, path in (inputs or {}).items() if path and (p := path_problem(key, path))]
    problems += [p for key, path in (outputs or {}).items() if path and (p := path_problem(key, path, output=True))]
    if problems:
        raise PreflightError(problems)


def folder_problem(key: str, path: str) -> str | None:
    """Why a job cannot write its output folder `path` (local paths only), or None: it is a file, or a file
    stands where one of its parent folders would be."""
    if "://" in str(path):
        return None
    for folder in (Path(path), *Path(path).parents):
        if folder.exists():
            if folder.is_dir():
                return None
            return (f"{key}={path}: {folder} is a file; this must be a folder (or a path where one can be "
                    f"created)")
    return None


def submitted_job_runtime_env() -> dict | None:
    """The runtime env of the `ray job submit` job this process is the driver of (None when it is
    not one)."""
    text = os.environ.get(RAY_JOB_CONFIG_ENV)
    if not text:
        return None
    try:
        return json.loads(text).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}


def path_problem(key: str, path: str, *, output: bool = False) -> str | None:
    """Why the job cannot use `path` (a line naming `key`), or None. Only paths a job run through
    `ray job submit` cannot see are judged here; a missing file elsewhere is reported by its reader.

    Under `ray job submit --working-dir .` the job runs in an unpacked copy of the files git does not
    ignore: a relative path into an ignored folder (demo_output/, data/, ...) points nowhere, and a
    relative output path lands in that temporary copy on one node."""
    if "://" in str(path) or Path(path).is_absolute():
        return None
    runtime_env = submitted_job_runtime_env()
    if runtime_env is None:
        return None
    instead = "use an absolute path on storage every node sees (e.g. /shared/...) or an s3:// URI"
    if output:
        return (f"{key}={path} is a relative path: under `ray job submit` it would be written into the job's "
                f"temporary working directory on one node and lost; {instead}")
    if Path(path).exists():
        return None
    uploaded = ("`--working-dir` uploaded only the files git does not ignore, so git-ignored folders such as "
                "demo_output/ are not there" if runtime_env.get("working_dir") else "the job has no working directory")
    return (f"{key}={path} is a relative path the cluster cannot see: it does not exist in the job's working "
            f"directory {os.getcwd()} ({uploaded}); {instead}")
