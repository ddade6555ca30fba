"""What a finished sweep leaves in its folder:

    results.parquet, results.md   one row per trial, sorted by the objective: its arm and swept values, the
                                  objective (and per held-out set), SSL loss, images/s, forward GFLOPs per
                                  image, epochs trained, status (completed | stopped early | error | not
                                  started), checkpoint and run folder
    best.yaml                     the best trial's config, ready to run (`cellfm pretrain --config best.yaml`;
                                  credentials redacted), its run named `<sweep>-best` under the base config's
                                  storage
    best.json                     the best trial: id, values, objective, checkpoint
    objective_vs_dimensions.png   the objective against each swept dimension
    objective_vs_flops.png        the objective against forward FLOPs per image

The best trial is the best completed one (a trial ASHA stopped was worse at a rung than its peers, and its
checkpoint is a partly trained model); only when none completed, the best of all. Stopped trials' run folders
get a STOPPED_EARLY.json (asha.stopped_runs=mark) or are deleted (remove).
"""

from __future__ import annotations

import io
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellfm.config import save_config
from cellfm.tune.search import TIME_ATTR
from cellfm.tune.sweep_config import SweepPlan, describe_trial

COMPLETED, STOPPED, ERROR, NOT_STARTED = "completed", "stopped early", "error", "not started"
STOPPED_MARKER = "STOPPED_EARLY.json"
CONTINUOUS_KINDS = ("uniform", "loguniform")  # dimensions plotted on a numeric axis


@dataclass(frozen=True)
class TrialRecord:
    """What Tune knows of one trial at the end of the sweep."""

    trial: str            # trial-<id>: its Tune folder and its Train run's name
    config: dict          # Tune's trial config
    metrics: dict         # its last reported metrics ({} if none)
    error: str | None     # why it failed, if it did


def results_table(plan: SweepPlan, records: list[TrialRecord]) -> pd.DataFrame:
    """One row per trial, sorted by `objective.metric` (best first; trials without it last), ranked 1..n."""
    sets = [f"objective/{name}" for name in plan.objective_manifests()]
    rows = []
    for record in records:
        arm, values = plan.values_of(record.config)
        m = record.metrics
        done = int(m.get(TIME_ATTR, 0))
        status = (ERROR if record.error else COMPLETED if done >= plan.epochs else STOPPED if done else NOT_STARTED)
        row: dict[str, Any] = {"trial": record.trial}
        if len(plan.arms) > 1:
            row["arm"] = arm
        row.update({key: values.get(key) for key in plan.swept_keys()})
        row.update({key: _number(m.get(key)) for key in ("objective", *sets, "loss", "images_per_s")})
        flops = _number(m.get("forward_flops_per_image"))
        row["gflops_per_image"] = flops / 1e9 if flops == flops else flops
        row.update(epochs=done, status=status, checkpoint=_uri(plan, m.get("checkpoint_path") or ""),
                   run=f"{plan.runs_dir}/{record.trial}", error=_last_line(record.error))
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    o = plan.spec.objective
    # Ties (and trials without the metric) in trial order, so the table is the same on every run.
    table = table.sort_values("trial", kind="stable").sort_values(
        o.metric, ascending=o.mode == "min", na_position="last", kind="stable")
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.reset_index(drop=True)


def best_row(table: pd.DataFrame, metric: str) -> pd.Series | None:
    """The best completed trial (the table is sorted), else the best with a value of `metric`."""
    for candidates in (table[(table["status"] == COMPLETED) & table[metric].notna()], table[table[metric].notna()]):
        if len(candidates):
            return candidates.iloc[0]
    return None


def write_outputs(plan: SweepPlan, table: pd.DataFrame, records: list[TrialRecord]) -> dict[str, str]:
    """Write the outputs (module docstring) into the sweep's folder, each file whole; returns name -> path."""
    from cellfm.storage import join, write_file

    metric = plan.spec.objective.metric
    best = best_row(table, metric) if len(table) else None
    best_values: tuple[str, dict] = ("", {})
    files: dict[str, bytes] = {}
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    files["results.parquet"] = buffer.getvalue()
    if best is not None:
        record = next(r for r in records if r.trial == best["trial"])
        arm, values = best_values = plan.values_of(record.config)
        cfg = plan.trial_config(arm, values, run_name=f"{plan.spec.name}-best")
        cfg.train.storage_path = plan.base.train.storage_path
        with tempfile.TemporaryDirectory() as tmp:
            files["best.yaml"] = save_config(cfg, Path(tmp) / "best.yaml").read_bytes()
        files["best.json"] = json.dumps({
            "trial": best["trial"], "arm": arm, "values": values, "status": best["status"],
            metric: _json_number(best[metric]), "checkpoint": best["checkpoint"], "run": best["run"],
            "config": "best.yaml"}, indent=2, default=str).encode()
    files["objective_vs_dimensions.png"] = plot_dimensions(plan, table)
    files["objective_vs_flops.png"] = plot_flops(plan, table)
    files["results.md"] = markdown_results(plan, table, best, best_values).encode()
    for name, data in files.items():
        write_file(join(plan.sweep_dir, name), data, plan.base.data.storage_options)
    return {name: join(plan.sweep_dir, name) for name in files}


