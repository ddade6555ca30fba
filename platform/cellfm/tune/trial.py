"""One trial of a sweep: the Ray Tune function trainable that builds the trial's config and fits one
TorchTrainer (Train V2; `Tuner(trainer)` is not supported), its reports forwarded to Tune.

The trial's Train run is `<sweep>/runs/trial-<trial id>`: a name fixed by the trial id, so when a restored
sweep reruns an unfinished trial, Ray Train resumes that run from its latest checkpoint instead of starting
over. A run that had already trained every epoch (the sweep's driver died before Tune recorded the end)
is not trained again: its last report is sent to Tune as it is; nor is one ASHA had stopped (its run folder
holds STOPPED_EARLY.json, written by the driver the moment it stopped).
"""

from __future__ import annotations

from ray.tune.integration.ray_train import TuneReportCallback

from cellfm.config import Config
from cellfm.tune.objective import HeldOutObjective
from cellfm.tune.search import LAUNCH_EPOCHS_ATTR, TIME_ATTR
from cellfm.tune.sweep_config import SweepPlan

TRIAL_PREFIX = "trial-"


def trial_name(trial_id: str) -> str:
    """The name of a trial's Tune folder and of its Train run."""
    return f"{TRIAL_PREFIX}{trial_id}"


def trial_dirname(trial) -> str:
    """Tune's `trial_dirname_creator` / `trial_name_creator`: `trial-<id>`, the Train run's name too."""
    return trial_name(trial.trial_id)


class SweepReportCallback(TuneReportCallback):
    """Forwards rank 0's metrics of each epoch report that holds the objective to Tune (with the checkpoint path),
    adding `epochs_done` (ASHA's time: epochs trained, counting those of earlier attempts of a resumed run) and
    `epochs_this_launch` (epochs this trainable trained, every report counted: the sweep's ETA). An epoch the
    objective skipped (`objective.evaluate: last_epoch`) is not forwarded: Tune refuses a result without the
    metric it optimizes, and the Train run keeps that epoch's checkpoint for a resume anyway."""

    def __init__(self, objective: HeldOutObjective):
        super().__init__()
        self.objective = objective
        self.epochs_this_launch = 0

    def after_report(self, run_context, metrics, checkpoint):
        self.epochs_this_launch += 1
        if not self.objective.evaluates(metrics[0]["epoch"]):
            return
        first = {**metrics[0], TIME_ATTR: metrics[0]["epoch"] + 1, LAUNCH_EPOCHS_ATTR: self.epochs_this_launch}
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def run_trial(tune_config: dict, plan: SweepPlan, held_out) -> None:
    """Tune's trainable (wrapped with `tune.with_parameters(plan=..., held_out=<ObjectRef of the held-out
    fields>)`): the trial's config from `tune_config`, then its Train run with the objective evaluated by
    rank 0 at every epoch."""
    import ray.data
    from ray import tune

    from cellfm.train.trainer import run_pretraining

    # As in the sweep's driver (cellfm.runtime.init_ray): progress lines, not Ray Data's bars, in a trial's output.
    ray.data.DataContext.get_current().enable_progress_bars = False
    arm, values = plan.values_of(tune_config)
    cfg = plan.trial_config(arm, values, run_name=trial_name(tune.get_context().get_trial_id()))
    done = last_report_if_done(cfg)
    if done is not None:
        tune.report(done)
        return
    o = plan.spec.objective
    objective = HeldOutObjective(held_out, cfg, label=o.label, score=o.score, protocol=o.protocol,
                                 evaluate=o.evaluate)
    run_pretraining(cfg, callbacks=[SweepReportCallback(objective)], epoch_evaluator=objective)


def last_report_if_done(cfg: Config) -> dict | None:
    """The last report of the trial's Train run (with `epochs_done` and `checkpoint_path`, as
    `SweepReportCallback` forwards it) when the run is done: it trained all `optim.epochs`, or ASHA stopped
    it (STOPPED_EARLY.json). None when there is more to train (or nothing yet)."""
    import pyarrow.fs
    from ray.train import Result

    from cellfm.storage import filesystem_of, run_directory
    from cellfm.tune.results import STOPPED_MARKER

    fs, path = filesystem_of(run_directory(cfg), cfg.data.storage_options)
    try:
        result = Result.from_path(path, storage_filesystem=fs)
    except RuntimeError:  # no such run, or it never reported
        return None
    metrics = dict(result.metrics or {})
    if "epoch" not in metrics or result.checkpoint is None:
        return None
    stopped = fs.get_file_info(f"{path}/{STOPPED_MARKER}").type != pyarrow.fs.FileType.NotFound
    if metrics["epoch"] + 1 < cfg.optim.epochs and not stopped:
        return None
    return {**metrics, TIME_ATTR: metrics["epoch"] + 1, "checkpoint_path": result.checkpoint.path}
