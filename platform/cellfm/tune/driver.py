"""The sweep's driver: start (or restore) the Ray Tune experiment of a checked sweep plan, show progress,
and write the outputs (`cellfm.tune.results`).

The Tune experiment lives in the sweep's folder (`<storage>/<name>`, local or s3://), the trials' Train runs
under its `runs/`. Running the same sweep again finds Tune's state there and restores it
(`Tuner.restore(..., resume_unfinished=True, resume_errored=True)`): finished trials keep their results,
unfinished ones run again and their Train runs resume from their latest checkpoints (the run names come
from the trial ids). `sweep.json` beside it records what the sweep is, so a changed sweep file is refused
(by the preflight) instead of being mixed into the old one.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from ray.tune import Callback

from cellfm.progress import eta_seconds, format_duration, log_line
from cellfm.tune.preflight import TRIAL_DRIVER_CPUS, TrialResources, recorded_fingerprint
from cellfm.tune.search import LAUNCH_EPOCHS_ATTR, TIME_ATTR
from cellfm.tune.sweep_config import SWEEP_RECORD, SweepPlan, describe_trial
from cellfm.tune.trial import trial_name

@dataclass
class SweepOutcome:
    table: object           # pandas DataFrame, cellfm.tune.results.results_table
    outputs: dict[str, str]  # output name -> path or URI
    restored: bool
    seconds: float


def run_sweep(plan: SweepPlan, resources: TrialResources) -> SweepOutcome:
    """Run (or resume) the sweep to the end and write its outputs."""
    import ray
    from ray import tune

    from cellfm.runtime import init_ray
    from cellfm.storage import filesystem_of, is_remote
    from cellfm.tune.objective import read_held_out
    from cellfm.tune.results import TrialRecord, results_table, tidy_stopped_runs, write_outputs
    from cellfm.tune.search import param_space, scheduler, search_algorithm
    from cellfm.tune.trial import run_trial, trial_dirname

    started = time.perf_counter()
    options = plan.base.data.storage_options
    record_sweep(plan)
    # Trials read the configs' relative paths from the working directory, as every other job does (Tune
    # would otherwise move each trial into its own folder); Tune passes the variable on to the trials.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    # No pending watch: Ray Tune's queued trials wait for placement groups by design (the sweep's
    # preflight fits max_concurrent_trials to the cluster).
    init_ray(plan.base.ray, dashboard=True, watch_pending=False)
    log_line(f"sweep {plan.spec.name}: reading the held-out sets {', '.join(plan.objective_manifests())}")
    held_out = read_held_out(plan.base, plan.objective_manifests(), plan.spec.objective.label)
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan, held_out=ray.put(held_out)),
                                    {"cpu": TRIAL_DRIVER_CPUS})
    # Tune takes a local storage path as it is, an S3 one as a path on the pyarrow filesystem it is given.
    storage_fs, storage_path = filesystem_of(plan.spec.storage, options)
    tune_fs = storage_fs if is_remote(plan.spec.storage) else None
    experiment = f"{storage_path}/{plan.spec.name}"
    restored = tune.Tuner.can_restore(experiment, storage_filesystem=tune_fs)
    if restored:
        log_line(f"sweep {plan.spec.name}: restoring {plan.sweep_dir} (finished trials are kept, unfinished ones resume)")
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=tune_fs)
    else:
        o = plan.spec.objective
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(plan),
            tune_config=tune.TuneConfig(
                metric=o.metric, mode=o.mode, search_alg=search_algorithm(plan, resources.concurrent), scheduler=scheduler(plan),
                num_samples=plan.spec.search.num_samples, max_concurrent_trials=resources.concurrent,
                trial_name_creator=trial_dirname, trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(name=plan.spec.name, storage_path=storage_path, storage_filesystem=tune_fs,
                                      callbacks=[SweepProgress(plan)], verbose=0),
        )
    log_line(f"sweep {plan.spec.name}: {plan.grid_size()} trials, up to {resources.concurrent} at once "
         f"({resources.cpus:g} CPUs{f', {resources.gpus:g} GPUs' if resources.gpus else ''} each, "
         f"{resources.data_cpus:g} left to Ray Data), {plan.epochs} epochs each, folder {plan.sweep_dir}")
    grid = tuner.fit()
    records = [TrialRecord(trial=_trial_of(result), config=result.config or {}, metrics=result.metrics or {},
                           error=str(result.error) if result.error else None) for result in grid]
    table = tidy_stopped_runs(plan, results_table(plan, records))
    outputs = write_outputs(plan, table, records)
    return SweepOutcome(table, outputs, restored, time.perf_counter() - started)


def record_sweep(plan: SweepPlan) -> None:
    """Record what the sweep is (`sweep.json`, its fingerprint) in its folder, unless it is there already
    (`cellfm.tune.preflight.recorded_sweep_problems` refuses a changed sweep before this runs)."""
    from cellfm.storage import join, write_file

    if recorded_fingerprint(plan) is None:
        write_file(join(plan.sweep_dir, SWEEP_RECORD), json.dumps(plan.fingerprint(), indent=2, default=str),
                   plan.base.data.storage_options)


def _trial_of(result) -> str:
    return str(result.path).rstrip("/").rsplit("/", 1)[-1]



def stopped_early_count(trials, epochs: int) -> int:
    """Trials that ended before `epochs` without an error (ASHA stopped them), read from each trial's last
    result, so a restored sweep counts those stopped in an earlier session too."""
    return sum(t.status == "TERMINATED" and int((t.last_result or {}).get(TIME_ATTR, 0)) < epochs for t in trials)


class SweepProgress(Callback):
    """Progress lines of the sweep (Tune's own tables are off): each trial's start, each epoch's objective,
    each trial's end (completed / stopped early / error), with trials done, the best so far and an ETA from
    the epochs left at this session's rate. Marks a stopped trial's run folder the moment ASHA stops it."""

    def __init__(self, plan: SweepPlan):
        self.plan = plan
        self.setup()

    def setup(self, *args, **kwargs) -> None:
        self.started = time.monotonic()
        self.epochs_done: dict[str, int] = {}     # trial id -> epochs trained (as reported)
        self.epochs_launched: dict[str, int] = {}  # trial id -> epochs trained since this session started it
        self.epochs_this_session = 0
        self.best: tuple[float, str] | None = None

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        log_line(f"sweep {self.plan.spec.name}: {trial_name(trial.trial_id)} started ({self._describe(trial)})")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        done = int(result.get(TIME_ATTR, 0))
        # Counted from the trial's own tally: with objective.evaluate=last_epoch one report stands for every
        # epoch of the budget, and a trial a resumed sweep only re-reports trained none now.
        launched = int(result.get(LAUNCH_EPOCHS_ATTR, 0))
        self.epochs_this_session += max(0, launched - self.epochs_launched.get(trial.trial_id, 0))
        self.epochs_launched[trial.trial_id] = launched
        self.epochs_done[trial.trial_id] = done
        o = self.plan.spec.objective
        value = result.get(o.metric)
        if isinstance(value, (int, float)) and (self.best is None or (value > self.best[0]) == (o.mode == "max")):
            self.best = (float(value), trial_name(trial.trial_id))
        log_line(f"sweep {self.plan.spec.name}: {trial_name(trial.trial_id)} epoch {done}/{self.plan.epochs} "
             f"{o.metric} {_number(value)} (loss {_number(result.get('loss'))}, "
             f"{_number(result.get('images_per_s'))} images/s) | {self._status(trials)}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        from cellfm.tune.results import mark_stopped

        done = self.epochs_done.get(trial.trial_id, 0)
        status = "completed" if done >= self.plan.epochs else f"stopped early by ASHA after epoch {done}"
        if done < self.plan.epochs:
            mark_stopped(self.plan, trial_name(trial.trial_id), done, (trial.last_result or {}).get(
                self.plan.spec.objective.metric))
        log_line(f"sweep {self.plan.spec.name}: {trial_name(trial.trial_id)} {status} | {self._status(trials)}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        log_line(f"sweep {self.plan.spec.name}: {trial_name(trial.trial_id)} failed (see its error in results.md) | "
             f"{self._status(trials)}")

    def _describe(self, trial) -> str:
        return describe_trial(*self.plan.values_of(trial.config))

    def _status(self, trials) -> str:
        total = max(self.plan.grid_size(), len(trials))
        finished = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        stopped = stopped_early_count(trials, self.plan.epochs)
        epochs_left = sum(self.plan.epochs - self.epochs_done.get(t.trial_id, 0)
                          for t in trials if t.status not in ("TERMINATED", "ERROR"))
        epochs_left += (total - len(trials)) * self.plan.epochs
        eta = eta_seconds(self.epochs_this_session, self.epochs_this_session + epochs_left,
                          time.monotonic() - self.started)
        best = f", best {self.best[0]:.4f} ({self.best[1]})" if self.best else ""
        return (f"{finished}/{total} trials done ({stopped} stopped early){best} | "
                f"elapsed {format_duration(time.monotonic() - self.started)}, ETA {format_duration(eta)}")


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"
