"""What a synthetic screen holds: its stains, treatments (phenotypes of compounds at their doses, at
either difficulty), HPA-like proteins, plate layouts and the channel configurations of the family.

Perturbations change *morphology*, not brightness (`Phenotype` has no intensities). Only a
dose-dependent fraction of cells responds (penetrance), the rest look like controls.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np

CP5_CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]
UNSEEN4_CHANNELS = ["Mito", "AGP", "DNA", "RNA"]
STAINS = tuple(CP5_CHANNELS)  # every stain render_field can draw
SOURCE = "synthetic"
CELL_LINE = "U2OS-synthetic"
PIXEL_SIZE_UM = 0.65
REFERENCE_FIELD_SIZE = 128  # Phenotype.density counts cells per field of this many pixels squared


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


@dataclass(frozen=True)
class Difficulty:
    """How a screen of one difficulty is drawn: its treatments and how its stains' histograms are fixed."""

    perturbations: tuple[Perturbation, ...]  # DMSO first
    # False: each stain's in-compartment histogram is fixed in focus, so defocus then narrows it more for fine
    # textures (puncta, reticulum) than for coarse ones, and the Protein keeps its localization's histogram.
    # True: fixed after all optical blur, the Protein's to one template for every localization, ties broken at
    # random: a field's histogram no longer depends on its label.
    imaged_histograms: bool
    # Bumped whenever the difficulty's pixels change; results record it, so none measured on an older screen
    # is merged with newer ones.
    revision: int


# Screen difficulty -> how it is drawn. "subtle" is the original screen (its pixels are pinned).
DIFFICULTIES: dict[str, Difficulty] = {
    "subtle": Difficulty(PERTURBATIONS, imaged_histograms=False, revision=1),
    # Revision 1 fixed histograms in focus: with 4 training plates a probe read 0.53 (cp5) and 0.64 (hpa4)
    # from intensity statistics (docs/screens.md).
    "clear": Difficulty((CONTROL, *(_clear_compound(*spec) for spec in _COMPOUNDS)), imaged_histograms=True,
                        revision=2),
}


def screen_difficulty(difficulty: str) -> Difficulty:
    """How a screen of this difficulty is drawn (`DIFFICULTIES`)."""
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}; choose one of {sorted(DIFFICULTIES)}")
    return DIFFICULTIES[difficulty]


def perturbations(difficulty: str) -> tuple[Perturbation, ...]:
    """The treatments (DMSO first) of a screen of this difficulty."""
    return screen_difficulty(difficulty).perturbations


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
    # One configuration of the synthetic family as benchmarks/model_quality.py and the paper-dimensions sweep
    # score it: 5 held-out plates, so the leave-one-plate-out probe trains on 224 wells and tests 280 (a family
    # screen has no unseen split: another configuration is the unseen one).
    "benchmark": ScreenLayout(n_train_plates=3, n_heldout_plates=5, n_unseen_plates=0, replicates_per_plate=4,
                              controls_per_plate=8, fields_per_well=4, field_size=96),
}


def screen_layout(layout: str | ScreenLayout) -> ScreenLayout:
    """A layout given by name (``LAYOUTS``) or as is."""
    if isinstance(layout, str):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)} or pass a ScreenLayout")
        return LAYOUTS[layout]
    return layout


# ----------------------------------------------------------------------------------------------
# The synthetic screen family: cp5, novel4, hpa4, brightfield1 (new stains from the same cells)

# Stains beyond STAINS, rendered from the same cell geometry; aliases name the HPA channels.
FAMILY_STAINS = (*STAINS, "Tubulin", "Golgi", "Lysosome", "Brightfield", "Protein")
STAIN_ALIASES = {"Microtubules": "Tubulin", "Nucleus": "DNA"}
LOCALIZATIONS = ("nucleus", "nucleoli", "cytosol", "mitochondria", "er", "plasma_membrane", "golgi", "vesicles")
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
    stains = {canonical_stain(c) for c in channels}
    return [p for p, shown_by in PARAMETER_STAINS.items() if stains & set(shown_by)]


def revealed_labels(channels: Sequence[str]) -> list[str]:
    """The labels a configuration's stains can reveal: the control and every MoA one of whose
    parameters a stain shows, or every localization class when ``Protein`` is among them."""
    if "Protein" in {canonical_stain(c) for c in channels}:
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
            # The whole class name: its first 4 letters would give nucleus and nucleoli proteins the same ids.
            out.append(Protein(f"HPA-{loc.upper()}-{k + 1}", loc, others[int(rng.integers(len(others)))],
                               float(rng.uniform(0.05, 0.2)), float(rng.lognormal(0.0, 0.4))))
    return tuple(out)


PROTEINS = _proteins()
HELDOUT_PROTEINS = tuple(p.protein_id for p in PROTEINS if p.protein_id.endswith("-3"))


def canonical_stain(channel: str) -> str:
    """The stain a channel name shows (``STAIN_ALIASES`` resolved)."""
    return STAIN_ALIASES.get(channel, channel)
