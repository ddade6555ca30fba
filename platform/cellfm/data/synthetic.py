"""Synthetic Cell Painting-like screens: the demo, test and benchmark data of cellfm.

A field is rendered from one random cell geometry (cell and nucleus ellipses, Voronoi-split where
cells touch) so every stain is spatially consistent: DNA (textured nuclei with nucleolar holes),
ER (perinuclear reticular network + nuclear envelope), RNA (nucleoli + faint nucleoplasm and
cytoplasm), AGP (cortical actin/membranes + optional stress fibres) and Mito (tubular network or
fragmented puncta).

Perturbations change *morphology*, not brightness: every compartment's signal is renormalised per
cell to a phenotype-independent mean, and cells spread out when sparse, so per-channel mean
intensity stays roughly constant across MoAs (DNA/RNA still scale with the number of nuclei).
Rearranging a stain also changes its pixel histogram (fragmented mitochondria are brighter puncta
than tubes), which per-channel intensity percentiles would read as easily as morphology. So each
stain's in-focus pixel values inside its compartment (nuclei for DNA, cells otherwise) are
rank-mapped onto the distribution control cells have, keeping their order (the shapes) and their
mean: what is left for a model-free histogram is how much of the field the compartment covers.
Only a dose-dependent fraction of cells responds (penetrance), the rest look like controls. On
top come the nuisances a real screen has and an encoder must learn to ignore: sizeable
log-normal per-plate, per-well and per-field channel gains, background offsets, vignetting,
shot/read noise, defocused fields, plate/well variation in density, and cell-to-cell variability.

Run ``cellfm synth OUT_DIR --layout demo --seed 0`` to write a screen.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from typing import Sequence

import numpy as np
import pandas as pd
import scipy.fft
import scipy.ndimage

from cellfm.data.manifest import MANIFEST_COLUMNS, write_manifest
from cellfm.data.plate import create_plate, write_field
from cellfm.data.truth import field_truth, write_plate_truth

log = logging.getLogger(__name__)

CP5_CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]
UNSEEN4_CHANNELS = ["Mito", "AGP", "DNA", "RNA"]
STAINS = tuple(CP5_CHANNELS)  # every stain render_field can draw
SOURCE = "synthetic"
CELL_LINE = "U2OS-synthetic"
PIXEL_SIZE_UM = 0.65
REFERENCE_FIELD_SIZE = 128  # Phenotype.density counts cells per field of this many pixels squared

# Mean signal (counts before gain) per pixel of the compartment carrying each stain in a control cell.
_DNA_LEVEL = 2600.0       # nucleus; scaled by (control nucleus area / nucleus area): DNA content is fixed
_ER_LEVEL = 900.0         # whole cell
_MITO_LEVEL = 1100.0      # whole cell
_AGP_LEVEL = 800.0        # whole cell
_NUCLEOLI_LEVEL = 900.0   # nucleus, in nucleoli
_NUCLEOPLASM_RNA = 250.0  # nucleus, diffuse
_CYTO_RNA_LEVEL = 200.0   # whole cell, diffuse
_NUCLEUS_RADIUS = 8.5     # px, control nucleus mean radius
_PSF_SIGMA = 0.7          # px, in-focus optical blur


@dataclass(frozen=True)
class Phenotype:
    """Morphology of a cell population: what a perturbation (at its dose) changes.

    Defaults are the negative control. Intensities are deliberately not part of a phenotype.
    """

    density: float = 11.0              # mean cells per 128x128 field (cells spread out when sparse)
    cell_radius: float = 19.0          # px, mean cell radius at control density
    cell_elongation: float = 1.35      # major / minor axis ratio of cells
    nucleus_scale: float = 1.0         # nucleus radius relative to control
    nucleus_elongation: float = 1.15   # major / minor axis ratio of nuclei
    nucleus_irregularity: float = 0.04 # amplitude of lobes on the nuclear outline
    dna_content: float = 1.0           # DNA per cell relative to control (2 = arrested in G2/M)
    er_swelling: float = 0.0           # 0 fine reticular ER ... 1 coarse, swollen sheets
    mito_fragmentation: float = 0.1    # 0 tubular network ... 1 fragmented puncta
    stress_fibres: float = 0.05        # fraction of actin signal in oriented stress fibres
    nucleoli_count: float = 3.0        # mean nucleoli per nucleus
    nucleoli_size: float = 1.2         # px, Gaussian sigma of a nucleolus
    penetrance: float = 1.0            # fraction of cells showing this phenotype (others: control)


CONTROL_PHENOTYPE = Phenotype()


@dataclass(frozen=True)
class BatchEffect:
    """Imaging conditions of one field (plate x well x field nuisances, already combined).

    ``gain``/``offset`` are per stain name; stains not listed get gain 1 and offset 0.
    """

    gain: Mapping[str, float] = field(default_factory=dict)
    offset: Mapping[str, float] = field(default_factory=dict)
    vignetting: float = 0.0                            # relative intensity lost at the field corners
    vignetting_center: tuple[float, float] = (0.5, 0.5)  # (y, x) as fractions of the field size
    defocus_sigma: float = 0.0                         # px of extra Gaussian blur (0 = in focus)
    photons_per_count: float = 0.0                     # shot noise: variance = signal / this (0 = none)
    read_noise: float = 0.0                            # Gaussian camera noise, counts


@dataclass(frozen=True)
class Perturbation:
    """A screened treatment: identity and metadata for the manifest plus the phenotype it induces."""

    perturbation_id: str
    moa: str
    dose: float  # micromolar
    phenotype: Phenotype

    @property
    def is_control(self) -> bool:
        return self.moa == "control"


# Full-strength morphological signature of each mechanism of action (added to the control phenotype).
MOA_EFFECTS: dict[str, dict[str, float]] = {
    "cell_cycle_arrest": {"nucleus_scale": 0.45, "nucleus_irregularity": 0.07, "density": -3.5},
    "mitochondrial_uncoupler": {"mito_fragmentation": 0.85},
    "er_stress": {"er_swelling": 1.0},
    "actin_stabilizer": {"stress_fibres": 0.5, "cell_elongation": 0.35},
    "nucleolar_stress": {"nucleoli_count": -1.8, "nucleoli_size": 1.0},
}

# (id, MoA, dose uM, EC50 uM, small compound-specific secondary effect). Strength is the response
# dose / (dose + EC50); it scales the MoA effect and the fraction of responding cells. Compounds of
# one MoA thus differ in magnitude, penetrance and a side effect: identity is learnable but
# harder than MoA.
_COMPOUNDS: tuple[tuple[str, str, float, float, dict[str, float]], ...] = (
    ("CMP-01", "cell_cycle_arrest", 10.0, 1.0, {"nucleus_elongation": 0.15}),
    ("CMP-02", "cell_cycle_arrest", 3.0, 1.5, {"mito_fragmentation": 0.15}),
    ("CMP-03", "cell_cycle_arrest", 1.0, 0.5, {"er_swelling": 0.25}),
    ("CMP-04", "mitochondrial_uncoupler", 5.0, 0.5, {"density": -1.5}),
    ("CMP-05", "mitochondrial_uncoupler", 1.0, 0.6, {"nucleoli_size": 0.35}),
    ("CMP-06", "er_stress", 10.0, 1.0, {"cell_elongation": -0.15}),
    ("CMP-07", "er_stress", 3.0, 1.2, {"stress_fibres": 0.12}),
    ("CMP-08", "er_stress", 1.0, 0.4, {"nucleus_scale": 0.1}),
    ("CMP-09", "actin_stabilizer", 1.0, 0.1, {"nucleus_irregularity": 0.06}),
    ("CMP-10", "actin_stabilizer", 0.3, 0.15, {"mito_fragmentation": 0.2}),
    ("CMP-11", "nucleolar_stress", 2.0, 0.2, {"nucleus_scale": -0.08}),
    ("CMP-12", "nucleolar_stress", 0.5, 0.3, {"er_swelling": 0.25}),
)


def _compound(pid: str, moa: str, dose: float, ec50: float, secondary: dict[str, float]) -> Perturbation:
    strength = dose / (dose + ec50)
    values = dataclasses.asdict(CONTROL_PHENOTYPE) | {"penetrance": 0.4 + 0.5 * strength}
    for name, delta in MOA_EFFECTS[moa].items():
        values[name] += strength * delta
    for name, delta in secondary.items():
        values[name] += delta
    return Perturbation(pid, moa, dose, Phenotype(**values))


CONTROL = Perturbation("DMSO", "control", 0.0, CONTROL_PHENOTYPE)
PERTURBATIONS: tuple[Perturbation, ...] = (CONTROL, *(_compound(*spec) for spec in _COMPOUNDS))

# The calibrated ("clear") screen: the same compounds, MoAs and nuisances, but most cells respond
# and every MoA moves its morphology further, so each MoA is learnable from the stains that show
# it (docs/screens.md). Density is set so that nuclei cover the control's share of the field
# (fewer, bigger nuclei under cell-cycle arrest) and arrested cells hold G2 DNA (twice the
# control's), so their bigger nuclei are not dimmer: how much of a field a stain covers and how
# bright it is there are what intensity statistics read, so they learn little more than chance.
CLEAR_MOA_EFFECTS: dict[str, dict[str, float]] = {
    "cell_cycle_arrest": {"nucleus_scale": 0.45, "nucleus_irregularity": 0.1, "dna_content": 1.0},
    "mitochondrial_uncoupler": {"mito_fragmentation": 0.85},
    "er_stress": {"er_swelling": 1.2},
    "actin_stabilizer": {"stress_fibres": 0.8, "cell_elongation": 1.2},
    "nucleolar_stress": {"nucleoli_count": -2.0, "nucleoli_size": 2.4},
}
_CLEAR_MIN_STRENGTH = 0.7            # strength = min + (1 - min) * dose / (dose + EC50)
_CLEAR_PENETRANCE = (0.85, 0.15)     # penetrance = a + b * strength


def _clear_compound(pid: str, moa: str, dose: float, ec50: float, secondary: dict[str, float]) -> Perturbation:
    strength = _CLEAR_MIN_STRENGTH + (1.0 - _CLEAR_MIN_STRENGTH) * dose / (dose + ec50)
    values = dataclasses.asdict(CONTROL_PHENOTYPE) | {
        "penetrance": min(1.0, _CLEAR_PENETRANCE[0] + _CLEAR_PENETRANCE[1] * strength)}
    for name, delta in CLEAR_MOA_EFFECTS[moa].items():
        values[name] += strength * delta
    for name, delta in secondary.items():
        values[name] += delta
    p, scale = values["penetrance"], values["nucleus_scale"]
    values["density"] = CONTROL_PHENOTYPE.density / (p * scale ** 2 + 1.0 - p)  # mean nucleus area x density fixed
    return Perturbation(pid, moa, dose, Phenotype(**values))


# Screen difficulty -> its treatments. "subtle" is the original screen (its pixels are pinned).
DIFFICULTIES: dict[str, tuple[Perturbation, ...]] = {
    "subtle": PERTURBATIONS,
    "clear": (CONTROL, *(_clear_compound(*spec) for spec in _COMPOUNDS)),
}


def perturbations(difficulty: str) -> tuple[Perturbation, ...]:
    """The treatments (DMSO first) of a screen of this difficulty."""
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}; choose one of {sorted(DIFFICULTIES)}")
    return DIFFICULTIES[difficulty]


@dataclass(frozen=True)
class ScreenLayout:
    """Size of a synthetic screen."""

    n_train_plates: int
    n_heldout_plates: int
    n_unseen_plates: int
    replicates_per_plate: int  # wells per compound per plate
    controls_per_plate: int    # negative-control (DMSO) wells per plate
    fields_per_well: int
    field_size: int            # H = W, pixels


LAYOUTS = {
    "tiny": ScreenLayout(n_train_plates=1, n_heldout_plates=1, n_unseen_plates=1, replicates_per_plate=2,
                         controls_per_plate=2, fields_per_well=2, field_size=64),
    "demo": ScreenLayout(n_train_plates=3, n_heldout_plates=2, n_unseen_plates=2, replicates_per_plate=4,
                         controls_per_plate=8, fields_per_well=4, field_size=128),
}


# ----------------------------------------------------------------------------------------------
# Rendering


@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


# Random textures per field: (centre frequency in cycles/px, relative bandwidth).
_TEXTURE_BANDS = (
    (1 / 4, 0.5),    # chromatin
    (1 / 5, 0.35),   # fine ER network
    (1 / 9, 0.35),   # coarse (swollen) ER network
    (1 / 14, 0.5),   # ER sheets
    (1 / 9, 0.4),    # mitochondrial network
    (1 / 10, 0.5),   # where the mitochondrial network breaks
    (1 / 40, 0.6),   # slow modulation: ruffled cell edges, wavy stress fibres
)


@functools.lru_cache(maxsize=8)
def _band_filters(size: int) -> np.ndarray:
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    radial = np.sqrt(fy ** 2 + fx ** 2)
    filters = np.stack([np.exp(-0.5 * ((radial - f0) / (bw * f0)) ** 2) for f0, bw in _TEXTURE_BANDS])
    filters = filters.astype(np.float32)
    filters.flags.writeable = False
    return filters


def _textures(rng: np.random.Generator, size: int) -> np.ndarray:
    """Unit-variance random textures, one per ``_TEXTURE_BANDS`` entry, (bands, size, size).

    Zero-crossings of band-passed noise form connected curvy networks (ER, mitochondria); its
    peaks make blobs; low bands make smooth modulations. One batched FFT serves all bands.
    """
    white = rng.standard_normal((len(_TEXTURE_BANDS), size, size), dtype=np.float32)
    textures = scipy.fft.irfft2(scipy.fft.rfft2(white) * _band_filters(size), s=(size, size))
    textures /= textures.std(axis=(1, 2), keepdims=True) + np.float32(1e-12)
    return textures


@dataclass(frozen=True)
class _Cells:
    """Per-cell geometry and morphology (float32 arrays of length n, except counts)."""

    cy: np.ndarray
    cx: np.ndarray
    a: np.ndarray             # cell semi-axis along theta
    b: np.ndarray
    theta: np.ndarray
    ny: np.ndarray            # nucleus centre
    nx: np.ndarray
    na: np.ndarray
    nb: np.ndarray
    ntheta: np.ndarray
    lobes: np.ndarray         # number of lobes on the nuclear outline
    lobe_phase: np.ndarray
    irregularity: np.ndarray
    fibre_angle: np.ndarray
    swelling: np.ndarray      # ER swelling
    fragmentation: np.ndarray # mitochondrial fragmentation
    fibres: np.ndarray        # stress-fibre fraction of actin
    dna_content: np.ndarray   # DNA per cell relative to control
    nucleoli: np.ndarray      # nucleoli per nucleus (int)
    responder: np.ndarray     # bool: shows the perturbation's phenotype (else control morphology)
    brightness: np.ndarray    # (len(STAINS), n) cell-to-cell stain variability


def _sample_cells(rng: np.random.Generator, ph: Phenotype, size: int) -> _Cells:
    """Cells on a jittered hexagonal lattice (confluent-looking, little overlap) of random shape.

    A fraction ``ph.penetrance`` of cells responds; the others keep control morphology, as in
    real wells, so a phenotype is a shift in the cell population rather than in every cell.
    """
    n = max(1, int(rng.poisson(ph.density * (size / REFERENCE_FIELD_SIZE) ** 2)))
    spacing = size / np.sqrt(1.4 * n)
    rows = np.arange(spacing * 0.433, size, spacing * 0.866)
    cols = np.arange(spacing * 0.5, size, spacing)
    sites_y = np.repeat(rows, len(cols))
    sites_x = (cols[None, :] + (np.arange(len(rows)) % 2)[:, None] * spacing / 2).ravel() % size
    pick = rng.choice(len(sites_y), size=n, replace=n > len(sites_y))
    cy = sites_y[pick] + rng.uniform(-0.35, 0.35, n) * spacing
    cx = sites_x[pick] + rng.uniform(-0.35, 0.35, n) * spacing

    responder = rng.random(n) < ph.penetrance
    control = CONTROL_PHENOTYPE

    def trait(name: str) -> np.ndarray:
        return np.where(responder, getattr(ph, name), getattr(control, name))

    # Sparse cells spread: cell area scales as 1/density so the covered area stays similar.
    radius = ph.cell_radius * np.sqrt(control.density / max(ph.density, 0.5)) * rng.lognormal(0, 0.12, n)
    elongation = trait("cell_elongation") * rng.lognormal(0, 0.1, n)
    theta = rng.uniform(0, np.pi, n)
    n_radius = _NUCLEUS_RADIUS * trait("nucleus_scale") * rng.lognormal(0, 0.08, n)
    n_elongation = trait("nucleus_elongation") * rng.lognormal(0, 0.06, n)
    na, nb = n_radius * np.sqrt(n_elongation), n_radius / np.sqrt(n_elongation)
    a = np.maximum(radius * np.sqrt(elongation), na / 0.7)  # big nuclei make big cells
    b = np.maximum(radius / np.sqrt(elongation), nb / 0.7)
    shift = rng.uniform(-0.25, 0.25, n) * (a - na)
    f32 = functools.partial(np.asarray, dtype=np.float32)  # keep all pixel maths in float32
    return _Cells(
        cy=f32(cy), cx=f32(cx), a=f32(a), b=f32(b), theta=f32(theta),
        ny=f32(cy + shift * np.sin(theta)), nx=f32(cx + shift * np.cos(theta)), na=f32(na), nb=f32(nb),
        ntheta=f32(theta + rng.normal(0, 0.3, n)),
        lobes=f32(rng.integers(2, 5, n)), lobe_phase=f32(rng.uniform(0, 2 * np.pi, n)),
        irregularity=f32(trait("nucleus_irregularity") * rng.lognormal(0, 0.3, n)),
        fibre_angle=f32(theta + rng.normal(0, 0.15, n)),
        swelling=f32(np.clip(trait("er_swelling") * rng.lognormal(0, 0.2, n), 0, 1.5)),
        fragmentation=f32(np.clip(trait("mito_fragmentation") + rng.normal(0, 0.05, n), 0, 1)),
        fibres=f32(np.clip(trait("stress_fibres") * rng.lognormal(0, 0.2, n), 0, 0.9)),
        dna_content=f32(trait("dna_content")),
        nucleoli=np.maximum(1, rng.poisson(np.maximum(trait("nucleoli_count"), 0.0))),
        responder=responder,
        brightness=rng.lognormal(0, 0.15, (len(STAINS), n)),
    )


def _per_cell_mean(pattern: np.ndarray, owner: np.ndarray, region: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Rescale ``pattern`` so each cell's mean over its ``region`` pixels equals ``target[cell]``.

    This is what keeps intensity from giving phenotypes away: rearranging a stain (fragmenting
    mitochondria, forming fibres) moves signal around the cell without changing its amount.
    """
    cell_ids = owner[region]
    sums = np.bincount(cell_ids, weights=pattern[region], minlength=len(target))
    counts = np.bincount(cell_ids, minlength=len(target))
    means = sums / np.maximum(counts, 1)
    scale = np.divide(target, means, out=np.zeros_like(means), where=means > 1e-9).astype(np.float32)
    return np.where(region, pattern * scale[owner], np.float32(0.0))


