"""The sweep's preflight: everything `cellfm sweep` checks before Ray starts, reported at once (one line
per problem naming the key, exit code 2):

- the sweep file's rules: search algorithm against the dimensions, ASHA, resources, objective;
- keys that cannot vary between trials (held-out reading, resources, the epoch budget, run naming);
- every trial config a dimension can produce (each grid / choice value, the ends of each range, crossed
  per arm): the config's own rules, the model size, the training manifest, the objective's held-out
  manifests, and whether each swept key applies to that trial's model and objective;
- the cluster: a trial's workers, its driver and its data reads must fit, and so must the trials run at once.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Callable

from cellfm.config import PLATE_PROTOCOLS, Config, ConfigError, PreflightError, config_problems, student_channel_sampling
from cellfm.paths import path_problem
from cellfm.preflight import (
    MAX_PROBLEMS,
    evaluation_manifest_problems,
    load_checked_manifest,
    model_size_problems,
    one_plate_problem,
)
from cellfm.runtime import cluster_address, local_gpu_count
from cellfm.train.inputs import training_input_problems
from cellfm.tune.dimensions import LISTED_KINDS
from cellfm.tune.sweep_config import SEARCH_ALGORITHMS, SWEEP_RECORD, SweepPlan, describe_trial

# A trial's Tune driver builds and fits its TorchTrainer; Tune rejects 0 CPUs, a sliver works.
TRIAL_DRIVER_CPUS = 0.01
SCORES = ("top1", "weighted_precision")
OBJECTIVE_PROTOCOLS = ("probe", "per_plate_probe", "lopo_probe")
OBJECTIVE_EPOCHS = ("every_epoch", "last_epoch")

# Config keys (or whole sections) that cannot vary between the trials of one sweep, and why.
_HELD_OUT = "the held-out fields are read once for the whole sweep with the base config's data settings"
FIXED_KEYS: dict[str, str] = {
    "eval": "the objective's held-out sets and probe are the same for every trial (set eval.* in overrides)",
    "ray": "all trials share the sweep's one Ray cluster",
    "train.storage_path": "every trial's run lives under the sweep's folder",
    "train.run_name": "every trial's run is named after its trial id (so a restored sweep resumes it)",
    "train.num_workers": "resources.num_workers sets it",
    "train.cpus_per_worker": "resources.cpus_per_worker sets it",
    "train.gpus_per_worker": "resources.gpus_per_worker sets it",
    "train.use_gpu": "resources.gpus_per_worker sets it",
    "optim.epochs": "ASHA divides one epoch budget between the trials (set it in overrides)",
    **{f"data.{k}": _HELD_OUT for k in ("normalization", "clip_low", "clip_high", "clahe_clip_limit", "clahe_tiles",
                                        "field_size", "field_resize", "mixed_channels", "pad_channels_to",
                                        "storage_options")},
}


def _cellrep(c: Config) -> bool:
    return c.model.name == "cellrep"


def _ibot(c: Config) -> bool:
    return c.ssl.objective == "ibot"


# Config keys that mean something only for some trials: key -> (whether it applies to a config, what it needs).
APPLIES_TO: dict[str, tuple[Callable[[Config], bool], str]] = {
    **{f"model.{k}": (_cellrep, "model.name=cellrep (a CellRep setting)")
       for k in ("pooling_ratio", "mixer_depth", "channel_encoder_dim", "channel_encoder_stride", "input_norm",
                 "channel_mixer", "channel_pool_after")},
    **{f"model.{k}": (lambda c: c.model.name in ("cellrep", "c3r"), "model.name=cellrep or c3r (they pool channels)")
       for k in ("channel_pooling", "channel_pooling_queries")},
    "model.n_pre": (lambda c: c.model.name == "c3r", "model.name=c3r (C3R's branch depth)"),
    "model.channel_groups": (lambda c: c.model.name == "c3r", "model.name=c3r (C3R's context/concept groups)"),
    "model.channel_vocabulary": (lambda c: c.model.name in ("channelvit", "dichavit", "vit_rgb"),
                                 "model.name=channelvit, dichavit or vit_rgb"),
    "ssl.dcs_temperature": (lambda c: student_channel_sampling(c) == "dcs",
                            "diverse channel sampling (model.name=dichavit)"),
    "ssl.token_orthogonality_weight": (lambda c: c.model.name == "dichavit", "model.name=dichavit"),
    **{f"ssl.{k}": (lambda c: c.ssl.objective == "mae", "ssl.objective=mae (CA-MAE)")
       for k in ("mae_mask_ratio", "mae_fourier_weight", "mae_decoder_dim", "mae_decoder_depth", "mae_decoder_heads")},
    "ssl.mcd_keep_counts": (lambda c: c.ssl.mcd and _ibot(c),
                            "ssl.mcd=true with ssl.objective=ibot (C3R's Masked Context Distillation)"),
    **{f"ssl.{k}": (_ibot, "ssl.objective=ibot")
       for k in ("ibot_loss_weight", "ibot_separate_head", "mask_ratio_min_max", "mask_sample_probability")},
    **{f"ssl.{k}": (lambda c: c.ssl.supcon_weight > 0, "ssl.supcon_weight > 0")
       for k in ("supcon_temperature", "supcon_label")},
    "train.zero_stage": (lambda c: c.train.engine == "deepspeed", "train.engine=deepspeed"),
}


@dataclass(frozen=True)
class ClusterCapacity:
    """What the sweep's Ray cluster can give, and where that figure comes from (for problem lines)."""

    cpus: float
    gpus: float
    described: str


