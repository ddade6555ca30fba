"""The stains of a synthetic field, drawn from its cells: noise-free signal before the microscope.

Every stain comes from one cell geometry, so all are spatially consistent: DNA (textured nuclei with
nucleolar holes), ER (perinuclear reticular network + nuclear envelope), RNA (nucleoli + faint
nucleoplasm and cytoplasm), AGP (cortical actin/membranes + optional stress fibres) and Mito (tubular
network or fragmented puncta); the family adds Tubulin, Golgi, Lysosome, label-free Brightfield and an
HPA-like Protein from the same cells. Each compartment's signal is renormalised per cell to a
phenotype-independent mean (cells spread out when sparse), so per-channel mean intensity stays roughly
constant across MoAs (DNA/RNA still scale with the number of nuclei): perturbations show in morphology.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage

from cellfm.data.synthetic.catalog import CONTROL_PHENOTYPE, STAINS, Phenotype, Protein
from cellfm.data.synthetic.cells import NUCLEUS_RADIUS, Cells, field_textures, pixel_grid, sample_cells

# Mean signal (counts before gain) per pixel of the compartment carrying each stain in a control cell.
_DNA_LEVEL = 2600.0       # nucleus; scaled by (control nucleus area / nucleus area): DNA content is fixed
_ER_LEVEL = 900.0         # whole cell
_MITO_LEVEL = 1100.0      # whole cell
_AGP_LEVEL = 800.0        # whole cell
_NUCLEOLI_LEVEL = 900.0   # nucleus, in nucleoli
_NUCLEOPLASM_RNA = 250.0  # nucleus, diffuse
_CYTO_RNA_LEVEL = 200.0   # whole cell, diffuse
_TUBULIN_LEVEL, _GOLGI_LEVEL, _LYSO_LEVEL, _PROTEIN_LEVEL = 700.0, 150.0, 600.0, 250.0
_BRIGHTFIELD_LEVEL = 3000.0


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


def _nucleoli_points(rng: np.random.Generator, cells: Cells, size: int, which: np.ndarray) -> np.ndarray:
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


def render_stains(rng: np.random.Generator, ph: Phenotype, size: int, context: dict | None = None) -> np.ndarray:
    """Noise-free signal of every stain in ``STAINS`` order, (len(STAINS), size, size) float32.

    ``context`` (a dict), if given, receives the field's geometry and compartment maps so further
    stains can be drawn from the same cells (the synthetic family); the random stream is unchanged.
    """
    cells = sample_cells(rng, ph, size)
    chromatin, er_fine, er_coarse, er_sheets, mito_net, mito_gate, slow = field_textures(rng, size)
    yy, xx = pixel_grid(size)

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
    dna_target = _DNA_LEVEL * NUCLEUS_RADIUS ** 2 / (cells.na * cells.nb) * brightness["DNA"] * cells.dna_content
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


def family_signals(rng: np.random.Generator, ctx: dict, size: int, protein: Protein | None) -> dict[str, np.ndarray]:
    """Tubulin, Golgi, Lysosome, Brightfield (and Protein) signals from the field's geometry.

    Morphology carries the phenotype as in the Cell Painting stains: microtubules follow cell
    elongation and align with stress fibres, the Golgi ribbon disperses under ER stress, lysosomes
    multiply with mitochondrial damage; brightfield shows cell/nucleus shape, density and texture.
    """
    cells, owner, cell, cyto = ctx["cells"], ctx["owner"], ctx["cell"], ctx["cyto"]
    yy, xx = pixel_grid(size)
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