def _nucleoli_points(rng: np.random.Generator, cells: _Cells, size: int, which: np.ndarray) -> np.ndarray:
    """Point sources at the nucleoli of the cells selected by ``which`` (inner 60% of the nucleus)."""
    idx = np.repeat(np.flatnonzero(which), cells.nucleoli[which])
    r = 0.6 * np.sqrt(rng.uniform(0, 1, len(idx)))
    phi = rng.uniform(0, 2 * np.pi, len(idx))
    u, v = r * np.cos(phi) * cells.na[idx], r * np.sin(phi) * cells.nb[idx]
    cos_t, sin_t = np.cos(cells.ntheta[idx]), np.sin(cells.ntheta[idx])
    y = np.rint(cells.ny[idx] + u * sin_t + v * cos_t).astype(int)
    x = np.rint(cells.nx[idx] + u * cos_t - v * sin_t).astype(int)
    inside = (y >= 0) & (y < size) & (x >= 0) & (x < size)
    points = np.zeros((size, size), np.float32)
    np.add.at(points, (y[inside], x[inside]), 1.0)
    return points


def _render_stains(rng: np.random.Generator, ph: Phenotype, size: int, context: dict | None = None) -> np.ndarray:
    """Noise-free signal of every stain in ``STAINS`` order, (len(STAINS), size, size) float32.

    ``context`` (a dict), if given, receives the field's geometry and compartment maps so further
    stains can be drawn from the same cells (the synthetic family); the random stream is unchanged.
    """
    cells = _sample_cells(rng, ph, size)
    chromatin, er_fine, er_coarse, er_sheets, mito_net, mito_gate, slow = _textures(rng, size)
    yy, xx = _pixel_grid(size)

    # Cell territories: elliptical distance to every cell; the nearest owns the pixel.
    dy = yy[None] - cells.cy[:, None, None]
    dx = xx[None] - cells.cx[:, None, None]
    cos_t, sin_t = np.cos(cells.theta)[:, None, None], np.sin(cells.theta)[:, None, None]
    dist = np.hypot((dx * cos_t + dy * sin_t) / cells.a[:, None, None],
                    (dy * cos_t - dx * sin_t) / cells.b[:, None, None])
    dist *= 1.0 + 0.07 * slow  # ruffled edges
    owner = np.argmin(dist, axis=0)[None]
    d1 = np.take_along_axis(dist, owner, axis=0)[0]
    np.put_along_axis(dist, owner, np.inf, axis=0)
    d2 = dist.min(axis=0)  # distance to the runner-up: small where two cells share a membrane
    owner = owner[0]
    cell = d1 < 1.0

    # Nucleus of the owning cell, with lobed outline.
    ox, oy = xx - cells.nx[owner], yy - cells.ny[owner]
    cos_n, sin_n = np.cos(cells.ntheta[owner]), np.sin(cells.ntheta[owner])
    un = (ox * cos_n + oy * sin_n) / cells.na[owner]
    vn = (oy * cos_n - ox * sin_n) / cells.nb[owner]
    lobes = 1.0 + cells.irregularity[owner] * np.cos(cells.lobes[owner] * np.arctan2(vn, un) + cells.lobe_phase[owner])
    dn = np.hypot(un, vn) / lobes
    nucleus = cell & (dn < 1.0)
    nucleus_soft = np.where(cell, np.clip((1.0 - dn) / 0.12, 0.0, 1.0), np.float32(0.0))
    cyto = cell & ~nucleus
    beyond_nucleus = np.maximum(dn - 1.0, 0.0)  # distance from the nuclear envelope, in nucleus radii
    brightness = dict(zip(STAINS, cells.brightness))

    # RNA: nucleoli (size differs between responding and other cells) + diffuse nucleoplasm/cytoplasm.
    nucleoli = sum(
        scipy.ndimage.gaussian_filter(_nucleoli_points(rng, cells, size, group), max(sigma, 0.5))
        for group, sigma in ((cells.responder, ph.nucleoli_size), (~cells.responder, CONTROL_PHENOTYPE.nucleoli_size))
    ) * nucleus_soft
    nucleoli_rel = nucleoli / (nucleoli.max() + np.float32(1e-12))
    rna = (_per_cell_mean(nucleoli, owner, nucleus, _NUCLEOLI_LEVEL * brightness["RNA"])
           + _NUCLEOPLASM_RNA * nucleus_soft
           + _per_cell_mean(np.exp(-beyond_nucleus / 1.5) * cyto, owner, cell, _CYTO_RNA_LEVEL * brightness["RNA"]))

    # DNA per cell is the phenotype's (control: 1), so bigger nuclei with the same DNA are dimmer;
    # nucleoli exclude chromatin.
    dna_pattern = nucleus_soft * np.clip(1.0 + 0.35 * chromatin, 0.2, None) * (1.0 - 0.6 * nucleoli_rel)
    dna_target = _DNA_LEVEL * _NUCLEUS_RADIUS ** 2 / (cells.na * cells.nb) * brightness["DNA"] * cells.dna_content
    dna = _per_cell_mean(dna_pattern, owner, nucleus, dna_target)

    # ER: reticular network (zero-crossings of band-passed noise) concentrated around the nucleus,
    # plus the nuclear envelope; swelling coarsens and thickens it into sheets.
    swell = cells.swelling[owner]
    mix = np.minimum(swell, 1.0)
    er_noise = ((1.0 - mix) * er_fine + mix * er_coarse) / np.sqrt((1.0 - mix) ** 2 + mix ** 2)
    network = np.exp(-(er_noise / (0.3 + 0.45 * swell)) ** 2)
    sheets = 1.2 * swell * np.clip(er_sheets, 0.0, None)
    envelope = np.exp(-((dn - 1.0) / 0.1) ** 2)
    perinuclear_er = np.exp(-beyond_nucleus / (0.9 + 0.5 * swell)) * cyto
    er_pattern = cell * (perinuclear_er * (0.2 + network + sheets) + 0.6 * envelope)
    er = _per_cell_mean(er_pattern, owner, cell, _ER_LEVEL * brightness["ER"])

    # Mitochondria: perinuclear tubular network, gated into ever shorter pieces as fragmentation
    # rises, plus single-pixel puncta that the optical blur turns into dots.
    frag = cells.fragmentation[owner]
    gate = 1.0 / (1.0 + np.exp(-(mito_gate - (-2.6 + 3.6 * frag)) / 0.2))
    tubes = np.exp(-(mito_net / 0.4) ** 2) * gate
    perinuclear = np.exp(-beyond_nucleus / 1.5) * cyto
    puncta = (rng.random((size, size), dtype=np.float32) < 0.1 * frag * perinuclear).astype(np.float32)
    mito = _per_cell_mean(perinuclear * ((1.0 - 0.6 * frag) * tubes + 2.0 * puncta), owner, cell,
                          _MITO_LEVEL * brightness["Mito"])

    # AGP: cortical actin at cell outlines and shared membranes; stress fibres are parallel
    # ridges along each cell's long axis. Fibres take signal from the cortex, not add to it.
    fibres = cells.fibres[owner]
    rim = np.exp(-((1.0 - d1) / 0.07) ** 2)
    membrane = np.exp(-((d2 - d1) / 0.06) ** 2)
    angle = cells.fibre_angle[owner]
    across = (yy - cells.cy[owner]) * np.cos(angle) - (xx - cells.cx[owner]) * np.sin(angle)
    ridges = np.maximum(np.cos(2 * np.pi * across / 4.5 + 1.5 * slow), 0.0) ** 4 * np.clip((0.92 - d1) / 0.1, 0.0, 1.0)
    agp_pattern = cell * (0.3 + (1.0 - fibres) * 1.5 * np.maximum(rim, membrane) + fibres * 2.5 * ridges)
    agp = _per_cell_mean(agp_pattern, owner, cell, _AGP_LEVEL * brightness["AGP"])

    by_stain = {"DNA": dna, "ER": er, "RNA": rna, "AGP": agp, "Mito": mito}
    if context is not None:
        context.update(cells=cells, owner=owner, cell=cell, nucleus=nucleus, nucleus_soft=nucleus_soft, cyto=cyto,
                       dn=dn, d1=d1, beyond_nucleus=beyond_nucleus, nucleoli=nucleoli, nucleoli_rel=nucleoli_rel,
                       chromatin=chromatin, slow=slow, rim=rim, membrane=membrane, er_pattern=er_pattern,
                       mito_pattern=perinuclear * ((1.0 - 0.6 * frag) * tubes + 2.0 * puncta), **by_stain)
    return np.stack([by_stain[s] for s in STAINS]).astype(np.float32, copy=False)


