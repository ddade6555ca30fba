"""The cells of a synthetic field: one random geometry (cell and nucleus ellipses on a jittered
hexagonal lattice, lobed nuclei) with each cell's morphology drawn from the well's phenotype, plus the
field's random textures and pixel grid that every stain is drawn with.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import scipy.fft

from cellfm.data.synthetic.catalog import CONTROL_PHENOTYPE, REFERENCE_FIELD_SIZE, STAINS, Phenotype

NUCLEUS_RADIUS = 8.5  # px, control nucleus mean radius


@functools.lru_cache(maxsize=8)
def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Read-only (y, x) float32 pixel coordinates of a ``size`` x ``size`` field (cached: every stain uses them)."""
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


def field_textures(rng: np.random.Generator, size: int) -> np.ndarray:
    """Unit-variance random textures, one per ``_TEXTURE_BANDS`` entry, (bands, size, size).

    Zero-crossings of band-passed noise form connected curvy networks (ER, mitochondria); its
    peaks make blobs; low bands make smooth modulations. One batched FFT serves all bands.
    """
    white = rng.standard_normal((len(_TEXTURE_BANDS), size, size), dtype=np.float32)
    textures = scipy.fft.irfft2(scipy.fft.rfft2(white) * _band_filters(size), s=(size, size))
    textures /= textures.std(axis=(1, 2), keepdims=True) + np.float32(1e-12)
    return textures


@dataclass(frozen=True)
class Cells:
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


def sample_cells(rng: np.random.Generator, ph: Phenotype, size: int) -> Cells:
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
    n_radius = NUCLEUS_RADIUS * trait("nucleus_scale") * rng.lognormal(0, 0.08, n)
    n_elongation = trait("nucleus_elongation") * rng.lognormal(0, 0.06, n)
    na, nb = n_radius * np.sqrt(n_elongation), n_radius / np.sqrt(n_elongation)
    a = np.maximum(radius * np.sqrt(elongation), na / 0.7)  # big nuclei make big cells
    b = np.maximum(radius / np.sqrt(elongation), nb / 0.7)
    shift = rng.uniform(-0.25, 0.25, n) * (a - na)
    f32 = functools.partial(np.asarray, dtype=np.float32)  # keep all pixel maths in float32
    return Cells(
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