@dataclass(frozen=True)
class TrialResources:
    """What one trial takes from the cluster, and how many trials run at once."""

    cpus: float           # its workers + its driver
    gpus: float
    data_cpus: float      # CPUs all trials leave unreserved for Ray Data's tasks
    concurrent: int


def check_sweep(plan: SweepPlan, capacity: ClusterCapacity | None = None) -> TrialResources:
    """Raise `PreflightError` with every problem of `sweep_problems`; return the resources per trial and
    how many trials run at once. `capacity`: the cluster (default: `cluster_capacity(plan)`)."""
    capacity = capacity or cluster_capacity(plan)
    problems, resources = sweep_problems(plan, capacity)
    if problems:
        from cellfm.data.manifest import first_problems

        raise PreflightError(first_problems(problems, MAX_PROBLEMS))
    return resources


def sweep_problems(plan: SweepPlan, capacity: ClusterCapacity) -> tuple[list[str], TrialResources]:
    """Every problem of the sweep (see the module's docstring), and the trial resources it implies."""
    problems = spec_problems(plan)
    problems += [p for key, path in (("storage", plan.spec.storage),) if (p := path_problem(key, path, output=True))]
    problems += recorded_sweep_problems(plan)
    problems += trial_config_problems(plan)
    resources, resource_problems = trial_resources(plan, capacity)
    return problems + resource_problems, resources


