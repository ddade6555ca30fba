"""Whole fields vs single-cell crops (data.crop_mode=cells) at one budget on the synthetic screen, scored with
the model-quality instrument (benchmarks/model_quality.py).

    python benchmarks/cell_crops.py                      # cellrep, seeds 0 1, cp5, 2 held-out plates: 4 trainings
    python benchmarks/cell_crops.py --seeds 0            # one seed
    python benchmarks/cell_crops.py --configs cp5 novel4 --heldout-plates 3

Both arms train the same model with configs/model_quality.yaml and its objective (`model_config`), single-process
on samples held in memory (`cellfm.train.in_memory`), for the same optimizer steps of the same batch, schedules
included: fields train optim.epochs epochs of (training fields // batch) steps; cells train the same number of
epochs and steps, each epoch a new seeded draw of that many crops from all of them. The crops are
`--cell-crop-size` px around every cell centre of the generator's ground truth that lies in its field (`cellfm
cells`; `cellfm.data.truth.cell_locations`), cut from the normalized fields as the pipeline cuts them
(`cellfm.data.cells.crop_cells`: zero outside the field).

Evaluation, the same for both (`score_features`): fields are embedded whole at eval.image_size, cells each at
`--cell-image-size`; the rows (fields, or cells) are averaged per well and scored by the per-plate and the
leave-one-plate-out probes of MoA. Per-channel intensity statistics of fields and of cells are scored beside them.
Cells are mean ± standard error over seeds (`over_seeds`); the claim compares the LOPO cells with `compare_scores`
(a direction only beyond two standard errors).

Writes benchmarks/results/cell_crops.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.model_quality import (  # noqa: E402
    CONFIG, EVALUATIONS, MODELS, N_HELDOUT_PLATES, PROTOCOLS, TRAIN_CONFIG, Screens, layout, model_config,
    over_seeds, score_features, training)
from cellfm.config import load_config  # noqa: E402
from cellfm.data.cells import CELL_X, CELL_Y, CELLS_X, CELLS_Y, attach_cell_locations, cells_per_field, standard_locations  # noqa: E402
from cellfm.data.synthetic.catalog import DIFFICULTIES  # noqa: E402
from cellfm.data.truth import cell_locations  # noqa: E402
from cellfm.evaluate.metrics import compare_scores  # noqa: E402
from cellfm.features.embed import IntensityStatistics, embed_fields  # noqa: E402
from cellfm.storage import write_file  # noqa: E402
from cellfm.train.in_memory import cell_crops, train_in_memory  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
ARMS = ("field", "cells")
TRAIN = training(TRAIN_CONFIG)  # the Screens key of cp5's training plates


def log(message: str) -> None:
    print(f"[cell_crops {time.strftime('%H:%M:%S')}] {message}", flush=True)


class CellScreens(Screens):
    """The model-quality screens of `configs` only (cp5 always: its training plates), and per configuration the
    crops around every ground-truth cell centre inside its field with one metadata row per crop."""

    def __init__(self, root: Path, cfg, seed: int, n_heldout_plates: int, configs: list[str], crop_size: int,
                 difficulty: str):
        super().__init__(root, cfg, seed, n_heldout_plates, difficulty, configs)
        self.names = [TRAIN, *configs]
        self.crops, self.cell_meta = {}, {}
        for name in self.names:
            manifest = self.manifests[name]
            located = attach_cell_locations(manifest, standard_locations(cell_locations(manifest), "ground truth"))
            self.crops[name] = cell_crops(self.fields(name), located, crop_size)
            counts = cells_per_field(located)
            self.cell_meta[name] = (located.drop(columns=[CELLS_Y, CELLS_X]).loc[located.index.repeat(counts)]
                                    .assign(**{CELL_Y: np.concatenate(located[CELLS_Y].to_list()),
                                               CELL_X: np.concatenate(located[CELLS_X].to_list())})
                                    .reset_index(drop=True))


def score_arm(backbone, screens: CellScreens, configs: list[str], arm: str, cfg, image_size: int) -> dict:
    """`score_features` of one arm's rows (fields or cells) per configuration, averaged per well by the instrument."""
    out = {}
    for name in configs:
        images, meta = (screens.fields(name), screens.manifests[name]) if arm == "field" else \
            (screens.crops[name], screens.cell_meta[name])
        embedding = embed_fields(backbone, images, screens.channels(name), image_size)
        out[name] = score_features(meta, embedding, cfg, source=f"{name} ({arm})")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(MODELS), default="cellrep")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=None, help="override optim.epochs (default: the config's)")
    parser.add_argument("--configs", nargs="+", choices=[e.config for e in EVALUATIONS], default=[TRAIN_CONFIG],
                        help="evaluated configurations (default: cp5's held-out wells)")
    parser.add_argument("--heldout-plates", type=int, default=2, help=f"held-out plates per configuration (>= 2; "
                        f"model_quality uses {N_HELDOUT_PLATES})")
    parser.add_argument("--cell-crop-size", type=int, default=48, help="data.cell_crop_size of the cells arm (px)")
    parser.add_argument("--cell-image-size", type=int, default=32, help="edge cells are embedded at (px)")
    parser.add_argument("--difficulty", choices=sorted(DIFFICULTIES), default="subtle",
                        help="the synthetic screen (default subtle: the committed result's)")
    parser.add_argument("--screen-seed", type=int, default=0)
    parser.add_argument("--screen-dir", default=None, help="where the plates go (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(RESULTS / "cell_crops.json"))
    args = parser.parse_args(argv)
    if args.heldout_plates < 2:
        parser.error("--heldout-plates: the probes across plates need two or more plates")
    torch.set_num_threads(args.threads)
    extra = [] if args.epochs is None else [f"optim.epochs={args.epochs}"]
    base = load_config(CONFIG, extra)
    configs = list(dict.fromkeys([TRAIN_CONFIG, *args.configs]))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cellfm-cell-crops-") as tmp:
        root = Path(args.screen_dir or tmp).resolve()
        screens = CellScreens(root, base, args.screen_seed, args.heldout_plates, configs, args.cell_crop_size,
                              args.difficulty)
        batch = base.optim.batch_size_per_worker
        steps_per_epoch = len(screens.fields(TRAIN)) // batch
        log(f"plates ready in {time.perf_counter() - started:.0f} s: " + ", ".join(
            f"{k} {len(screens.fields(k))} fields / {len(screens.crops[k])} cells" for k in screens.names))
        results = {
            "benchmark": "cellfm field vs single-cell crops on one budget", "format": 1,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, python {sys.version.split()[0]}, torch {torch.__version__}",
            "threads": args.threads, "config": str(CONFIG.relative_to(REPO)), "model": args.model,
            "objective": MODELS[args.model], "seeds": args.seeds, "screen_seed": args.screen_seed,
            "n_heldout_plates": args.heldout_plates, "configs": configs, "protocols": PROTOCOLS,
            "difficulty": args.difficulty,
            "cell_crop_size": args.cell_crop_size, "cell_image_size": args.cell_image_size,
            "field_image_size": base.eval.image_size,
            "samples": {k: {"fields": len(screens.fields(k)), "cells": len(screens.crops[k])} for k in screens.names},
            "budget": (f"{base.optim.epochs * steps_per_epoch} optimizer steps of batch {batch} for both arms "
                       f"({base.optim.epochs} epochs of {steps_per_epoch} steps; fields: all "
                       f"{len(screens.fields(TRAIN))} cp5 training fields of {layout().field_size} px per epoch; "
                       f"cells: a seeded draw of {steps_per_epoch * batch} of the {len(screens.crops[TRAIN])} "
                       f"{args.cell_crop_size}-px crops per epoch), 2 global {base.ssl.global_crop_size}-px + "
                       f"{base.ssl.n_local_crops} local {base.ssl.local_crop_size}-px crops, ViT "
                       f"{base.model.size}/{base.model.patch_size}"),
            "intensity_stats": {"field": score_arm(IntensityStatistics(), screens, configs, "field", base, 0),
                                "cells": score_arm(IntensityStatistics(), screens, configs, "cells", base, 0)},
            "runs": [],
        }
        output = Path(args.output)
        for seed in args.seeds:
            cfg = model_config(args.model, seed, screens, extra)
            cells_cfg = dataclasses.replace(cfg, data=dataclasses.replace(
                cfg.data, crop_mode="cells", cell_locations="ground truth", cell_crop_size=args.cell_crop_size))
            for arm in ARMS:
                run_started = time.perf_counter()
                losses: list[float] = []
                samples = screens.fields(TRAIN) if arm == "field" else screens.crops[TRAIN]
                meta_arch = train_in_memory(cfg if arm == "field" else cells_cfg, samples, screens.channels(TRAIN),
                                            steps_per_epoch=steps_per_epoch,
                                            on_step=lambda epoch, step, l, losses=losses: losses.append(l.total.item()))
                train_s = time.perf_counter() - run_started
                image_size = base.eval.image_size if arm == "field" else args.cell_image_size
                scores = score_arm(meta_arch.teacher.backbone.eval(), screens, configs, arm, cfg, image_size)
                run = {"arm": arm, "seed": seed, "steps": len(losses), "train_seconds": round(train_s, 1),
                       "first_loss": round(losses[0], 4), "final_loss": round(losses[-1], 4), "scores": scores,
                       "seconds": round(time.perf_counter() - run_started, 1)}
                results["runs"].append(run)
                log(f"{arm} seed {seed}: {run['steps']} steps in {train_s:.0f} s, loss {run['first_loss']:.3f} -> "
                    f"{run['final_loss']:.3f}; LOPO top-1 " + ", ".join(f"{k} {v['lopo']['top1']:.3f}" for k, v in scores.items()))
                results["summary"] = summarize(results["runs"], configs)
                results["runtime_s"] = round(time.perf_counter() - started, 1)
                write(results, output)
    log(f"wrote {output} in {(time.perf_counter() - started) / 60:.1f} min")
    for line in results["summary"]["claims"]:
        log(line)
    return results


def summarize(runs: list[dict], configs: list[str]) -> dict:
    """Per arm, configuration and protocol the mean ± standard error over seeds, and the LOPO comparison."""
    table = {arm: {c: {p: over_seeds([r["scores"][c][p] for r in runs if r["arm"] == arm]) for p in PROTOCOLS}
                   for c in configs} for arm in ARMS if any(r["arm"] == arm for r in runs)}
    claims = []
    if len(table) == 2:
        for c in configs:
            a, b = table["cells"][c]["lopo"], table["field"][c]["lopo"]
            cmp = compare_scores(a["mean"], a["se"], b["mean"], b["se"])
            claims.append(f"{c} (LOPO top-1): cells {a['mean']:.3f} ± {a['se']:.3f} vs fields {b['mean']:.3f} ± "
                          f"{b['se']:.3f}, difference {cmp['difference']:+.3f} (standard error {cmp['standard_error']:.3f}): "
                          f"cells {cmp['direction']}")
    return {"table": table, "claims": claims}


def write(results: dict, output: Path) -> None:
    write_file(output, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
