"""What identifies a feature store entry apart from the plate's pixels: the checkpoint and the recipe that
embedded it, and the code that ran.

- checkpoint hash: sha256 over the inference weights file (backbone.safetensors) and the model section
  of the checkpoint's config.yaml.
- feature key: ``<model name>-<12 hex>``, a hash of the checkpoint hash and the embedding recipe (the
  channel readout, input normalization and sizes, features.image_size, model.channel_groups, aggregations,
  normalization, and with data.crop_mode=cells the crop size and a digest of the cell locations table):
  everything that changes the stored numbers apart from the pixels. A new checkpoint gets a new key.

The refresh (`cellfm.features.refresh`) writes entries under this key; evaluation finds them by it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from pathlib import Path

import yaml

from cellfm.config import Config
from cellfm.data.cells import locations_digest, read_cell_locations
from cellfm.storage import filesystem, is_remote, join, run_directory
from cellfm.train.checkpoint import CONFIG_FILE, INFERENCE_WEIGHTS, CheckpointError, latest_checkpoint

# The recipe's name of each features.channel_readout (pooled keeps the keys stores had before the option).
FEATURE_RECIPES = {"pooled": "cls+mean_patch", "per_channel": "cls+mean_patch per channel, in channel order"}


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def resolve_checkpoint(cfg: Config, checkpoint: str | None = None) -> str:
    """`checkpoint` (or features.checkpoint): a folder or s3:// URI, or "latest" = the newest checkpoint of
    train.storage_path/train.run_name."""
    checkpoint = checkpoint or cfg.features.checkpoint
    if checkpoint == "latest":
        checkpoint = latest_checkpoint(run_directory(cfg), cfg.data.storage_options or None)
    return str(checkpoint) if is_remote(checkpoint) else str(Path(checkpoint).expanduser().resolve())


def checkpoint_identity(checkpoint: str, storage_options: dict | None = None) -> tuple[str, dict]:
    """(checkpoint hash, the checkpoint's model config) from its inference weights and config.yaml."""
    fs, root = filesystem(checkpoint, storage_options)
    weights_sha = hashlib.sha256()
    try:
        with fs.open(join(root, INFERENCE_WEIGHTS), "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                weights_sha.update(block)
        saved = yaml.safe_load(fs.cat_file(join(root, CONFIG_FILE)))
    except FileNotFoundError as exc:
        if not fs.exists(root):
            raise CheckpointError(f"checkpoint {checkpoint} does not exist") from exc
        raise CheckpointError(f"checkpoint {checkpoint} is missing {INFERENCE_WEIGHTS} or {CONFIG_FILE}") from exc
    model = Config.from_dict(saved, source=f"{checkpoint}/{CONFIG_FILE}").to_dict()["model"]
    return _sha256(f"weights {weights_sha.hexdigest()}\nmodel {json.dumps(model, sort_keys=True)}"), model


def embedding_recipe(cfg: Config) -> dict:
    """The settings besides the checkpoint that change the stored numbers."""
    d, f = cfg.data, cfg.features
    return {
        "feature": FEATURE_RECIPES[f.channel_readout],
        "input": {"normalization": d.normalization, "clip_low": d.clip_low, "clip_high": d.clip_high,
                  "clahe_clip_limit": d.clahe_clip_limit, "clahe_tiles": d.clahe_tiles, "field_size": d.field_size,
                  "field_resize": d.field_resize, "image_size": f.image_size},
        "channel_groups": cfg.model.channel_groups,
        "aggregations": sorted(f.aggregations),
        "normalization": f.normalization,
        "spherize_regularization": f.spherize_regularization,
        # Only in cells mode: field keys stay those stores had before the option.
        **({"crop": {"mode": "cells", "size": d.cell_crop_size, "locations": locations_digest(
            read_cell_locations(d.cell_locations, d.storage_options or None))}} if d.crop_mode == "cells" else {}),
    }


def feature_key(model_name: str, checkpoint_hash: str, recipe: dict) -> str:
    return f"{model_name}-{_sha256(json.dumps({'checkpoint': checkpoint_hash, 'recipe': recipe}, sort_keys=True))[:12]}"


def resolve_feature_key(cfg: Config, checkpoint: str | None = None) -> str:
    """The store key the features of `checkpoint` (default features.checkpoint) have under `cfg`: what
    `cellfm.features.store.read_features` takes."""
    resolved = resolve_checkpoint(cfg, checkpoint)
    checkpoint_hash, model = checkpoint_identity(resolved, cfg.data.storage_options or None)
    return feature_key(model["name"], checkpoint_hash, embedding_recipe(cfg))


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """cellfm's package version and, when the code runs from a git checkout, its revision."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("cellfm")
    except PackageNotFoundError:
        package = None
    where = Path(__file__).resolve().parent
    try:
        revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                    capture_output=True, text=True, timeout=10, check=True).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        revision, dirty = None, None
    return {"cellfm": package, "git_revision": revision, "git_dirty": dirty}