def spec_problems(plan: SweepPlan) -> list[str]:
    """The sweep file's own rules."""
    s, a, r, o = plan.spec.search, plan.spec.asha, plan.spec.resources, plan.spec.objective
    at = f"{plan.source}:"
    problems = []
    if s.algorithm not in SEARCH_ALGORITHMS:
        problems.append(f"{at} search.algorithm={s.algorithm!r} is not one of {list(SEARCH_ALGORITHMS)}")
    if s.num_samples < 1:
        problems.append(f"{at} search.num_samples must be >= 1, got {s.num_samples}")
    if s.max_concurrent_trials < 0:
        problems.append(f"{at} search.max_concurrent_trials must be >= 0 (0 = as many as fit), got {s.max_concurrent_trials}")
    for arm in plan.arms:
        for dim in arm.dimensions:
            if s.algorithm == "optuna" and dim.kind == "grid":
                problems.append(f"{at} {dim.where}: search.algorithm=optuna proposes every value itself and cannot "
                                f"enumerate a grid; use choice, or search.algorithm=random|grid")
            if s.algorithm == "grid" and dim.kind not in LISTED_KINDS:
                problems.append(f"{at} {dim.where}: search.algorithm=grid enumerates grid and choice values only, "
                                f"not a {dim.kind} range; use search.algorithm=random or optuna")
    keys = [(dim.where, dim.key) for arm in plan.arms for dim in arm.dimensions] + [
        (f"arms.{arm.name}.overrides.{key}", key) for arm in plan.arms for key in arm.overrides]
    for where, key in dict.fromkeys(keys):
        reason = FIXED_KEYS.get(key) or FIXED_KEYS.get(key.split(".", 1)[0])
        if reason:
            problems.append(f"{at} {where}: {key} cannot vary between trials: {reason}")
    if a.stopped_runs not in ("mark", "remove"):
        problems.append(f"{at} asha.stopped_runs={a.stopped_runs!r} is not one of ['mark', 'remove']")
    if a.enabled:
        if not 1 <= a.grace_period <= plan.epochs:
            problems.append(f"{at} asha.grace_period={a.grace_period} must be in [1, optim.epochs={plan.epochs}] epochs")
        if not a.reduction_factor > 1:
            problems.append(f"{at} asha.reduction_factor must be > 1, got {a.reduction_factor}")
        if a.brackets < 1:
            problems.append(f"{at} asha.brackets must be >= 1, got {a.brackets}")
    if r.num_workers < 1:
        problems.append(f"{at} resources.num_workers must be >= 1, got {r.num_workers}")
    if not r.cpus_per_worker > 0:
        problems.append(f"{at} resources.cpus_per_worker must be > 0, got {r.cpus_per_worker}")
    if r.gpus_per_worker < 0:
        problems.append(f"{at} resources.gpus_per_worker must be >= 0, got {r.gpus_per_worker}")
    for key in ("cpus", "gpus"):
        value = getattr(plan.spec.cluster, key)
        if value is not None and value < 0:
            problems.append(f"{at} cluster.{key} must be >= 0 or null (ask Ray), got {value}")
    if o.mode not in ("max", "min"):
        problems.append(f"{at} objective.mode={o.mode!r} is not one of ['max', 'min']")
    if o.score not in SCORES:
        problems.append(f"{at} objective.score={o.score!r} is not one of {list(SCORES)}")
    if o.protocol not in OBJECTIVE_PROTOCOLS:
        problems.append(f"{at} objective.protocol={o.protocol!r} is not one of {list(OBJECTIVE_PROTOCOLS)}")
    if o.evaluate not in OBJECTIVE_EPOCHS:
        problems.append(f"{at} objective.evaluate={o.evaluate!r} is not one of {list(OBJECTIVE_EPOCHS)}")
    elif o.evaluate == "last_epoch" and a.enabled:
        problems.append(f"{at} objective.evaluate=last_epoch needs asha.enabled=false: ASHA compares trials by the "
                        "objective at its rungs")
    if not o.label:
        problems.append(f"{at} objective.label is empty; name the manifest column the probe predicts (e.g. moa)")
    unknown = [n for n in o.manifests if n not in plan.base.eval.manifests]
    if unknown:
        problems.append(f"{at} objective.manifests names {unknown}, which are not in eval.manifests "
                        f"{sorted(plan.base.eval.manifests)}")
    metrics = reported_metrics(plan)
    if o.metric not in metrics:
        problems.append(f"{at} objective.metric={o.metric!r} is not a reported metric; one of {metrics}")
    return problems


def recorded_fingerprint(plan: SweepPlan) -> dict | None:
    """The fingerprint recorded in the sweep's folder by an earlier run (None on a first run)."""
    from cellfm.storage import filesystem_of

    fs, path = filesystem_of(f"{plan.sweep_dir}/{SWEEP_RECORD}", plan.base.data.storage_options)
    try:
        with fs.open_input_stream(path) as stream:
            return json.loads(stream.read().decode())
    except FileNotFoundError:
        return None