# Stain -> compartment (a mask of `_render_stains`'s context) whose in-focus pixel distribution is
# fixed to the control one. Brightfield is not a stain; Protein's distribution is its label's.
_HISTOGRAM_COMPARTMENTS = {"DNA": "nucleus", "ER": "cell", "RNA": "cell", "AGP": "cell", "Mito": "cell",
                           "Tubulin": "cell", "Golgi": "cell", "Lysosome": "cell"}
_TEMPLATE_FIELDS, _TEMPLATE_QUANTILES, _TEMPLATE_SEED = 16, 1024, 20261121


def _psf(signal: np.ndarray) -> np.ndarray:
    """In-focus optical blur of a (C, H, W) or (H, W) signal."""
    return scipy.ndimage.gaussian_filter(signal, sigma=(0,) * (signal.ndim - 2) + (_PSF_SIGMA, _PSF_SIGMA))


@functools.lru_cache(maxsize=1)
def _control_quantiles() -> dict[str, np.ndarray]:
    """Per stain, the quantile function (mean 1, `_TEMPLATE_QUANTILES` points) of in-focus pixel
    values inside its compartment, pooled over seeded control fields (each scaled to mean 1)."""
    rng = np.random.default_rng(_TEMPLATE_SEED)
    pooled: dict[str, list[np.ndarray]] = {s: [] for s in _HISTOGRAM_COMPARTMENTS}
    for _ in range(_TEMPLATE_FIELDS):
        ctx: dict = {}
        base = _render_stains(rng, CONTROL_PHENOTYPE, REFERENCE_FIELD_SIZE, context=ctx)
        signals = dict(zip(STAINS, base)) | _family_signals(rng, ctx, REFERENCE_FIELD_SIZE, None)
        for stain, compartment in _HISTOGRAM_COMPARTMENTS.items():
            values = _psf(signals[stain])[ctx[compartment]]
            if values.size and values.mean() > 0:
                pooled[stain].append(values / values.mean())
    grid = (np.arange(_TEMPLATE_QUANTILES) + 0.5) / _TEMPLATE_QUANTILES
    return {s: np.quantile(np.concatenate(v), grid).astype(np.float32) for s, v in pooled.items()}