def mark_stopped(plan: SweepPlan, trial: str, epochs_done: int, value: Any) -> None:
    """Write STOPPED_EARLY.json (who stopped it, epochs trained, the objective then) into the run folder of a
    trial ASHA stopped. The sweep's driver does it as soon as the trial stops: a sweep restored from a state
    Tune saved before the stop then reports the trial as it was instead of training it on
    (`cellfm.tune.trial.last_report_if_done`)."""
    from cellfm.storage import filesystem_of, join, write_file

    run = join(plan.runs_dir, trial)
    fs, path = filesystem_of(run, plan.base.data.storage_options)
    if _exists(fs, path):
        write_file(join(run, STOPPED_MARKER), json.dumps({
            "stopped_by": "ASHA", "epochs_done": int(epochs_done), "epochs": plan.epochs,
            plan.spec.objective.metric: _json_number(value)}, indent=2), plan.base.data.storage_options)


def tidy_stopped_runs(plan: SweepPlan, table: pd.DataFrame) -> pd.DataFrame:
    """Mark (STOPPED_EARLY.json) or remove the run folders of the trials ASHA stopped; returns the table
    with the checkpoints of removed runs cleared."""
    from cellfm.storage import filesystem_of

    fs, runs = filesystem_of(plan.runs_dir, plan.base.data.storage_options)
    table = table.copy()
    for index, row in table[table["status"] == STOPPED].iterrows() if len(table) else ():
        if plan.spec.asha.stopped_runs == "remove":
            if _exists(fs, f"{runs}/{row['trial']}"):
                fs.delete_dir(f"{runs}/{row['trial']}")
            table.at[index, "checkpoint"] = ""
        else:
            mark_stopped(plan, row["trial"], row["epochs"], row[plan.spec.objective.metric])
    return table


def markdown_results(plan: SweepPlan, table: pd.DataFrame, best: pd.Series | None,
                     best_values: tuple[str, dict] = ("", {})) -> str:
    o = plan.spec.objective
    sets = ", ".join(plan.objective_manifests())
    counts = table["status"].value_counts().to_dict() if len(table) else {}
    probe = {"probe": f"mean over {plan.base.eval.n_splits} fixed splits of the wells",
             "per_plate_probe": "the probe within each plate, mean over plates",
             "lopo_probe": "leave one plate out, every well tested once"}[o.protocol]
    lines = [f"# Sweep `{plan.spec.name}`", "",
             f"Objective: `{o.metric}` ({o.mode}); `objective` = mean over the held-out sets ({sets}) of the "
             f"well-level logistic-regression {o.score} of `{o.label}` ({probe}), of each trial's teacher after its "
             "last epoch.", "",
             f"{len(table)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + "; "
             f"{plan.epochs} epochs each unless stopped early; search {plan.spec.search.algorithm}, "
             f"ASHA {'on' if plan.spec.asha.enabled else 'off'}.", ""]
    if best is not None:
        lines += [f"**Best:** `{best['trial']}` ({describe_trial(*best_values)}), "
                  f"{o.metric} {_fmt(best[o.metric])}; checkpoint `{best['checkpoint'] or '-'}`; config `best.yaml` "
                  f"(`cellfm pretrain --config best.yaml`).", ""]
    shown = [c for c in table.columns if c not in ("run", "error")] if len(table) else []
    lines += [markdown_table(table[shown]) if shown else "(no trials)", "",
              "![objective against each dimension](objective_vs_dimensions.png)", "",
              "![objective against forward FLOPs per image](objective_vs_flops.png)", ""]
    return "\n".join(lines)


def markdown_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rows = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, "|" + "---|" * len(frame.columns), *rows])