def recorded_sweep_problems(plan: SweepPlan) -> list[str]:
    """A sweep's folder holding another sweep of the same name: resuming it with this file would mix the two."""
    recorded = recorded_fingerprint(plan)
    if recorded is None:
        return []
    changed = _differences(recorded, json.loads(json.dumps(plan.fingerprint(), default=str)))
    if not changed:
        return []
    return [f"{plan.source}: name={plan.spec.name!r}: {plan.sweep_dir} holds another sweep of this name (it differs "
            f"in {', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}); give this one another name (--name) "
            f"or remove that folder"]


def _differences(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def reported_metrics(plan: SweepPlan) -> list[str]:
    """The metrics a trial reports that the sweep can optimize."""
    return ["objective", *(f"objective/{name}" for name in plan.objective_manifests()), "loss", "images_per_s"]


def trial_config_problems(plan: SweepPlan) -> list[str]:
    """Every trial config `plan.checked_points()` yields, against the config rules, the manifests and
    whether each swept key applies. A problem every trial config has is reported once without a trial."""
    manifests: dict[str, object] = {}
    problems: list[str] = []

    def manifest(key: str, path: str):
        """The checked manifest at `path` (loaded once), or None with its problems added."""
        if path not in manifests:
            manifests[path] = None
            problem = path_problem(key, path)
            if problem:
                problems.append(problem)
            else:
                manifests[path], errors = load_checked_manifest(path, plan.base.data.storage_options or None)
                problems.extend(f"{key}={path}: {line}" for line in errors)
        return manifests[path]

    objective = plan.objective_manifests()
    seen: dict[str, tuple[str, int]] = {}
    n_configs = 0
    for arm_name, values in plan.checked_points():
        n_configs += 1
        context = describe_trial(arm_name, values)
        try:
            cfg = plan.trial_config(arm_name, values, run_name="preflight")
        except ConfigError as exc:
            problems += [line for line in exc.problems if line not in problems]
            continue
        cfg.eval.labels = [plan.spec.objective.label]
        lines = config_problems(cfg) + model_size_problems(cfg)
        if cfg.data.crop_mode == "cells":  # the in-trial objective embeds whole held-out fields
            lines.append("data.crop_mode=cells: a sweep's objective scores whole fields, not the cells the trials "
                         "would train on; sweep with data.crop_mode=field")
        lines += [f"{plan.arm(arm_name).dimension(key).where}: {key} does not apply to trials with "
                  f"model.name={cfg.model.name}, ssl.objective={cfg.ssl.objective}, ssl.mcd={str(cfg.ssl.mcd).lower()}; "
                  f"it needs {APPLIES_TO[key][1]}"
                  for key in values if key in APPLIES_TO and not APPLIES_TO[key][0](cfg)]
        train = manifest("data.train_manifest", cfg.data.train_manifest)
        trained = cfg
        if train is not None:
            lines += training_input_problems(cfg, train)
            trained = _with_channel_metadata(cfg, train)
        for name, path in objective.items():
            held_out = manifest(f"eval.manifests.{name}", path)
            if held_out is not None:
                lines += evaluation_manifest_problems(cfg, held_out, f"eval.manifests.{name}={path}", trained)
                if plan.spec.objective.protocol in PLATE_PROTOCOLS:
                    problem = one_plate_problem(held_out, f"eval.manifests.{name}={path}",
                                                f"objective.protocol={plan.spec.objective.protocol}")
                    lines += [problem] if problem else []
        for line in lines:
            first, count = seen.get(line, (context, 0))
            seen[line] = (first, count + 1)
    for line, (context, count) in seen.items():
        if count == n_configs:
            problems.append(f"{plan.source}: {line}")
        else:
            more = f" [and {count - 1} more trial config(s)]" if count > 1 else ""
            problems.append(f"{plan.source} ({context}): {line}{more}")
    return problems


def _with_channel_metadata(cfg: Config, manifest) -> Config:
    """The trial's config as its run saves it: channel groups / vocabulary filled from the training manifest."""
    from cellfm.train.inputs import record_channel_metadata

    trained = copy.deepcopy(cfg)
    try:
        record_channel_metadata(trained, manifest)
    except ConfigError:
        pass  # training_input_problems reports it
    return trained


def trial_resources(plan: SweepPlan, capacity: ClusterCapacity) -> tuple[TrialResources, list[str]]:
    """What a trial takes and how many fit at once, with a problem line when a trial cannot get its
    resources (it would wait forever) or `search.max_concurrent_trials` asks for more than fit.

    The trials' placement groups (workers) and drivers must leave `data_cpus` unreserved: Ray Data's tasks
    run outside them (reads at data.read_cpus each, the conversion of each manifest block at a whole CPU),
    and with less free they wait forever, silently (measured with Ray 2.60 on 2 CPUs)."""
    r, s = plan.spec.resources, plan.spec.search
    data_cpus = max(1.0, plan.base.data.read_cpus)
    cpus = r.num_workers * r.cpus_per_worker + TRIAL_DRIVER_CPUS
    gpus = r.num_workers * r.gpus_per_worker
    fits = max(0, math.floor((capacity.cpus - data_cpus + 1e-9) / cpus))
    if gpus > 0:
        fits = min(fits, math.floor((capacity.gpus + 1e-9) / gpus))
    at = f"{plan.source}:"
    problems = []
    if cpus + data_cpus > capacity.cpus + 1e-9:
        problems.append(f"{at} resources: a trial needs {cpus + data_cpus:g} CPUs (resources.num_workers={r.num_workers} x "
                        f"resources.cpus_per_worker={r.cpus_per_worker:g} + {TRIAL_DRIVER_CPUS:g} for its driver + "
                        f"{data_cpus:g} left to Ray Data) but {capacity.described} has {capacity.cpus:g}")
    if gpus > capacity.gpus + 1e-9:
        problems.append(f"{at} resources: a trial needs {gpus:g} GPUs (resources.num_workers={r.num_workers} x "
                        f"resources.gpus_per_worker={r.gpus_per_worker:g}) but {capacity.described} has {capacity.gpus:g}")
    if not problems and s.max_concurrent_trials > fits:
        problems.append(f"{at} search.max_concurrent_trials={s.max_concurrent_trials}: trials at once take "
                        f"{cpus:g} CPUs{f' and {gpus:g} GPUs' if gpus else ''} each and must leave {data_cpus:g} CPU "
                        f"to Ray Data; {capacity.described} ({capacity.cpus:g} CPUs, {capacity.gpus:g} GPUs) fits "
                        f"{fits}: set it to <= {fits} (or 0: as many as fit)")
    concurrent = min(s.max_concurrent_trials or fits, plan.grid_size() or fits)
    return TrialResources(cpus, gpus, data_cpus, max(1, concurrent)), problems


def cluster_capacity(plan: SweepPlan) -> ClusterCapacity:
    """The cluster's CPUs and GPUs: the sweep file's `cluster` where set; else, for a given address
    (`cellfm.runtime.cluster_address`), what that running cluster reports (this connects to it); else the embedded
    Ray's ray.num_cpus and this machine's GPUs. Starts no Ray of its own."""
    c = plan.spec.cluster
    if c.cpus is not None and c.gpus is not None:
        return ClusterCapacity(c.cpus, c.gpus, "the sweep's cluster (cluster.cpus/gpus)")
    address = cluster_address(plan.base.ray)
    if address:
        import ray

        from cellfm.runtime import init_ray

        init_ray(dataclasses.replace(plan.base.ray, address=address), watch_pending=False)  # as the sweep driver
        total = ray.cluster_resources()
        cpus, gpus, described = total.get("CPU", 0.0), total.get("GPU", 0.0), f"the Ray cluster at {address}"
    else:
        cpus, gpus = plan.base.ray.num_cpus, local_gpu_count()
        described = f"the embedded Ray (ray.num_cpus={cpus}, {gpus} local GPU(s))"
    return ClusterCapacity(c.cpus if c.cpus is not None else cpus, c.gpus if c.gpus is not None else gpus, described)