def _in_focus_signal(signals: Mapping[str, np.ndarray], names: Sequence[str], context: dict) -> np.ndarray:
    """PSF-blurred (C, H, W) signal of the stains `names`, each stain's values inside its
    compartment rank-mapped onto the control distribution (same order, same mean)."""
    stack = _psf(np.stack([signals[n] for n in names]).astype(np.float32, copy=False))
    templates = _control_quantiles()
    for channel, name in zip(stack, names):
        compartment = _HISTOGRAM_COMPARTMENTS.get(name)
        if compartment is None:
            continue
        mask = context[compartment]
        values = channel[mask]
        if values.size == 0 or values.mean() <= 0:
            continue
        template = templates[name]
        # Rank r of n -> template quantile at (r + 0.5) / n.
        at = (np.arange(values.size) + 0.5) * (len(template) / values.size) - 0.5
        matched = np.empty_like(values)
        matched[np.argsort(values, kind="stable")] = np.interp(at, np.arange(len(template)), template)
        channel[mask] = matched * (values.mean() / matched.mean())
    return stack


def _image_formation(rng: np.random.Generator, signal: np.ndarray, effect: BatchEffect,
                     names: Sequence[str] = STAINS) -> np.ndarray:
    """Camera side of an in-focus `signal` (`_in_focus_signal`): defocus blur, gain, vignetting,
    background, noise -> uint16. `names` are the stains of `signal`'s channels (gain and offset are
    looked up by name)."""
    size = signal.shape[-1]
    image = signal
    if effect.defocus_sigma > 0:  # on top of the PSF: Gaussians compose as hypot(PSF, defocus)
        image = scipy.ndimage.gaussian_filter(signal, sigma=(0, effect.defocus_sigma, effect.defocus_sigma))
    yy, xx = _pixel_grid(size)
    cy, cx = effect.vignetting_center
    r2 = ((yy / size - cy) ** 2 + (xx / size - cx) ** 2) / 0.5
    illumination = np.clip(1.0 - effect.vignetting * r2, 0.2, None)
    gain = np.array([effect.gain.get(s, 1.0) for s in names], np.float32)[:, None, None]
    offset = np.array([effect.offset.get(s, 0.0) for s in names], np.float32)[:, None, None]
    image = image * gain * illumination + offset * (0.5 + 0.5 * illumination)
    variance = np.full_like(image, effect.read_noise ** 2)
    if effect.photons_per_count > 0:
        variance += image / effect.photons_per_count
    image += np.sqrt(variance) * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(np.rint(image), 0, np.iinfo(np.uint16).max).astype(np.uint16)


