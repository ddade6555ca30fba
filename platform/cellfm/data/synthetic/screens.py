"""Writing synthetic screens: plates of rendered fields, their ground truth (`cellfm.data.truth`) and
manifests.

The plain screen (`generate_screen`) and the family (`generate_family_screen`) go through one plate
writer. What differs is the renderer (`render_field` or `render_family_field`), the stains a plate's
nuisances are drawn for, and the plates' random streams; every draw is made in the same order for
both, so the screens are those the two separate writers used to write, byte for byte. On top of the
field's own nuisances (`BatchEffect`) come sizeable log-normal per-plate, per-well and per-field
channel gains, defocused fields and plate/well variation in density.

Run ``cellfm synth OUT_DIR --layout demo --seed 0`` to write a screen.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from cellfm.storage import join
from cellfm.data.manifest import MANIFEST_COLUMNS, OPTIONAL_COLUMNS, read_manifest, write_manifest
from cellfm.data.plate_writer import create_plate, write_field
from cellfm.data.synthetic.catalog import (CELL_LINE, CONTROL, CONTROL_PHENOTYPE, CP5_CHANNELS, FAMILY_CONFIGS,
                                           HELDOUT_COMPOUNDS, HELDOUT_PROTEINS, PIXEL_SIZE_UM, PROTEINS, SOURCE,
                                           STAINS, UNSEEN4_CHANNELS, Perturbation, Phenotype, Protein,
                                           ScreenLayout, screen_difficulty, screen_layout)
from cellfm.data.synthetic.optics import BatchEffect, render_family_field, render_field
from cellfm.data.truth import field_truth, write_plate_truth

log = logging.getLogger(__name__)

# The family's plates draw from streams [seed, 1000 + plate index], apart from the plain screen's.
_FAMILY_STREAMS = 1000


@dataclass(frozen=True)
class _PlateConditions:
    """Nuisances shared by all fields of a plate (an imaging batch)."""

    gain: dict[str, float]
    offset: dict[str, float]
    vignetting: float
    vignetting_center: tuple[float, float]
    photons_per_count: float
    read_noise: float
    blur: float            # px, plate-wide focus offset
    density_factor: float  # seeding density of the plate


def _lognormal_per_stain(rng: np.random.Generator, stains: Sequence[str], sigma: float) -> dict[str, float]:
    return {s: float(v) for s, v in zip(stains, rng.lognormal(0.0, sigma, len(stains)))}


def _plate_conditions(rng: np.random.Generator, stains: Sequence[str]) -> _PlateConditions:
    return _PlateConditions(
        gain=_lognormal_per_stain(rng, stains, 0.3),
        offset={s: float(v) for s, v in zip(stains, rng.uniform(80, 400, len(stains)))},
        vignetting=float(rng.uniform(0.15, 0.45)),
        vignetting_center=(float(rng.uniform(0.4, 0.6)), float(rng.uniform(0.4, 0.6))),
        photons_per_count=float(rng.uniform(0.5, 2.0)),
        read_noise=float(rng.uniform(4.0, 12.0)),
        blur=float(rng.uniform(0.0, 0.8)),
        density_factor=float(rng.lognormal(0.0, 0.1)),
    )


def _field_effect(rng: np.random.Generator, plate: _PlateConditions, well_gain: dict[str, float],
                  stains: Sequence[str]) -> BatchEffect:
    field_gain = _lognormal_per_stain(rng, stains, 0.05)
    out_of_focus = float(rng.uniform(1.5, 3.0)) if rng.random() < 0.15 else 0.0  # autofocus misses
    defocus = float(np.hypot(plate.blur, out_of_focus))
    return BatchEffect(
        gain={s: plate.gain[s] * well_gain[s] * field_gain[s] for s in stains},
        offset=plate.offset, vignetting=plate.vignetting, vignetting_center=plate.vignetting_center,
        defocus_sigma=defocus, photons_per_count=plate.photons_per_count, read_noise=plate.read_noise,
    )


def _plate_format(n_wells: int) -> tuple[list[str], list[str]]:
    """Row and column names of the smallest standard plate (96 or 384 wells) holding ``n_wells``."""
    n_rows, n_cols = (8, 12) if n_wells <= 96 else (16, 24)
    if n_wells > n_rows * n_cols:
        raise ValueError(f"{n_wells} wells do not fit a 384-well plate; use fewer replicates or controls")
    return [chr(ord("A") + i) for i in range(n_rows)], [f"{j + 1:02d}" for j in range(n_cols)]


@dataclass(frozen=True)
class _Plate:
    """One plate of a screen to write, and how its fields are drawn."""

    split: str                  # the manifest it goes to: train | heldout | unseen
    name: str
    batch: str                  # its imaging batch (each plate is its own)
    channels: tuple[str, ...]
    groups: tuple[str, ...]     # per channel: C3R group
    source: str
    label: str                  # "moa": DMSO and the compounds; "localization": the proteins
    stream: int                 # its random stream: [seed, stream] (a well's: [seed, stream, well])
    family: bool                # rendered by render_family_field (else render_field)


def _treatments(label: str, layout: ScreenLayout, difficulty: str) -> list[Perturbation | Protein]:
    if label == "localization":
        return [p for p in PROTEINS for _ in range(layout.replicates_per_plate)]
    return [CONTROL] * layout.controls_per_plate + [
        p for p in screen_difficulty(difficulty).perturbations if not p.is_control for _ in range(layout.replicates_per_plate)]


def _treatment_columns(treatment: Perturbation | Protein) -> dict:
    """A well's manifest columns naming its treatment; a protein's localization is its label, in ``moa``
    too so MoA tooling works unchanged."""
    if isinstance(treatment, Protein):
        return {"perturbation_id": treatment.protein_id, "moa": treatment.localization, "is_control": False,
                "dose": 0.0, "localization": treatment.localization,
                "compound_split": "heldout" if treatment.protein_id in HELDOUT_PROTEINS else "train"}
    return {"perturbation_id": treatment.perturbation_id, "moa": treatment.moa, "is_control": treatment.is_control,
            "dose": treatment.dose, "localization": "",
            "compound_split": "heldout" if treatment.perturbation_id in HELDOUT_COMPOUNDS else "train"}


def _truth(context: dict, plate: str, row: str, col: str, f: int, phenotype: Phenotype,
           labels: dict, protein: Protein | None) -> pd.DataFrame:
    """The field's cell table; its label images go into ``labels`` under (row, col, field)."""
    table, labels[row, col, f] = field_truth(context, plate, f"{row}{col}", f,
                                             (phenotype.nucleoli_size, CONTROL_PHENOTYPE.nucleoli_size), protein)
    return table


