"""Evaluate a checkpoint against a random-init encoder of the same architecture on every
held-out manifest named in `eval.manifests`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cellfm.config import Config
from cellfm.data.pipeline import load_manifests
from cellfm.evaluate.metrics import repeated_split_scores
from cellfm.evaluate.report import write_report
from cellfm.features.aggregate import aggregate_wells, normalize_to_controls
from cellfm.features.embed import EncoderSpec, embed_manifest
from cellfm.runtime import init_ray
from cellfm.train.checkpoint import load_inference_backbone
from cellfm.train.storage import is_remote


def split_seeds(cfg: Config) -> list[int]:
    return list(range(cfg.eval.split_seed, cfg.eval.split_seed + cfg.eval.n_splits))


def well_scores(fields: pd.DataFrame, embedding_column: str, cfg: Config) -> tuple[int, dict]:
    """Mean embedding per well (normalized as `eval.well_normalization` says), then the probe on
    `eval.n_splits` fixed splits for each of `eval.labels`; returns (number of wells, scores per label)."""
    meta, features = aggregate_wells(fields, embedding_column)
    if cfg.eval.well_normalization == "negcon":
        features = normalize_to_controls(features, meta)
    return len(meta), {label: repeated_split_scores(features, meta[label].astype(str).to_numpy(),
                                                    cfg.eval.test_fraction, split_seeds(cfg))
                       for label in cfg.eval.labels}


def run_evaluation(cfg: Config, checkpoint_dir: str | Path) -> tuple[dict, dict[str, Path]]:
    """`checkpoint_dir`: a local folder or an s3:// URI (read with `data.storage_options`). Returns the report
    dict and the paths of the written JSON / Markdown / PNG."""
    storage_options = cfg.data.storage_options or None
    checkpoint_dir = str(checkpoint_dir) if is_remote(checkpoint_dir) else str(Path(checkpoint_dir).resolve())
    # The random baseline uses the checkpoint's own architecture, not the evaluation config's.
    _, trained_cfg = load_inference_backbone(checkpoint_dir, storage_options)
    encoders = [
        # model.channel_groups of the evaluation config extends/overrides the checkpoint's mapping,
        # e.g. to place a stain the model never saw into the context or concept group.
        EncoderSpec("trained", checkpoint_dir=checkpoint_dir, channel_groups=cfg.model.channel_groups,
                    storage_options=storage_options),
        EncoderSpec("random_init", model={**trained_cfg.to_dict()["model"],
                                          "channel_groups": {**trained_cfg.model.channel_groups,
                                                             **cfg.model.channel_groups}},
                    seed=cfg.eval.random_init_seed),
        EncoderSpec("intensity_stats", intensity=True),
    ]
    manifests = {name: load_manifests([path], storage_options=cfg.data.storage_options or None)
                 for name, path in cfg.eval.manifests.items()}
    init_ray(cfg.ray)
    report = {
        "checkpoint": checkpoint_dir,
        "model": trained_cfg.to_dict()["model"],
        "well_normalization": cfg.eval.well_normalization,
        "test_fraction": cfg.eval.test_fraction,
        "split_seeds": split_seeds(cfg),
        "image_size": cfg.eval.image_size or "native",
        "results": {},
    }
    for name, manifest in manifests.items():
        manifest_path = cfg.eval.manifests[name]
        print(f"[cellfm] embedding {len(manifest)} fields of '{name}' ({manifest_path})", flush=True)
        fields = embed_manifest(manifest, cfg.data, encoders, batch_size=cfg.eval.batch_size,
                                actors=cfg.eval.embed_actors, image_size=cfg.eval.image_size)
        scores: dict = {}
        n_wells = 0
        for spec in encoders:
            n_wells, scores[spec.name] = well_scores(fields, f"embedding_{spec.name}", cfg)
        report["results"][name] = {
            "manifest": str(manifest_path),
            "channels": list(manifest["channel_names"].iloc[0]),
            "n_fields": int(len(fields)),
            "n_wells": int(n_wells),
            "scores": scores,
        }
    return report, write_report(report, cfg.eval.output_dir)


def summary_lines(report: dict) -> list[str]:
    """One line per held-out set and label: trained vs random-init vs intensity statistics top-1."""
    lines = []
    for name, block in report["results"].items():
        for label in block["scores"]["trained"]:
            t = block["scores"]["trained"][label]
            r = block["scores"]["random_init"][label]
            i = block["scores"]["intensity_stats"][label]
            lines.append(f"{name:>8} ({','.join(block['channels'])}) {label:>16}: trained top-1 {t['top1']:.3f}±{t['top1_sd']:.3f} "
                         f"(w-prec {t['weighted_precision']:.3f})  vs random-init {r['top1']:.3f}±{r['top1_sd']:.3f} "
                         f"(w-prec {r['weighted_precision']:.3f}), intensity stats {i['top1']:.3f}, chance {1 / t['n_classes']:.3f}")
    return lines