def render_field(rng: np.random.Generator, channel_names: list[str], phenotype: Phenotype, size: int,
                 batch_effect: BatchEffect, context: dict | None = None) -> np.ndarray:
    """One ``(C, size, size)`` uint16 field of cells with ``phenotype`` imaged under ``batch_effect``.

    Channels are returned in ``channel_names`` order (any subset of ``STAINS``). All stains are
    drawn from the same random stream whatever the subset, so a field's biology does not depend
    on which channels are requested. ``context`` (a dict), if given, receives the field's cells and
    compartment masks (`field_truth` turns them into the ground truth); the pixels do not change.
    """
    unknown = [c for c in channel_names if c not in STAINS]
    if unknown or not channel_names:
        raise ValueError(f"cannot render channel(s) {unknown or channel_names}; known stains: {list(STAINS)}")
    context = {} if context is None else context
    signal = _in_focus_signal(dict(zip(STAINS, _render_stains(rng, phenotype, size, context))), STAINS, context)
    image = _image_formation(rng, signal, batch_effect)
    return image[[STAINS.index(c) for c in channel_names]]


# ----------------------------------------------------------------------------------------------
# Screen generation


def _lognormal_per_stain(rng: np.random.Generator, sigma: float) -> dict[str, float]:
    return {s: float(v) for s, v in zip(STAINS, rng.lognormal(0.0, sigma, len(STAINS)))}


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


def _plate_conditions(rng: np.random.Generator) -> _PlateConditions:
    return _PlateConditions(
        gain=_lognormal_per_stain(rng, 0.3),
        offset={s: float(v) for s, v in zip(STAINS, rng.uniform(80, 400, len(STAINS)))},
        vignetting=float(rng.uniform(0.15, 0.45)),
        vignetting_center=(float(rng.uniform(0.4, 0.6)), float(rng.uniform(0.4, 0.6))),
        photons_per_count=float(rng.uniform(0.5, 2.0)),
        read_noise=float(rng.uniform(4.0, 12.0)),
        blur=float(rng.uniform(0.0, 0.8)),
        density_factor=float(rng.lognormal(0.0, 0.1)),
    )


def _field_effect(rng: np.random.Generator, plate: _PlateConditions, well_gain: dict[str, float]) -> BatchEffect:
    field_gain = _lognormal_per_stain(rng, 0.05)
    out_of_focus = float(rng.uniform(1.5, 3.0)) if rng.random() < 0.15 else 0.0  # autofocus misses
    defocus = float(np.hypot(plate.blur, out_of_focus))
    return BatchEffect(
        gain={s: plate.gain[s] * well_gain[s] * field_gain[s] for s in STAINS},
        offset=plate.offset, vignetting=plate.vignetting, vignetting_center=plate.vignetting_center,
        defocus_sigma=defocus, photons_per_count=plate.photons_per_count, read_noise=plate.read_noise,
    )


def _plate_format(n_wells: int) -> tuple[list[str], list[str]]:
    """Row and column names of the smallest standard plate (96 or 384 wells) holding ``n_wells``."""
    n_rows, n_cols = (8, 12) if n_wells <= 96 else (16, 24)
    if n_wells > n_rows * n_cols:
        raise ValueError(f"{n_wells} wells do not fit a 384-well plate; use fewer replicates or controls")
    return [chr(ord("A") + i) for i in range(n_rows)], [f"{j + 1:02d}" for j in range(n_cols)]