def _write_plate(uri: str, plate: _Plate, layout: ScreenLayout, seed: int, difficulty: str,
                 storage_options: dict | None) -> list[dict]:
    """Render and write one plate and its ground truth; return its manifest rows. Well positions are
    randomized."""
    rng = np.random.default_rng([seed, plate.stream])
    names = list(plate.channels)
    # render_field images every stain of STAINS, then keeps the channels asked for: its nuisances are
    # drawn for all of them.
    stains = names if plate.family else list(STAINS)
    treatments = _treatments(plate.label, layout, difficulty)
    rows, cols = _plate_format(len(treatments))
    positions = rng.choice(len(rows) * len(cols), size=len(treatments), replace=False)
    wells = [(rows[p // len(cols)], cols[p % len(cols)]) for p in positions]
    size = layout.field_size
    create_plate(uri, plate.name, wells, layout.fields_per_well, names, (size, size), dtype="uint16",
                 pixel_size_um=PIXEL_SIZE_UM, storage_options=storage_options)
    conditions = _plate_conditions(rng, stains)
    imaged_histograms = screen_difficulty(difficulty).imaged_histograms
    records, tables, labels = [], [], {}
    for well_index, ((row, col), treatment) in enumerate(zip(wells, treatments)):
        well_rng = np.random.default_rng([seed, plate.stream, well_index])
        well_gain = _lognormal_per_stain(well_rng, stains, 0.2)
        protein = treatment if isinstance(treatment, Protein) else None
        phenotype = CONTROL_PHENOTYPE if protein else treatment.phenotype
        density = phenotype.density * conditions.density_factor * float(well_rng.lognormal(0.0, 0.1))
        phenotype = dataclasses.replace(phenotype, density=density)
        for f in range(layout.fields_per_well):
            effect = _field_effect(well_rng, conditions, well_gain, stains)
            context: dict = {}
            if plate.family:
                image = render_family_field(well_rng, names, phenotype, size, effect, protein, context,
                                            imaged_histograms)
            else:
                image = render_field(well_rng, names, phenotype, size, effect, context, imaged_histograms)
            write_field(uri, row, col, f, image, storage_options)
            tables.append(_truth(context, plate.name, row, col, f, phenotype, labels, protein))
            records.append({
                "source": plate.source, "plate": plate.name, "well": f"{row}{col}", "row": row, "col": col,
                "field": f, "store_uri": uri, "channel_names": names, "channel_groups": list(plate.groups),
                "height": size, "width": size, "dtype": "uint16", "cell_line": CELL_LINE, "batch": plate.batch,
                **_treatment_columns(treatment),
            })
    write_plate_truth(uri, tables, labels, storage_options)
    return sorted(records, key=lambda r: (r["row"], r["col"], r["field"]))


def _write_screen(out: str, plates: list[_Plate], manifests: dict[str, str], columns: list[str],
                  layout: ScreenLayout, seed: int, difficulty: str, storage_options: dict | None) -> None:
    """Write ``plates`` under ``out/plates/`` in order, then each split's manifest (``columns``) last."""
    records: dict[str, list[dict]] = {split: [] for split in manifests}
    for index, plate in enumerate(plates):
        started = time.perf_counter()
        records[plate.split] += _write_plate(join(out, "plates", f"{plate.name}.zarr"), plate, layout, seed,
                                             difficulty, storage_options)
        log.info("plate %d/%d %s (%d channels) written in %.1f s", index + 1, len(plates), plate.name,
                 len(plate.channels), time.perf_counter() - started)
    for split, path in manifests.items():
        write_manifest(pd.DataFrame(records[split], columns=columns), path if "://" in path else Path(path),
                       storage_options)


def generate_screen(out_dir: str | Path, layout: str | ScreenLayout = "demo", seed: int = 0,
                    difficulty: str = "subtle") -> dict[str, Path]:
    """Write a synthetic screen: plates under ``out_dir/plates/<plate>.zarr``, their ground truth
    under ``out_dir/truth/`` (`cellfm.data.truth`) and three manifests.

    Returns ``{"train", "heldout", "unseen"}`` -> manifest path. Train and held-out plates carry
    the five Cell Painting stains (``CP5_CHANNELS``); unseen plates carry ``UNSEEN4_CHANNELS``.
    Every plate holds every compound (``replicates_per_plate`` wells each) and the DMSO controls at
    seeded random positions. Deterministic given ``seed``. Manifests are written last (atomically):
    if all three exist the screen is considered complete and returned as is, whatever
    ``layout``/``seed`` are asked for; a run that died half-way is regenerated from scratch.
    ``difficulty``: ``subtle`` (the original screen) or ``clear`` (`DIFFICULTIES`: its treatments, how
    its stains' histograms are fixed, its revision).
    """
    screen_difficulty(difficulty)  # fails early on an unknown difficulty
    layout = screen_layout(layout)
    out = str(Path(out_dir).absolute())  # manifests must resolve from any working directory (Ray workers)
    manifests = {split: join(out, f"{split}.parquet") for split in ("train", "heldout", "unseen")}
    if all(Path(path).is_file() for path in manifests.values()):
        log.info("synthetic screen already complete in %s", out)
        return {split: Path(path) for split, path in manifests.items()}
    splits = [("train", layout.n_train_plates, CP5_CHANNELS), ("heldout", layout.n_heldout_plates, CP5_CHANNELS),
              ("unseen", layout.n_unseen_plates, UNSEEN4_CHANNELS)]
    names = [(split, f"SYN-{split.upper()}-{k + 1:02d}", channels) for split, count, channels in splits
             for k in range(count)]
    plates = [_Plate(split, name, f"SYN-BATCH-{index + 1:02d}", tuple(channels), ("context",) * len(channels),
                     SOURCE, "moa", stream=index, family=False)
              for index, (split, name, channels) in enumerate(names)]
    _write_screen(out, plates, manifests, list(MANIFEST_COLUMNS), layout, seed, difficulty, None)
    return {split: Path(path) for split, path in manifests.items()}


def generate_family_screen(out_dir: str | Path, config: str = "hpa4", layout: str | ScreenLayout = "tiny",
                           seed: int = 0, storage_options: dict | None = None,
                           difficulty: str = "subtle") -> dict[str, str | Path]:
    """Write one configuration of the synthetic family: ``train`` and ``heldout`` plates (replicate
    plates imaged as separate batches) with manifests ``train.parquet``/``heldout.parquet``.

    ``config``: ``cp5`` (the 5 Cell Painting stains), ``novel4`` (Golgi, Mito, DNA, Tubulin: two
    stains cp5 never shows, another order), ``hpa4`` (Microtubules, Protein, Nucleus, ER; groups
    context/concept/context/context; label = the protein's localization class in column
    ``localization``, copied to ``moa`` so MoA tooling works unchanged), ``brightfield1`` (one
    label-free channel). Every plate holds every compound (or protein); column ``compound_split``
    marks the held-out compounds (``HELDOUT_COMPOUNDS``, one per MoA) / proteins (``HELDOUT_PROTEINS``,
    one per class) for evaluation on treatments unseen by the probe. ``out_dir`` may be ``s3://``.
    Complete screens (both manifests present) are returned as is. ``difficulty``: as in
    `generate_screen` (the proteins of ``hpa4`` are the same at both; the clear screen fixes the Protein
    channel's histogram, `Difficulty.imaged_histograms`). Ground truth goes to
    ``out_dir/truth/`` (`cellfm.data.truth`).
    """
    if config not in FAMILY_CONFIGS:
        raise ValueError(f"unknown family config {config!r}; choose one of {sorted(FAMILY_CONFIGS)}")
    cfg = FAMILY_CONFIGS[config]
    screen_difficulty(difficulty)
    layout = screen_layout(layout)
    remote = "://" in str(out_dir)
    out = str(out_dir) if remote else str(Path(out_dir).absolute())
    manifests = {split: join(out, f"{split}.parquet") for split in ("train", "heldout")}
    returned = {split: (path if remote else Path(path)) for split, path in manifests.items()}
    try:
        for path in manifests.values():
            read_manifest(path, storage_options)
        return returned
    except Exception:  # noqa: BLE001 - incomplete: (re)generate
        pass
    tag = config.upper()
    names = [(split, f"SYN-{tag}-{split.upper()}-{k + 1:02d}") for split, count in
             (("train", layout.n_train_plates), ("heldout", layout.n_heldout_plates)) for k in range(count)]
    plates = [_Plate(split, name, f"SYN-{tag}-BATCH-{index + 1:02d}", cfg.channels, cfg.groups,
                     f"{SOURCE}-{cfg.name}", cfg.label, stream=_FAMILY_STREAMS + index, family=True)
              for index, (split, name) in enumerate(names)]
    columns = [*MANIFEST_COLUMNS, "localization", "compound_split"]
    assert set(columns) - set(MANIFEST_COLUMNS) <= set(OPTIONAL_COLUMNS)
    _write_screen(out, plates, manifests, columns, layout, seed, difficulty, storage_options)
    return returned
