"""The sweep file (`configs/sweeps/<name>.yaml`): a typed schema loaded and checked like `cellfm.config`
(unknown keys, types and ranges raise `ConfigError`, one line per problem naming the key), and the plan it
resolves to: the base training config, the arms, and every dimension of each arm's search space.

A sweep file names a base training config (+ `overrides`), a search `space` over any config key, optional
`arms` (named variants, each with its own overrides and space, e.g. one CellRep and one C3R arm), the search
algorithm, ASHA early stopping, resources per trial, the cluster size, where the sweep lives and the
objective. docs/sweeps.md describes every key; the comment lines above each field here are its short form.

    name: paper_dimensions
    storage: demo_output/sweeps
    base: ../smoke.yaml
    overrides: {optim.epochs: 4}
    space: {train.seed: {grid: [0, 1]}}
    arms:
      cellrep: {overrides: {model.name: cellrep}, space: {model.pooling_ratio: {grid: [1, 2, 4]}}}
      c3r: {overrides: {model.name: c3r, ssl.objective: ibot, ssl.mcd: true},
            space: {model.n_pre: {grid: [0, 2, 4]}, ssl.mcd_keep_counts: {grid: [[5], [], [1], [2]]}}}
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from cellfm.config import Config, ConfigError, load_config, read_yaml_mapping, typed_from_mapping
from cellfm.tune.dimensions import LISTED_KINDS, Dimension, config_key_problem, dimensions_of, optuna_can_hold

SEARCH_ALGORITHMS = ("random", "grid", "optuna")
# In a sweep's folder: what the sweep is (SweepPlan.fingerprint), written on its first run.
SWEEP_RECORD = "sweep.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class SearchConfig:
    """How trials are proposed."""

    # random: grid dimensions crossed, the others drawn per trial (Tune's BasicVariantGenerator); grid: every
    # dimension enumerated (grid and choice only); optuna: Optuna's TPE proposes each trial from the results
    # so far (no grid dimensions).
    algorithm: str = "random"
    # random / grid: trials per grid point (each with fresh draws); optuna: trials in all.
    num_samples: int = 1
    # Trials running at once; 0 = as many as the cluster fits (resources per trial, cluster size).
    max_concurrent_trials: int = 0
    # Seed of the random draws (random) and of Optuna's TPE sampler.
    seed: int = 0


@dataclass
class ASHAConfig:
    """Asynchronous successive halving (Ray Tune's ASHAScheduler) on the objective, in epochs."""

    # Stop trials early that fall behind at a rung (off: every trial trains optim.epochs epochs).
    enabled: bool = True
    # Epochs every trial trains before it can be stopped (>= 1, <= optim.epochs).
    grace_period: int = 1
    # Rungs at grace_period * reduction_factor**k epochs; at each, a trial below the top 1/reduction_factor
    # of the trials recorded there stops (> 1).
    reduction_factor: float = 2.0
    # ASHA brackets (>= 1).
    brackets: int = 1
    # What happens to a stopped trial's run folder: mark = keep it with STOPPED_EARLY.json inside; remove = delete it.
    stopped_runs: str = "mark"


@dataclass
class ResourcesConfig:
    """Resources of one trial: its Ray Train workers (train.num_workers, train.cpus_per_worker,
    train.gpus_per_worker and train.use_gpu of every trial)."""

    # Ray Train workers per trial.
    num_workers: int = 1
    # CPUs per worker (fractions allowed).
    cpus_per_worker: float = 1.0
    # GPUs per worker; > 0 trains on GPUs (train.use_gpu=true), 0 on CPUs.
    gpus_per_worker: float = 0.0


@dataclass
class ClusterConfig:
    """The cluster the sweep may use; null = as Ray reports it (the embedded Ray: ray.num_cpus of the base
    config and the local GPUs; a joined cluster: its resources now). Set it for an autoscaling cluster (its
    maximum size), whose current size says nothing of what it can give."""

    # Logical CPUs of the cluster (null: ask Ray).
    cpus: Optional[float] = None
    # GPUs of the cluster (null: ask Ray).
    gpus: Optional[float] = None


@dataclass
class ObjectiveConfig:
    """What the sweep optimizes. Every trial reports `objective` at each epoch: the well-level logistic
    regression score of `label` (by `protocol`) of its teacher on each held-out manifest, averaged over
    the manifests."""

    # The reported metric Tune optimizes: objective, objective/<manifest>, loss (SSL), images_per_s.
    metric: str = "objective"
    # max or min.
    mode: str = "max"
    # Manifest column the probe predicts (e.g. moa).
    label: str = "moa"
    # The probe's score: top1 (accuracy) or weighted_precision.
    score: str = "top1"
    # The probe protocol (docs/evaluation.md): probe (mean over eval.n_splits fixed well splits),
    # per_plate_probe (mean over plates of the probe within each plate) or lopo_probe (leave one plate
    # out, features z-scored per plate; every well tested once). The last two need held-out manifests of
    # two or more plates, and resolve far smaller differences than one plate's fixed splits.
    protocol: str = "probe"
    # When a trial computes it: every_epoch (ASHA compares trials by it at its rungs) or last_epoch (once, after
    # the last epoch: a sweep without ASHA then spends its time training, not embedding held-out fields).
    evaluate: str = "every_epoch"
    # Names of eval.manifests the objective averages over (empty: all; include one with channels training never saw).
    manifests: list[str] = field(default_factory=list)


@dataclass
class ArmConfig:
    """A named variant of the sweep: its own overrides of the base config and its own dimensions."""

    # Dotted config key -> value for this arm's trials (e.g. model.name: c3r).
    overrides: dict[str, Any] = field(default_factory=dict)
    # Dotted config key -> dimension, for this arm's trials only.
    space: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepConfig:
    """The whole sweep file."""

    # The sweep's folder under storage (letters, digits, . _ -); default: the file's name. The same name
    # resumes the sweep.
    name: str = ""
    # Folder or s3://bucket/prefix holding sweeps (absolute or s3:// under `ray job submit`).
    storage: str = "demo_output/sweeps"
    # The training config every trial starts from (a path relative to the sweep file's folder, or absolute).
    base: str = ""
    # Dotted config key -> value, applied to the base config in every trial.
    overrides: dict[str, Any] = field(default_factory=dict)
    # Dotted config key -> dimension ({grid|choice: [values]} or {uniform|loguniform|randint: [low, high]}), for every arm.
    space: dict[str, Any] = field(default_factory=dict)
    # Arm name -> {overrides, space}; empty: one arm, the base config.
    arms: dict[str, Any] = field(default_factory=dict)
    search: SearchConfig = field(default_factory=SearchConfig)
    asha: ASHAConfig = field(default_factory=ASHAConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)


# ----------------------------------------------------------------------------------------- the plan


@dataclass
class Arm:
    """An arm as trials see it: its name ("" when the sweep has no arms), its overrides, and its dimensions
    (the sweep's shared space, then its own)."""

    name: str
    overrides: dict[str, Any]
    dimensions: list[Dimension]

    def dimension(self, key: str) -> Dimension:
        return next(d for d in self.dimensions if d.key == key)

    def param_name(self, dim: Dimension, shared: bool) -> str:
        """The key of a dimension in a Tune trial config: the config key for shared dimensions, `<arm>/<key>`
        for an arm's own (Optuna needs one name per distinct distribution)."""
        return dim.key if shared or not self.name else f"{self.name}/{dim.key}"


@dataclass
class SweepPlan:
    """A loaded sweep: the file, the base config every trial starts from, and the arms."""

    spec: SweepConfig
    source: str          # how errors name the sweep (the file, + overrides)
    base_path: str       # the base config file
    base: Config         # base file <- sweep overrides <- command-line overrides <- resources; rules not checked
    arms: list[Arm]
    shared_keys: frozenset[str]

    @property
    def sweep_dir(self) -> str:
        """The sweep's folder: `storage/name` (local absolute path or s3:// URI)."""
        storage = self.spec.storage.rstrip("/")
        if "://" in storage:
            return f"{storage}/{self.spec.name}"
        return str(Path(storage).expanduser().resolve() / self.spec.name)

    @property
    def runs_dir(self) -> str:
        """Where the trials' Ray Train runs live (train.storage_path of every trial)."""
        return f"{self.sweep_dir}/runs"

    @property
    def epochs(self) -> int:
        return self.base.optim.epochs

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def objective_manifests(self) -> dict[str, str]:
        """Held-out set name -> manifest the objective averages over."""
        names = self.spec.objective.manifests or list(self.base.eval.manifests)
        return {n: self.base.eval.manifests[n] for n in names if n in self.base.eval.manifests}

    def swept_keys(self) -> list[str]:
        """Every dimension's config key, in file order (shared first)."""
        return list(dict.fromkeys(d.key for arm in self.arms for d in arm.dimensions))

    def values_of(self, tune_config: dict) -> tuple[str, dict[str, Any]]:
        """(arm name, config key -> value) of a Tune trial config (`cellfm.tune.search` lays it out)."""
        flat = {**tune_config.get("grid", {}), **{k: v for k, v in tune_config.items() if k != "grid"}}
        for arm in self.arms:
            # Tune's Optuna searcher unflattens `<arm>/<key>` parameter names into {arm: {key: value}}.
            if arm.name and isinstance(flat.get(arm.name), dict):
                flat.update({f"{arm.name}/{key}": value for key, value in flat.pop(arm.name).items()})
        arm = self.arm(flat.get("arm", self.arms[0].name))
        values = {}
        for dim in arm.dimensions:
            value = flat[arm.param_name(dim, dim.key in self.shared_keys)]
            if dim.kind == "choice" and self.spec.search.algorithm == "optuna" and not optuna_can_hold(dim.values):
                value = dim.values[value]  # Optuna proposes such choices by index
            values[dim.key] = value
        return arm.name, values

    def trial_config(self, arm_name: str, values: dict[str, Any], run_name: str) -> Config:
        """The config of one trial: base <- the arm's overrides <- the trial's values, its run named `run_name`
        under `runs_dir`. Raises `ConfigError` (naming the trial's values) on a badly typed value."""
        raw = self.base.to_dict()
        arm = self.arm(arm_name)
        for key, value in {**arm.overrides, **values}.items():
            section, name = key.split(".", 1)
            raw[section][name] = value
        raw["train"].update(storage_path=self.runs_dir, run_name=run_name)
        return Config.from_dict(raw, source=f"{self.source} ({describe_trial(arm_name, values)})", check_rules=False)

    def checked_points(self) -> typing.Iterator[tuple[str, dict[str, Any]]]:
        """(arm, values) of every trial config preflight checks: per arm the product of each dimension's
        `checked_values` (every grid and choice value, the ends of every range)."""
        for arm in self.arms:
            keys = [d.key for d in arm.dimensions]
            for combo in itertools.product(*(d.checked_values() for d in arm.dimensions)):
                yield arm.name, dict(zip(keys, combo))

    def grid_size(self) -> int:
        """Trials of a random/grid search: num_samples per point of the crossed grid (and, for the grid
        algorithm, choice) dimensions, summed over arms; optuna: num_samples."""
        s = self.spec.search
        if s.algorithm == "optuna":
            return s.num_samples
        enumerated = LISTED_KINDS if s.algorithm == "grid" else ("grid",)
        return s.num_samples * sum(math.prod(len(d.values) for d in arm.dimensions if d.kind in enumerated)
                                   for arm in self.arms)

    def fingerprint(self) -> dict:
        """What makes two runs of the sweep the same sweep (a restored sweep must match it): everything but
        the name, storage, concurrency, resources and cluster size."""
        base = self.base.to_dict()
        for key in ("ray",):
            base.pop(key)
        base["train"] = {k: v for k, v in base["train"].items()
                         if k not in ("num_workers", "cpus_per_worker", "gpus_per_worker", "use_gpu")}
        base["data"].pop("storage_options")
        spec = dataclasses.asdict(self.spec)
        for key in ("name", "storage", "resources", "cluster", "base", "overrides"):
            spec.pop(key)
        spec["search"].pop("max_concurrent_trials")
        return {"base": base, "sweep": spec}


def describe_trial(arm: str, values: dict[str, Any]) -> str:
    """`arm c3r: model.n_pre=2, ssl.mcd_keep_counts=[1]` (how problem lines and progress name a trial)."""
    settings = ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in values.items())
    return ": ".join(part for part in (f"arm {arm}" if arm else "", settings or "base config") if part)