def _write_plate(plate_uri: Path, plate_name: str, batch: str, channels: list[str], layout: ScreenLayout,
                 seed: int, plate_index: int, difficulty: str = "subtle") -> list[dict]:
    """Render and write one plate and its ground truth (`cellfm.data.truth`); return its manifest
    rows. Well positions are randomized."""
    rng = np.random.default_rng([seed, plate_index])
    treatments = [CONTROL] * layout.controls_per_plate + [
        p for p in perturbations(difficulty) if not p.is_control for _ in range(layout.replicates_per_plate)
    ]
    rows, cols = _plate_format(len(treatments))
    positions = rng.choice(len(rows) * len(cols), size=len(treatments), replace=False)
    wells = [(rows[p // len(cols)], cols[p % len(cols)]) for p in positions]
    size = layout.field_size
    create_plate(str(plate_uri), plate_name, wells, layout.fields_per_well, channels, (size, size),
                 dtype="uint16", pixel_size_um=PIXEL_SIZE_UM)
    plate = _plate_conditions(rng)
    records, tables, labels = [], [], {}
    for well_index, ((row, col), treatment) in enumerate(zip(wells, treatments)):
        well_rng = np.random.default_rng([seed, plate_index, well_index])
        well_gain = _lognormal_per_stain(well_rng, 0.2)
        density = treatment.phenotype.density * plate.density_factor * float(well_rng.lognormal(0.0, 0.1))
        phenotype = dataclasses.replace(treatment.phenotype, density=density)
        for f in range(layout.fields_per_well):
            context: dict = {}
            image = render_field(well_rng, channels, phenotype, size, _field_effect(well_rng, plate, well_gain),
                                 context)
            write_field(str(plate_uri), row, col, f, image)
            tables.append(_truth(context, plate_name, row, col, f, phenotype, labels))
            records.append({
                "source": SOURCE, "plate": plate_name, "well": f"{row}{col}", "row": row, "col": col, "field": f,
                "store_uri": str(plate_uri), "channel_names": list(channels),
                "channel_groups": ["context"] * len(channels), "height": size, "width": size, "dtype": "uint16",
                "perturbation_id": treatment.perturbation_id, "moa": treatment.moa,
                "is_control": treatment.is_control, "dose": treatment.dose, "cell_line": CELL_LINE, "batch": batch,
            })
    write_plate_truth(str(plate_uri), tables, labels)
    return sorted(records, key=lambda r: (r["row"], r["col"], r["field"]))


def _truth(context: dict, plate: str, row: str, col: str, f: int, phenotype: Phenotype,
           labels: dict, protein: Protein | None = None) -> pd.DataFrame:
    """The field's cell table; its label images go into ``labels`` under (row, col, field)."""
    table, labels[row, col, f] = field_truth(context, plate, f"{row}{col}", f,
                                             (phenotype.nucleoli_size, CONTROL_PHENOTYPE.nucleoli_size), protein)
    return table


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
    ``difficulty``: ``subtle`` (the original screen) or ``clear`` (`DIFFICULTIES`).
    """
    perturbations(difficulty)  # fails early on an unknown difficulty
    if isinstance(layout, str):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)} or pass a ScreenLayout")
        layout = LAYOUTS[layout]
    out_dir = Path(out_dir).absolute()  # manifests must resolve from any working directory (Ray workers)
    manifests = {split: out_dir / f"{split}.parquet" for split in ("train", "heldout", "unseen")}
    if all(path.is_file() for path in manifests.values()):
        log.info("synthetic screen already complete in %s", out_dir)
        return manifests

    splits = [("train", "TRAIN", layout.n_train_plates, CP5_CHANNELS),
              ("heldout", "HELDOUT", layout.n_heldout_plates, CP5_CHANNELS),
              ("unseen", "UNSEEN", layout.n_unseen_plates, UNSEEN4_CHANNELS)]
    n_plates = sum(count for _, _, count, _ in splits)
    records: dict[str, list[dict]] = {split: [] for split, *_ in splits}
    plate_index = 0
    for split, tag, count, channels in splits:
        for k in range(count):
            name = f"SYN-{tag}-{k + 1:02d}"
            started = time.perf_counter()
            batch = f"SYN-BATCH-{plate_index + 1:02d}"  # each plate is imaged as its own batch
            records[split] += _write_plate(out_dir / "plates" / f"{name}.zarr", name, batch, channels, layout,
                                           seed, plate_index, difficulty)
            plate_index += 1
            log.info("plate %d/%d %s (%d channels) written in %.1f s", plate_index, n_plates, name,
                     len(channels), time.perf_counter() - started)
    for split, path in manifests.items():
        write_manifest(pd.DataFrame(records[split], columns=list(MANIFEST_COLUMNS)), path)
    return manifests


# ----------------------------------------------------------------------------------------------
# The synthetic screen family: cp5, novel4, hpa4, brightfield1 (new stains from the same cells)

# Stains beyond STAINS, rendered from the same cell geometry; aliases name the HPA channels.
FAMILY_STAINS = (*STAINS, "Tubulin", "Golgi", "Lysosome", "Brightfield", "Protein")
STAIN_ALIASES = {"Microtubules": "Tubulin", "Nucleus": "DNA"}
LOCALIZATIONS = ("nucleus", "nucleoli", "cytosol", "mitochondria", "er", "plasma_membrane", "golgi", "vesicles")
_TUBULIN_LEVEL, _GOLGI_LEVEL, _LYSO_LEVEL, _PROTEIN_LEVEL = 700.0, 150.0, 600.0, 250.0
_BRIGHTFIELD_LEVEL = 3000.0
# Compounds whose wells are held out of probe training for MoA evaluation (one per MoA).
HELDOUT_COMPOUNDS = ("CMP-03", "CMP-05", "CMP-08", "CMP-10", "CMP-12")


@dataclass(frozen=True)
class FamilyConfig:
    """A channel configuration of the synthetic family and what its label is."""

    name: str
    channels: tuple[str, ...]
    groups: tuple[str, ...]   # per channel: "context" or "concept" (C3R groups)
    label: str                # "moa" (compound screen) or "localization" (HPA-like protein screen)


FAMILY_CONFIGS: dict[str, FamilyConfig] = {
    "cp5": FamilyConfig("cp5", tuple(CP5_CHANNELS), ("context",) * 5, "moa"),
    # Two Cell Painting stains in another order plus two stains cp5 never shows.
    "novel4": FamilyConfig("novel4", ("Golgi", "Mito", "DNA", "Tubulin"), ("context",) * 4, "moa"),
    # HPA order: microtubules, protein of interest (concept), nucleus, ER.
    "hpa4": FamilyConfig("hpa4", ("Microtubules", "Protein", "Nucleus", "ER"),
                         ("context", "concept", "context", "context"), "localization"),
    "brightfield1": FamilyConfig("brightfield1", ("Brightfield",), ("context",), "moa"),
}


# Which stains show each per-cell morphology parameter of the ground truth (`cellfm.data.truth`),
# as the renderer draws them: the oracle of a configuration sees only what its stains show.
PARAMETER_STAINS: dict[str, tuple[str, ...]] = {
    "cell_radius": ("AGP", "Tubulin", "Brightfield"),
    "cell_elongation": ("AGP", "Tubulin", "Brightfield"),
    "nucleus_radius": ("DNA", "RNA", "ER", "Brightfield"),        # ER: the nuclear envelope
    "nucleus_elongation": ("DNA", "RNA", "ER", "Brightfield"),
    "nucleus_irregularity": ("DNA", "RNA", "ER", "Brightfield"),
    "dna_content": ("DNA",),
    "er_swelling": ("ER", "Golgi"),                                 # the Golgi ribbon disperses
    "mito_fragmentation": ("Mito", "Lysosome"),                     # lysosomes multiply
    "stress_fibres": ("AGP", "Tubulin"),                            # microtubules align with fibres
    "nucleoli_count": ("RNA", "DNA", "Brightfield"),                # DNA: nucleoli exclude chromatin
    "nucleoli_size": ("RNA", "DNA", "Brightfield"),
}
# The parameters each MoA moves (MOA_EFFECTS / CLEAR_MOA_EFFECTS; density shows in every stain).
MOA_PARAMETERS: dict[str, tuple[str, ...]] = {
    "cell_cycle_arrest": ("nucleus_radius", "nucleus_irregularity", "dna_content"),
    "mitochondrial_uncoupler": ("mito_fragmentation",),
    "er_stress": ("er_swelling",),
    "actin_stabilizer": ("stress_fibres", "cell_elongation"),
    "nucleolar_stress": ("nucleoli_count", "nucleoli_size"),
}


def visible_parameters(channels: Sequence[str]) -> list[str]:
    """The ground-truth morphology parameters that stains ``channels`` (names or aliases) show."""
    stains = {_canonical(c) for c in channels}
    return [p for p, shown_by in PARAMETER_STAINS.items() if stains & set(shown_by)]


def revealed_labels(channels: Sequence[str]) -> list[str]:
    """The labels a configuration's stains can reveal: the control and every MoA one of whose
    parameters a stain shows, or every localization class when ``Protein`` is among them."""
    if "Protein" in {_canonical(c) for c in channels}:
        return list(LOCALIZATIONS)
    visible = set(visible_parameters(channels))
    return ["control", *(moa for moa, params in MOA_PARAMETERS.items() if visible & set(params))]


@dataclass(frozen=True)
class Protein:
    """An HPA-like stained protein: its id, localization class (the label) and a minor secondary
    compartment that makes proteins of one class differ."""

    protein_id: str
    localization: str
    secondary: str
    secondary_fraction: float
    level: float


def _proteins() -> tuple[Protein, ...]:
    rng = np.random.default_rng(20240601)
    out = []
    for ci, loc in enumerate(LOCALIZATIONS):
        for k in range(3):
            others = [c for c in LOCALIZATIONS if c != loc]
            out.append(Protein(f"HPA-{loc.upper()[:4]}-{k + 1}", loc, others[int(rng.integers(len(others)))],
                               float(rng.uniform(0.05, 0.2)), float(rng.lognormal(0.0, 0.4))))
    return tuple(out)


PROTEINS = _proteins()
HELDOUT_PROTEINS = tuple(p.protein_id for p in PROTEINS if p.protein_id.endswith("-3"))


def _canonical(channel: str) -> str:
    return STAIN_ALIASES.get(channel, channel)


def _puncta(rng: np.random.Generator, ctx: dict, size: int, per_cell: np.ndarray) -> np.ndarray:
    """Point sources scattered in each cell's perinuclear cytoplasm, ``per_cell`` on average."""
    cells = ctx["cells"]
    counts = rng.poisson(np.maximum(per_cell, 0.0))
    idx = np.repeat(np.arange(len(counts)), counts)
    r = 1.0 + rng.gamma(2.0, 0.6, len(idx))                    # in nucleus radii from the centre
    phi = rng.uniform(0, 2 * np.pi, len(idx))
    y = np.rint(cells.ny[idx] + r * np.sin(phi) * cells.nb[idx]).astype(int)
    x = np.rint(cells.nx[idx] + r * np.cos(phi) * cells.na[idx]).astype(int)
    inside = (y >= 0) & (y < size) & (x >= 0) & (x < size)
    points = np.zeros((size, size), np.float32)
    np.add.at(points, (y[inside], x[inside]), 1.0)
    return scipy.ndimage.gaussian_filter(points, 0.9) * ctx["cyto"]


def _family_signals(rng: np.random.Generator, ctx: dict, size: int, protein: Protein | None) -> dict[str, np.ndarray]:
    """Tubulin, Golgi, Lysosome, Brightfield (and Protein) signals from the field's geometry.

    Morphology carries the phenotype as in the Cell Painting stains: microtubules follow cell
    elongation and align with stress fibres, the Golgi ribbon disperses under ER stress, lysosomes
    multiply with mitochondrial damage; brightfield shows cell/nucleus shape, density and texture.
    """
    cells, owner, cell, cyto = ctx["cells"], ctx["owner"], ctx["cell"], ctx["cyto"]
    yy, xx = _pixel_grid(size)
    brightness = rng.lognormal(0, 0.15, (4, len(cells.cy)))
    # Centrosome next to the nucleus, towards the cell's long axis; the Golgi wraps around it.
    side = np.where(rng.random(len(cells.cy)) < 0.5, 1.0, -1.0)
    cy = cells.ny + side * 1.1 * cells.na * np.sin(cells.theta)
    cx = cells.nx + side * 1.1 * cells.na * np.cos(cells.theta)
    oy, ox = yy - cy[owner], xx - cx[owner]
    dist = np.hypot(oy, ox)
    phi = np.arctan2(oy, ox)
    phase = rng.uniform(0, 2 * np.pi, len(cells.cy)).astype(np.float32)
    radial = np.maximum(np.cos(14 * phi + phase[owner] + 2.0 * ctx["slow"]), 0.0) ** 6
    angle = cells.fibre_angle[owner]
    along = np.maximum(np.cos(2 * np.pi * ((yy - cells.cy[owner]) * np.cos(angle) - (xx - cells.cx[owner]) * np.sin(angle)) / 3.5), 0.0) ** 6
    align = np.clip(cells.fibres[owner] * 1.6, 0.0, 1.0)
    tubulin_pattern = cell * (0.25 + (1 - align) * radial * np.exp(-dist / 25.0) + align * along
                              + 2.5 * np.exp(-(dist / 1.5) ** 2))
    tubulin = _per_cell_mean(tubulin_pattern, owner, cell, _TUBULIN_LEVEL * brightness[0])

    swell = cells.swelling[owner]
    spread = 2.0 + 5.0 * np.minimum(swell, 1.2)
    ribbon = np.exp(-(dist / spread) ** 2) * (0.6 + 0.4 * np.cos(3 * phi + phase[owner]))
    golgi_pattern = cyto * ribbon * np.clip(1.0 + 0.8 * ctx["chromatin"] * np.minimum(swell, 1.0), 0.1, None)
    golgi = _per_cell_mean(golgi_pattern, owner, cell, _GOLGI_LEVEL * brightness[1])

    lyso_pattern = _puncta(rng, ctx, size, 5.0 + 14.0 * cells.fragmentation) + 0.05 * cyto
    lysosome = _per_cell_mean(lyso_pattern, owner, cell, _LYSO_LEVEL * brightness[2])

    # Label-free: optical thickness (dome-shaped cell, thicker nucleus, denser nucleoli) and bright
    # halos at cell edges; organelles add faint texture. Not renormalized per cell: it is not a stain.
    dome = np.sqrt(np.clip(1.0 - ctx["d1"] ** 2, 0.0, 1.0)) * cell
    thickness = dome + 0.8 * ctx["nucleus_soft"] + 0.6 * ctx["nucleoli_rel"] + 0.05 * (ctx["er_pattern"] + ctx["mito_pattern"])
    brightfield = _BRIGHTFIELD_LEVEL * (1.0 - 0.22 * thickness + 0.12 * np.maximum(ctx["rim"], ctx["membrane"]) * cell)

    out = {"Tubulin": tubulin, "Golgi": golgi, "Lysosome": lysosome, "Brightfield": brightfield.astype(np.float32)}
    if protein is not None:
        compartments = {
            "nucleus": ctx["nucleus_soft"] * np.clip(1.0 + 0.3 * ctx["chromatin"], 0.2, None) * (1.0 - 0.7 * ctx["nucleoli_rel"]),
            "nucleoli": ctx["nucleoli"], "cytosol": cyto * np.exp(-ctx["beyond_nucleus"] / 4.0),
            "mitochondria": ctx["mito_pattern"], "er": ctx["er_pattern"],
            "plasma_membrane": np.maximum(ctx["rim"], ctx["membrane"]) * cell, "golgi": golgi_pattern,
            "vesicles": lyso_pattern,
        }
        def unit(name):  # scale each compartment to unit mean over cells so mixing fractions mean something
            pattern = compartments[name]
            return pattern / (pattern[cell].mean() + 1e-9) if cell.any() else pattern
        pattern = (1 - protein.secondary_fraction) * unit(protein.localization) + protein.secondary_fraction * unit(protein.secondary)
        expression = protein.level * rng.lognormal(0.0, 0.5, len(cells.cy))  # cell-to-cell expression varies
        ctx["protein_expression"] = expression
        out["Protein"] = _per_cell_mean(pattern.astype(np.float32), owner, cell, _PROTEIN_LEVEL * expression * brightness[3])
    return out


def render_family_field(rng: np.random.Generator, channel_names: list[str], phenotype: Phenotype, size: int,
                        batch_effect: BatchEffect, protein: Protein | None = None,
                        context: dict | None = None) -> np.ndarray:
    """A ``(C, size, size)`` uint16 field with any of ``FAMILY_STAINS`` (or their aliases
    ``Microtubules``/``Nucleus``) rendered from one cell geometry. ``Protein`` needs ``protein``.
    ``context``: as in `render_field`."""
    canonical = [_canonical(c) for c in channel_names]
    unknown = [c for c, k in zip(channel_names, canonical) if k not in FAMILY_STAINS]
    if unknown or not channel_names:
        raise ValueError(f"cannot render channel(s) {unknown or channel_names}; known stains: "
                         f"{list(FAMILY_STAINS)} and aliases {sorted(STAIN_ALIASES)}")
    if "Protein" in canonical and protein is None:
        raise ValueError("the Protein channel needs a protein (localization) to render")
    ctx = {} if context is None else context
    base = _render_stains(rng, phenotype, size, context=ctx)
    signals = dict(zip(STAINS, base)) | _family_signals(rng, ctx, size, protein)
    return _image_formation(rng, _in_focus_signal(signals, canonical, ctx), batch_effect, channel_names)


def _family_plate_conditions(rng: np.random.Generator, names: list[str]) -> _PlateConditions:
    return _PlateConditions(
        gain={s: float(v) for s, v in zip(names, rng.lognormal(0.0, 0.3, len(names)))},
        offset={s: float(v) for s, v in zip(names, rng.uniform(80, 400, len(names)))},
        vignetting=float(rng.uniform(0.15, 0.45)),
        vignetting_center=(float(rng.uniform(0.4, 0.6)), float(rng.uniform(0.4, 0.6))),
        photons_per_count=float(rng.uniform(0.5, 2.0)), read_noise=float(rng.uniform(4.0, 12.0)),
        blur=float(rng.uniform(0.0, 0.8)), density_factor=float(rng.lognormal(0.0, 0.1)),
    )


def _family_field_effect(rng: np.random.Generator, plate: _PlateConditions, well_gain: dict[str, float],
                         names: list[str]) -> BatchEffect:
    field_gain = rng.lognormal(0.0, 0.05, len(names))
    out_of_focus = float(rng.uniform(1.5, 3.0)) if rng.random() < 0.15 else 0.0
    return BatchEffect(
        gain={s: plate.gain[s] * well_gain[s] * float(g) for s, g in zip(names, field_gain)}, offset=plate.offset,
        vignetting=plate.vignetting, vignetting_center=plate.vignetting_center,
        defocus_sigma=float(np.hypot(plate.blur, out_of_focus)), photons_per_count=plate.photons_per_count,
        read_noise=plate.read_noise,
    )


def _join_uri(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts]) if "://" in base else str(Path(base, *parts))


def _write_family_plate(plate_uri: str, plate_name: str, batch: str, config: FamilyConfig, layout: ScreenLayout,
                        seed: int, plate_index: int, storage_options: dict | None,
                        difficulty: str = "subtle") -> list[dict]:
    rng = np.random.default_rng([seed, 1000 + plate_index])
    names = list(config.channels)
    if config.label == "localization":
        treatments: list = [p for p in PROTEINS for _ in range(layout.replicates_per_plate)]
    else:
        treatments = [CONTROL] * layout.controls_per_plate + [
            p for p in perturbations(difficulty) if not p.is_control for _ in range(layout.replicates_per_plate)]
    rows, cols = _plate_format(len(treatments))
    positions = rng.choice(len(rows) * len(cols), size=len(treatments), replace=False)
    wells = [(rows[p // len(cols)], cols[p % len(cols)]) for p in positions]
    size = layout.field_size
    create_plate(plate_uri, plate_name, wells, layout.fields_per_well, names, (size, size), dtype="uint16",
                 pixel_size_um=PIXEL_SIZE_UM, storage_options=storage_options)
    plate = _family_plate_conditions(rng, names)
    records, tables, labels = [], [], {}
    for well_index, ((row, col), treatment) in enumerate(zip(wells, treatments)):
        well_rng = np.random.default_rng([seed, 1000 + plate_index, well_index])
        well_gain = {s: float(v) for s, v in zip(names, well_rng.lognormal(0.0, 0.2, len(names)))}
        protein = treatment if isinstance(treatment, Protein) else None
        phenotype = CONTROL_PHENOTYPE if protein else treatment.phenotype
        density = phenotype.density * plate.density_factor * float(well_rng.lognormal(0.0, 0.1))
        phenotype = dataclasses.replace(phenotype, density=density)
        if protein:
            meta = {"perturbation_id": protein.protein_id, "moa": protein.localization, "is_control": False,
                    "dose": 0.0, "localization": protein.localization,
                    "compound_split": "heldout" if protein.protein_id in HELDOUT_PROTEINS else "train"}
        else:
            meta = {"perturbation_id": treatment.perturbation_id, "moa": treatment.moa,
                    "is_control": treatment.is_control, "dose": treatment.dose, "localization": "",
                    "compound_split": "heldout" if treatment.perturbation_id in HELDOUT_COMPOUNDS else "train"}
        for f in range(layout.fields_per_well):
            effect = _family_field_effect(well_rng, plate, well_gain, names)
            context: dict = {}
            image = render_family_field(well_rng, names, phenotype, size, effect, protein, context)
            write_field(plate_uri, row, col, f, image, storage_options)
            tables.append(_truth(context, plate_name, row, col, f, phenotype, labels, protein))
            records.append({
                "source": f"{SOURCE}-{config.name}", "plate": plate_name, "well": f"{row}{col}", "row": row, "col": col,
                "field": f, "store_uri": plate_uri, "channel_names": names, "channel_groups": list(config.groups),
                "height": size, "width": size, "dtype": "uint16", "cell_line": CELL_LINE, "batch": batch, **meta,
            })
    write_plate_truth(plate_uri, tables, labels, storage_options)
    return sorted(records, key=lambda r: (r["row"], r["col"], r["field"]))


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
    `generate_screen` (the proteins of ``hpa4`` are the same at both). Ground truth goes to
    ``out_dir/truth/`` (`cellfm.data.truth`).
    """
    from cellfm.data.manifest import OPTIONAL_COLUMNS, read_manifest

    if config not in FAMILY_CONFIGS:
        raise ValueError(f"unknown family config {config!r}; choose one of {sorted(FAMILY_CONFIGS)}")
    cfg = FAMILY_CONFIGS[config]
    perturbations(difficulty)
    if isinstance(layout, str):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)} or pass a ScreenLayout")
        layout = LAYOUTS[layout]
    remote = "://" in str(out_dir)
    out = str(out_dir) if remote else str(Path(out_dir).absolute())
    manifests = {split: _join_uri(out, f"{split}.parquet") for split in ("train", "heldout")}
    try:
        for path in manifests.values():
            read_manifest(path, storage_options)
        return {k: (v if remote else Path(v)) for k, v in manifests.items()}
    except Exception:  # noqa: BLE001 - incomplete: (re)generate
        pass
    records: dict[str, list[dict]] = {"train": [], "heldout": []}
    plate_index = 0
    for split, count in (("train", layout.n_train_plates), ("heldout", layout.n_heldout_plates)):
        for k in range(count):
            name = f"SYN-{config.upper()}-{split.upper()}-{k + 1:02d}"
            started = time.perf_counter()
            records[split] += _write_family_plate(_join_uri(out, "plates", f"{name}.zarr"), name,
                                                  f"SYN-{config.upper()}-BATCH-{plate_index + 1:02d}", cfg, layout,
                                                  seed, plate_index, storage_options, difficulty)
            plate_index += 1
            log.info("plate %s written in %.1f s", name, time.perf_counter() - started)
    columns = [*MANIFEST_COLUMNS, "localization", "compound_split"]
    assert set(columns) - set(MANIFEST_COLUMNS) <= set(OPTIONAL_COLUMNS)
    for split, path in manifests.items():
        write_manifest(pd.DataFrame(records[split], columns=columns), path if remote else Path(path), storage_options)
    return {k: (v if remote else Path(v)) for k, v in manifests.items()}
