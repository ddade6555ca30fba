"""The microscope of a synthetic screen: stains' signal -> an imaged uint16 field.

Rearranging a stain changes its pixel histogram (fragmented mitochondria are brighter puncta than
tubes), which per-channel intensity percentiles would read as easily as morphology. So each stain's
pixel values inside its compartment (nuclei for DNA, cells otherwise) are rank-mapped onto the
distribution control cells have, keeping their order (the shapes) and their mean: what is left for a
model-free histogram is how much of the field the compartment covers. The subtle screen does this in
focus, so defocus still narrows a fine texture's histogram more than a coarse one's; the clear screen
does it after all blur (`Difficulty.imaged_histograms`). On top come the nuisances a real screen has
and an encoder must learn to ignore (`BatchEffect`): channel gains, background offsets, vignetting,
shot/read noise and defocus.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import scipy.ndimage

from cellfm.data.synthetic.catalog import (CONTROL_PHENOTYPE, FAMILY_STAINS, PROTEINS, REFERENCE_FIELD_SIZE,
                                           STAIN_ALIASES, STAINS, Phenotype, Protein, canonical_stain)
from cellfm.data.synthetic.cells import pixel_grid
from cellfm.data.synthetic.stains import family_signals, render_stains

_PSF_SIGMA = 0.7  # px, in-focus optical blur


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


# Stain -> compartment (a mask of `render_stains`'s context) whose pixel distribution is fixed to the
# control one. Brightfield is not a stain. Protein's distribution is its label's unless histograms are fixed
# after blur (`Difficulty.imaged_histograms`); then the whole field's is one template shared by every
# localization (the cells alone would leave what a membrane protein blurs beyond them to read).
_HISTOGRAM_COMPARTMENTS = {"DNA": "nucleus", "ER": "cell", "RNA": "cell", "AGP": "cell", "Mito": "cell",
                           "Tubulin": "cell", "Golgi": "cell", "Lysosome": "cell"}
_TEMPLATE_FIELDS, _TEMPLATE_QUANTILES, _TEMPLATE_SEED = 16, 1024, 20261121
_PROTEIN_TEMPLATE_SEED = 20261206


def _psf(signal: np.ndarray) -> np.ndarray:
    """In-focus optical blur of a (C, H, W) or (H, W) signal."""
    return scipy.ndimage.gaussian_filter(signal, sigma=(0,) * (signal.ndim - 2) + (_PSF_SIGMA, _PSF_SIGMA))


def _quantile_function(pooled: list[np.ndarray]) -> np.ndarray:
    grid = (np.arange(_TEMPLATE_QUANTILES) + 0.5) / _TEMPLATE_QUANTILES
    return np.quantile(np.concatenate(pooled), grid).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _control_quantiles() -> dict[str, np.ndarray]:
    """Per stain, the quantile function (mean 1, `_TEMPLATE_QUANTILES` points) of in-focus pixel
    values inside its compartment, pooled over seeded control fields (each scaled to mean 1)."""
    rng = np.random.default_rng(_TEMPLATE_SEED)
    pooled: dict[str, list[np.ndarray]] = {s: [] for s in _HISTOGRAM_COMPARTMENTS}
    for _ in range(_TEMPLATE_FIELDS):
        ctx: dict = {}
        base = render_stains(rng, CONTROL_PHENOTYPE, REFERENCE_FIELD_SIZE, context=ctx)
        signals = dict(zip(STAINS, base)) | family_signals(rng, ctx, REFERENCE_FIELD_SIZE, None)
        for stain, compartment in _HISTOGRAM_COMPARTMENTS.items():
            values = _psf(signals[stain])[ctx[compartment]]
            if values.size and values.mean() > 0:
                pooled[stain].append(values / values.mean())
    return {s: _quantile_function(v) for s, v in pooled.items()}


@functools.lru_cache(maxsize=1)
def _protein_quantiles() -> np.ndarray:
    """The quantile function (mean 1) of in-focus Protein values over whole fields, pooled over one seeded
    control field of every protein (each scaled to mean 1): one template for all localizations."""
    rng = np.random.default_rng(_PROTEIN_TEMPLATE_SEED)
    pooled = []
    for protein in PROTEINS:
        ctx: dict = {}
        render_stains(rng, CONTROL_PHENOTYPE, REFERENCE_FIELD_SIZE, context=ctx)
        values = _psf(family_signals(rng, ctx, REFERENCE_FIELD_SIZE, protein)["Protein"]).ravel()
        if values.mean() > 0:
            pooled.append(values / values.mean())
    return _quantile_function(pooled)


def _rank_map(values: np.ndarray, template: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """`values` replaced by `template`'s quantiles in their rank order (rank r of n -> the quantile at
    (r + 0.5) / n), scaled to the mean of `values`. Equal values are ranked by position, or at random with
    `rng`: a block of equal values (a protein absent from most of a cell) then spreads over the template's
    range instead of becoming a ramp along the rows."""
    if rng is None:
        order = np.argsort(values, kind="stable")
    else:
        order = np.lexsort((rng.random(values.size), values))
    at = (np.arange(values.size) + 0.5) * (len(template) / values.size) - 0.5
    matched = np.empty_like(values)
    matched[order] = np.interp(at, np.arange(len(template)), template)
    return matched * (values.mean() / matched.mean())


def _fix_histograms(stack: np.ndarray, names: Sequence[str], context: dict,
                    rng: np.random.Generator | None) -> None:
    """In place: each stain's values inside its compartment rank-mapped onto the control distribution (same
    order, same mean); with `rng` (histograms fixed after blur) the Protein's over the whole field too, ties
    broken at random."""
    templates = _control_quantiles()
    for channel, name in zip(stack, names):
        compartment = _HISTOGRAM_COMPARTMENTS.get(name)
        if name == "Protein" and rng is not None:
            mask, template = np.ones(channel.shape, bool), _protein_quantiles()
        elif compartment is None:
            continue
        else:
            mask, template = context[compartment], templates[name]
        values = channel[mask]
        if values.size == 0 or values.mean() <= 0:
            continue
        channel[mask] = _rank_map(values, template, rng)


def _optical_signal(rng: np.random.Generator, signals: Mapping[str, np.ndarray], names: Sequence[str],
                    context: dict, defocus_sigma: float, imaged_histograms: bool) -> np.ndarray:
    """The (C, H, W) signal of the stains `names` reaching the camera: PSF blur, defocus blur (on top of the
    PSF: Gaussians compose as hypot(PSF, defocus)) and each stain's histogram fixed (`_fix_histograms`), in
    focus or, with `imaged_histograms`, after both blurs."""
    stack = _psf(np.stack([signals[n] for n in names]).astype(np.float32, copy=False))
    if not imaged_histograms:
        _fix_histograms(stack, names, context, None)
    if defocus_sigma > 0:
        stack = scipy.ndimage.gaussian_filter(stack, sigma=(0, defocus_sigma, defocus_sigma))
    if imaged_histograms:
        _fix_histograms(stack, names, context, rng)
    return stack


def _camera(rng: np.random.Generator, image: np.ndarray, effect: BatchEffect,
            names: Sequence[str] = STAINS) -> np.ndarray:
    """Camera side of the optical signal (`_optical_signal`): gain, vignetting, background, noise -> uint16.
    `names` are the stains of the channels (gain and offset are looked up by name)."""
    size = image.shape[-1]
    yy, xx = pixel_grid(size)
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
                 batch_effect: BatchEffect, context: dict | None = None, imaged_histograms: bool = False) -> np.ndarray:
    """One ``(C, size, size)`` uint16 field of cells with ``phenotype`` imaged under ``batch_effect``.

    Channels are returned in ``channel_names`` order (any subset of ``STAINS``). All stains are
    drawn from the same random stream whatever the subset, so a field's biology does not depend
    on which channels are requested. ``context`` (a dict), if given, receives the field's cells and
    compartment masks (`field_truth` turns them into the ground truth); the pixels do not change.
    ``imaged_histograms``: as `Difficulty.imaged_histograms` (False: histograms fixed in focus).
    """
    unknown = [c for c in channel_names if c not in STAINS]
    if unknown or not channel_names:
        raise ValueError(f"cannot render channel(s) {unknown or channel_names}; known stains: {list(STAINS)}")
    context = {} if context is None else context
    signals = dict(zip(STAINS, render_stains(rng, phenotype, size, context)))
    signal = _optical_signal(rng, signals, STAINS, context, batch_effect.defocus_sigma, imaged_histograms)
    image = _camera(rng, signal, batch_effect)
    return image[[STAINS.index(c) for c in channel_names]]


def render_family_field(rng: np.random.Generator, channel_names: list[str], phenotype: Phenotype, size: int,
                        batch_effect: BatchEffect, protein: Protein | None = None,
                        context: dict | None = None, imaged_histograms: bool = False) -> np.ndarray:
    """A ``(C, size, size)`` uint16 field with any of ``FAMILY_STAINS`` (or their aliases
    ``Microtubules``/``Nucleus``) rendered from one cell geometry. ``Protein`` needs ``protein``.
    ``context``, ``imaged_histograms``: as in `render_field`."""
    canonical = [canonical_stain(c) for c in channel_names]
    unknown = [c for c, k in zip(channel_names, canonical) if k not in FAMILY_STAINS]
    if unknown or not channel_names:
        raise ValueError(f"cannot render channel(s) {unknown or channel_names}; known stains: "
                         f"{list(FAMILY_STAINS)} and aliases {sorted(STAIN_ALIASES)}")
    if "Protein" in canonical and protein is None:
        raise ValueError("the Protein channel needs a protein (localization) to render")
    ctx = {} if context is None else context
    base = render_stains(rng, phenotype, size, context=ctx)
    signals = dict(zip(STAINS, base)) | family_signals(rng, ctx, size, protein)
    signal = _optical_signal(rng, signals, canonical, ctx, batch_effect.defocus_sigma, imaged_histograms)
    return _camera(rng, signal, batch_effect, channel_names)
