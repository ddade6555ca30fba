"""Train/test splits of wells that the probes and the nearest-neighbour protocol share.

Every split is a pure function of its inputs and a seed, so every model is scored on the same wells.
Wells must already be in a fixed order (sorted by plate, well: `cellfm.evaluate.wells`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def compound_held_out_split(groups: np.ndarray, labels: np.ndarray, test_fraction: float,
                            seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) well indices with no group (compound) on both sides, stratified by label.

    Per label (MoA), `int(test_fraction * n)` of its n compounds, at least 1 and at most n - 1, are
    drawn for the test side, so every tested MoA keeps a compound to train on. A MoA with a single
    compound cannot be tested on a compound the probe never saw: its wells stay on the train side
    (the probe may still wrongly predict it). Raises if a compound carries two labels.
    """
    groups, labels = np.asarray(groups).astype(str), np.asarray(labels).astype(str)
    label_of: dict[str, str] = {}
    for group, label in zip(groups.tolist(), labels.tolist()):
        if label_of.setdefault(group, label) != label:
            raise ValueError(f"compound {group!r} has wells labelled {label_of[group]!r} and {label!r}; "
                             "a compound-held-out split needs one label per compound")
    rng = np.random.default_rng(seed)
    test_groups: list[str] = []
    for label in sorted(set(label_of.values())):
        members = sorted(g for g, lab in label_of.items() if lab == label)
        if len(members) < 2:
            continue
        n_test = min(len(members) - 1, max(1, int(test_fraction * len(members))))
        test_groups += list(rng.choice(members, size=n_test, replace=False))
    is_test = np.isin(groups, test_groups)
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def leave_one_plate_out(plates: np.ndarray) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(held-out plate, train indices = every other plate's wells, test indices = its wells), plates
    in sorted order (CHAMMI's leave-one-plate-out task)."""
    plates = np.asarray(plates).astype(str)
    for plate in sorted(set(plates)):
        yield plate, np.flatnonzero(plates != plate), np.flatnonzero(plates == plate)