def load_sweep(path: str, *, overrides: Sequence[str] = (), name: str | None = None, storage: str | None = None,
               address: str | None = None, max_concurrent_trials: int | None = None,
               num_samples: int | None = None, resources: dict[str, float] | None = None) -> SweepPlan:
    """The plan of a sweep file. `overrides`: `section.key=value` of the base config (after the file's
    `overrides`); the other arguments replace the sweep file's keys of the same name (`address`: ray.address,
    `resources`: resources.* keys).
    Raises `ConfigError` with every syntax problem at once: unknown keys and wrong types in the sweep file
    and its base config, malformed dimensions (empty choice, low >= high, ...), unknown config keys in the
    space and overrides. The rules that need the config values, the manifests and the cluster are
    `cellfm.tune.preflight`'s."""
    source = f"{path}{' + overrides' if overrides else ''}"
    raw = read_yaml_mapping(path)
    spec: SweepConfig = typed_from_mapping(SweepConfig, raw, source=str(path))
    for key, value in (("name", name), ("storage", storage)):
        if value is not None:
            setattr(spec, key, value)
    if max_concurrent_trials is not None:
        spec.search.max_concurrent_trials = int(max_concurrent_trials)
    if num_samples is not None:
        spec.search.num_samples = int(num_samples)
    for key, value in (resources or {}).items():
        setattr(spec.resources, key, value)
    spec.name = spec.name or Path(path).stem
    problems: list[str] = []
    if not _NAME.match(spec.name):
        problems.append(f"{source}: name={spec.name!r} must be letters, digits, '.', '_' or '-' (it names a folder)")
    if not spec.base:
        problems.append(f"{source}: base is empty; name the training config every trial starts from")
    arms_raw = spec.arms
    arm_specs: dict[str, ArmConfig] = {}
    for arm_name, arm_raw in arms_raw.items():
        if not _NAME.match(str(arm_name)) or "." in str(arm_name):
            problems.append(f"{source}: arms.{arm_name}: an arm name is letters, digits, '_' or '-'")
            continue
        try:
            arm_specs[str(arm_name)] = typed_from_mapping(ArmConfig, arm_raw, source=source, prefix=f"arms.{arm_name}.")
        except ConfigError as exc:
            problems += exc.problems
    for key in spec.overrides:
        problem = config_key_problem(key, f"{source}: overrides.{key}")
        if problem:
            problems.append(problem)
    shared, shared_problems = dimensions_of(spec.space, "space", source)
    problems += shared_problems
    arms: list[Arm] = []
    for arm_name, arm_spec in (arm_specs or {"": ArmConfig()}).items():
        prefix = f"arms.{arm_name}." if arm_name else ""
        own, own_problems = dimensions_of(arm_spec.space, f"{prefix}space", source)
        problems += own_problems
        for key in arm_spec.overrides:
            problem = config_key_problem(key, f"{source}: {prefix}overrides.{key}")
            if problem:
                problems.append(problem)
        twice = sorted({d.key for d in own} & {d.key for d in shared})
        if twice:
            problems.append(f"{source}: {prefix}space names {', '.join(twice)}, which the shared space already sweeps; "
                            f"keep each key in one place")
        arms.append(Arm(arm_name, dict(arm_spec.overrides), shared + own))
    if problems:
        raise ConfigError(problems)
    base_path = Path(path).parent / spec.base  # relative to the sweep file, as store URIs to their manifest
    base = load_config(base_path, overrides, check_rules=False, presets=spec.overrides)
    r = spec.resources
    base.train.num_workers, base.train.cpus_per_worker = r.num_workers, r.cpus_per_worker
    base.train.use_gpu = r.gpus_per_worker > 0
    if base.train.use_gpu:  # on CPUs train.gpus_per_worker keeps the base config's (positive) value, unused
        base.train.gpus_per_worker = r.gpus_per_worker
    if address is not None:
        base.ray.address = address
    return SweepPlan(spec, source, str(base_path), base, arms, frozenset(d.key for d in shared))

