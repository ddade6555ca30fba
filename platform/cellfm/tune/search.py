"""A sweep plan as Ray Tune objects: the search space, the search algorithm and the ASHA scheduler.

Arms make the space conditional (a C3R arm's `model.n_pre` means nothing to a CellRep arm), which Tune's
grid search cannot express. So for `random` and `grid` the grid is enumerated here, arm by arm, into one
`tune.grid_search` over points (`{"arm": ..., <param>: value, ...}` under the key "grid"), and each drawn
dimension is a Tune domain of its own; for `optuna` a define-by-run function suggests the arm first and
then only that arm's dimensions. `SweepPlan.values_of` reads either layout back.
"""

from __future__ import annotations

import itertools
from typing import Any

from cellfm.tune.dimensions import LISTED_KINDS, Dimension, optuna_can_hold
from cellfm.tune.sweep_config import SweepPlan

# The reported metric ASHA counts time in: epochs trained (a resumed Train run continues the count).
TIME_ATTR = "epochs_done"
# Epochs a trial trained since the sweep (re)started it: 0 for a trial a resumed sweep only re-reports.
LAUNCH_EPOCHS_ATTR = "epochs_this_launch"


def tune_domain(dim: Dimension):
    """The Tune domain drawing one value of a drawn dimension (choice, uniform, loguniform, randint)."""
    from ray import tune

    low_high = dim.values
    return {"choice": lambda: tune.choice(list(dim.values)), "uniform": lambda: tune.uniform(*low_high),
            "loguniform": lambda: tune.loguniform(*low_high), "randint": lambda: tune.randint(*low_high)}[dim.kind]()


def param_space(plan: SweepPlan) -> dict[str, Any]:
    """Tune's param_space for the random and grid algorithms (optuna: {} - its searcher holds the space)."""
    from ray import tune

    if plan.spec.search.algorithm == "optuna":
        return {}
    enumerated = LISTED_KINDS if plan.spec.search.algorithm == "grid" else ("grid",)
    points, space = [], {}
    for arm in plan.arms:
        listed = [d for d in arm.dimensions if d.kind in enumerated]
        names = [arm.param_name(d, d.key in plan.shared_keys) for d in listed]
        for combo in itertools.product(*(d.values for d in listed)):
            points.append({"arm": arm.name, **dict(zip(names, combo))})
        for dim in arm.dimensions:
            if dim.kind not in enumerated:
                space[arm.param_name(dim, dim.key in plan.shared_keys)] = tune_domain(dim)
    space["grid"] = tune.grid_search(points)
    return space


class OptunaSpace:
    """Optuna's define-by-run space: the arm (when there are several), then that arm's dimensions. A choice
    of values Optuna cannot hold (lists, mappings) is suggested by index. A class, not a closure: Tune pickles
    the searcher, this space included, into every experiment checkpoint."""

    def __init__(self, plan: SweepPlan):
        self.arms = {arm.name: arm for arm in plan.arms}
        self.shared_keys = plan.shared_keys

    def __call__(self, trial) -> dict | None:
        if len(self.arms) > 1:
            arm = self.arms[trial.suggest_categorical("arm", list(self.arms))]
        else:
            arm = next(iter(self.arms.values()))
        for dim in arm.dimensions:
            name = arm.param_name(dim, dim.key in self.shared_keys)
            low_high = dim.values
            if dim.kind == "choice":
                values = list(dim.values) if optuna_can_hold(dim.values) else list(range(len(dim.values)))
                trial.suggest_categorical(name, values)
            elif dim.kind == "uniform":
                trial.suggest_float(name, *low_high)
            elif dim.kind == "loguniform":
                trial.suggest_float(name, *low_high, log=True)
            elif dim.kind == "randint":
                trial.suggest_int(name, low_high[0], low_high[1] - 1)
        return None if len(self.arms) > 1 else {"arm": arm.name}


def search_algorithm(plan: SweepPlan, concurrent: int):
    """Tune's searcher: a seeded BasicVariantGenerator (random, grid) or OptunaSearch with a seeded TPE sampler,
    proposing at most `concurrent` trials at once (Tune ignores TuneConfig.max_concurrent_trials for a
    BasicVariantGenerator it is handed: it must hold the limit itself)."""
    s, o = plan.spec.search, plan.spec.objective
    if s.algorithm == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(space=OptunaSpace(plan), metric=o.metric, mode=o.mode,
                            sampler=optuna.samplers.TPESampler(seed=s.seed))
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=concurrent, random_state=s.seed)


def scheduler(plan: SweepPlan):
    """ASHA on the objective with epochs as time (None when off: every trial runs all epochs)."""
    a = plan.spec.asha
    if not a.enabled:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr=TIME_ATTR, max_t=plan.epochs, grace_period=a.grace_period,
                         reduction_factor=a.reduction_factor, brackets=a.brackets)
