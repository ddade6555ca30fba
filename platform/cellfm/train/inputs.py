"""What a training run takes from its manifest: the rules the manifest must meet (`training_input_problems`,
listed by preflight before Ray starts and raised by the trainer when it is called directly) and the channel
metadata it fills into the config (`record_channel_metadata`), so the run's saved config rebuilds the model."""

from __future__ import annotations

import copy

import pandas as pd

from cellfm.config import Config, ConfigError
from cellfm.data.layout import field_layout_problems
from cellfm.data.cells import LocationsError, with_cell_locations
from cellfm.data.pipeline.cache import field_cache_problem
from cellfm.data.pipeline.dataset import samples_per_rank
from cellfm.models.registry import VOCABULARY_BACKBONES
from cellfm.train.init_from import init_from_config, init_from_problems


def record_channel_metadata(cfg: Config, manifest) -> None:
    """Fill `model.channel_groups` (C3R) and `model.channel_vocabulary` (ChannelViT, DiChaViT) from the training
    manifest where the config leaves them empty, so the run's saved config rebuilds the model at
    inference. Explicit config entries win; a stain given two groups in the manifest is an error. With
    `train.init_from` an empty vocabulary is the checkpoint's (its channel embeddings are in that order)."""
    groups: dict[str, str] = {}
    for row in manifest.itertuples():
        for name, group in zip(row.channel_names, row.channel_groups):
            if groups.setdefault(name, group) != group:
                raise ConfigError(f"manifest gives channel {name!r} two groups ({groups[name]!r}, {group!r}), "
                                  f"e.g. plate {row.plate} well {row.well} field {row.field}; set model.channel_groups")
    cfg.model.channel_groups = {**groups, **cfg.model.channel_groups}
    if not cfg.model.channel_vocabulary:
        source = init_from_config(cfg)
        cfg.model.channel_vocabulary = list(source.model.channel_vocabulary) if source is not None \
            and source.model.channel_vocabulary else sorted(groups)


def training_input_problems(cfg: Config, manifest: pd.DataFrame) -> list[str]:
    """Every problem of the training manifest against the config, one line each: layout, field cache, channel
    groups, the SupCon label column, ChannelViT's vocabulary, at least one optimizer step per epoch, and the
    `train.init_from` checkpoint. Preflight lists them all; the trainer raises them."""
    source = f"data.train_manifest={cfg.data.train_manifest}"
    problems = field_layout_problems(manifest, cfg.data, source)
    if not problems and (cache := field_cache_problem(manifest, cfg.data, source)):
        problems.append(cache)
    try:
        record_channel_metadata(copy.deepcopy(cfg), manifest)
    except ConfigError as exc:
        problems += exc.problems
    label = cfg.ssl.supcon_label if cfg.ssl.supcon_weight > 0 else ""
    if label and label not in manifest.columns:
        problems.append(f"ssl.supcon_label={label!r} is not a column of {source}; columns: "
                        f"{', '.join(map(str, manifest.columns))}")
    if cfg.model.name in VOCABULARY_BACKBONES and cfg.model.channel_vocabulary:
        unknown = sorted({n for names in manifest["channel_names"] for n in names} - set(cfg.model.channel_vocabulary))
        if unknown:
            problems.append(f"model.channel_vocabulary lacks channel(s) {unknown} of {source}; add them or leave "
                            f"model.channel_vocabulary empty (= the manifest's channels)")
    o, world = cfg.optim, cfg.train.num_workers
    # Every rank runs floor(samples / batch / accumulation) steps (train.loop; samples_per_rank: its fields,
    # or its fewest cells); sizes that are not positive are config problems already.
    samples = len(manifest) // max(world, 1)
    if cfg.data.crop_mode == "cells" and min(world, o.epochs) > 0:
        try:
            located = with_cell_locations(manifest, cfg.data, source)
            samples = samples_per_rank(located, cfg.data, seed=cfg.train.seed, epochs=o.epochs, world_size=world)
        except (LocationsError, OSError):
            pass  # preflight's cell_location_problems reports it
    if min(world, o.batch_size_per_worker, o.accumulate_steps) > 0 and \
            samples // o.batch_size_per_worker // o.accumulate_steps < 1:
        cells = f" ({samples} cells for the worker with fewest)" if cfg.data.crop_mode == "cells" else ""
        problems.append(f"{len(manifest)} training fields{cells} over train.num_workers={world} cannot fill one step of "
                        f"optim.batch_size_per_worker={o.batch_size_per_worker} x optim.accumulate_steps="
                        f"{o.accumulate_steps}; lower them or add plates")
    return problems + init_from_problems(cfg, manifest)