# ----------------------------------------------------------------------------------------- plots


def plot_dimensions(plan: SweepPlan, table: pd.DataFrame) -> bytes:
    """The objective against each swept dimension, as a PNG (`dimensions_figure`)."""
    return _png(dimensions_figure(plan, table))


def dimensions_figure(plan: SweepPlan, table: pd.DataFrame):
    """The objective against each swept dimension, one panel each; a point per trial that has the
    dimension (filled: completed, hollow: stopped early), coloured by arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = plan.swept_keys() or ["trial"]
    metric = plan.spec.objective.metric
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    kinds = {d.key: d.kind for arm in plan.arms for d in arm.dimensions}
    for ax, key in zip(axes[0], keys):
        rows = table[table[key].map(_present) & table[metric].notna()] if len(table) else table
        if kinds.get(key) in CONTINUOUS_KINDS:
            # Drawn floats on their own axis (log for loguniform), not one tick per distinct value.
            for arm, group in _by_arm(plan, rows):
                _scatter(ax, plan, arm, group[key].to_numpy(dtype=float), group, metric)
            if kinds[key] == "loguniform":
                ax.set_xscale("log")
        else:
            labels = sorted({_fmt(v) for v in rows[key]}, key=_natural) if len(rows) else []
            for arm, group in _by_arm(plan, rows):
                x = np.asarray([labels.index(_fmt(v)) for v in group[key]])
                _scatter(ax, plan, arm, x, group, metric)
            ax.set_xticks(range(len(labels)), labels, rotation=30 if any(len(s) > 6 for s in labels) else 0)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"sweep {plan.spec.name}: {metric} per trial (hollow: stopped early)", fontsize=10)
    return fig


def plot_flops(plan: SweepPlan, table: pd.DataFrame) -> bytes:
    """The objective against forward GFLOPs per image: the performance-computation trade-off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = plan.spec.objective.metric
    fig, ax = plt.subplots(figsize=(5.4, 3.8))
    rows = table[table[metric].notna() & table["gflops_per_image"].notna()] if len(table) else table
    for arm, group in _by_arm(plan, rows):
        _scatter(ax, plan, arm, group["gflops_per_image"].to_numpy(), group, metric)
    if len(rows) and rows["gflops_per_image"].max() > 10 * rows["gflops_per_image"].min() > 0:
        ax.set_xscale("log")
    ax.set_xlabel("forward GFLOPs per image (first held-out set)")
    ax.set_ylabel(metric)
    ax.set_title(f"sweep {plan.spec.name}: quality against cost (hollow: stopped early)", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _png(fig)


def _by_arm(plan: SweepPlan, rows: pd.DataFrame):
    """(arm, its rows): the table has an arm column only when the sweep has several arms."""
    return rows.groupby("arm") if "arm" in rows else [(plan.arms[0].name, rows)]


def _scatter(ax, plan: SweepPlan, arm: str, x: np.ndarray, group: pd.DataFrame, metric: str) -> None:
    """One arm's trials in its own colour (the same in every plot): completed filled, the others hollow."""
    color = f"C{[a.name for a in plan.arms].index(arm)}"
    completed = (group["status"] == COMPLETED).to_numpy()
    y = group[metric].to_numpy()
    ax.scatter(x[completed], y[completed], color=color, label=arm or None)
    ax.scatter(x[~completed], y[~completed], facecolors="none", edgecolors=color,
               label=f"{arm} (stopped early)" if arm and not completed.all() else None)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------- values


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _json_number(value: Any) -> float | None:
    return None if value is None or value != value else float(value)


def _present(value: Any) -> bool:
    """Whether a table cell holds a value (a trial of an arm without that dimension holds None / NaN)."""
    return not (value is None or (isinstance(value, float) and math.isnan(value)))


def _fmt(value: Any) -> str:
    if not _present(value):
        return "-"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    if isinstance(value, np.ndarray):
        value = value.tolist()
    return str(value)


def _natural(label: str):
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def _last_line(text: str | None) -> str:
    """The last line of an error (its exception and message)."""
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else ""


def _uri(plan: SweepPlan, path: str) -> str:
    """A checkpoint path as Tune reports it, as a URI (pyarrow paths on S3 carry no scheme)."""
    if path and "://" in plan.sweep_dir and "://" not in path:
        return f"s3://{path}"
    return path


def _exists(fs, path: str) -> bool:
    import pyarrow.fs

    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound
