"""The evaluation report, rendered from the report dict alone (so a saved report.json can be
re-rendered): report.json, report.md and PNG plots — per channel configuration a 2-D map of the well
embeddings coloured by MoA and by plate, and the best model's MoA confusion matrix on held-out
compounds; per headline metric a bar chart across models, channel configurations side by side.

The report dict: run-level settings (`cellfm.evaluate.protocols.evaluation_settings`, with
`metric_titles`) and `results`: {channel configuration: a block of `evaluate_features`, plus
`manifest` and `channels`}.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from cellfm.evaluate.protocols import PER_LABEL_PROTOCOLS
from cellfm.storage import replacing, write_file

# Fixed colours for the baselines so they read the same in every chart; models get tab10 colours.
BASELINE_COLOURS = {"random_init": "#9e9e9e", "intensity_stats": "#c9a66b"}
CONTROL_COLOUR = "#bdbdbd"
DOCS = "docs/evaluation.md"
READOUT_TEXT = {"pooled": "each encoder's one embedding of all channels (CLS + mean patch token)",
                "per_channel": "per channel (each channel embedded alone, CLS + mean patch token, concatenated in "
                               "channel order), for every encoder"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
    finally:
        _pyplot().close(fig)


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _models(report: dict) -> list[str]:
    """Models in report order (every block holds the same models)."""
    return next(iter(report["results"].values()))["models"]


def _metric_keys(report: dict, computed_only: bool = False) -> list[str]:
    """Headline metrics in report order; `computed_only`: those with a value for some model somewhere."""
    keys = list(report["metric_titles"])
    if computed_only:
        keys = [k for k in keys if any(block["metrics"][m].get(k) is not None
                                       for block in report["results"].values() for m in block["models"])]
    return keys


def _value(block: dict, model: str, key: str, with_spread: bool = True) -> str:
    value = block["metrics"][model].get(key)
    if value is None:
        return "n/a"
    spread = block["spread"][model].get(key)
    return f"{value:.3f} ± {spread:.3f}" if with_spread and spread is not None else f"{value:.3f}"


def _skipped(block: dict) -> list[str]:
    """'protocol: reason' for every protocol the data could not support (same for every model)."""
    details = block["details"][block["models"][0]]
    out = []
    for protocol, result in details.items():
        parts = result.items() if protocol in PER_LABEL_PROTOCOLS and "skipped" not in result else [(None, result)]
        out += [f"{protocol}{f' ({label})' if label else ''}: {r['skipped']}" for label, r in parts if "skipped" in r]
    return out


def _store_lines(report: dict) -> list[str]:
    """Where the features came from when they were read from the feature store (eval.from_store)."""
    source = report.get("feature_store")
    if not source:
        return []
    keys = ", ".join(f"`{model}`: `{key}`" for model, key in source["keys"].items())
    return [f"Features read from the feature store `{source['store']}` (well variable `{source['variable']}`; "
            f"keys {keys}), not embedded for this report.", ""]


def markdown_report(report: dict) -> str:
    models = _models(report)
    trained = [m for m in models if m not in report.get("baselines", [])]
    checkpoints = report.get("checkpoints", {})
    normalized = ", normalized per plate to its negative controls" if report["well_normalization"] == "negcon" else ""
    lines = ["# cellfm evaluation", "",
             "Models: " + ", ".join(f"`{m}`" + (f" (`{checkpoints[m]}`)" if m in checkpoints else "") for m in trained)
             + "; baselines: " + (", ".join(f"`{m}`" for m in models if m not in trained) or "none") + ".", "",
             *_store_lines(report),
             f"Features: {READOUT_TEXT[report.get('channel_readout', 'pooled')]}. "
             f"Wells: mean over fields{normalized}. "
             f"Fixed-split probe: {len(report['split_seeds'])} stratified well splits (test fraction "
             f"{report['test_fraction']}); compound-held-out probes: {len(report['compound_split_seeds'])} splits; "
             f"copairs null size {report['copairs']['null_size']}, corrected p < {report['copairs']['threshold']}. "
             f"Mean ± sd over splits where there are splits; the per-plate and leave-one-plate-out probes give ± their "
             f"standard error (over plates, over wells). Protocols and how to read the plots: `{DOCS}`.", ""]
    for name, block in report["results"].items():
        fields = f", {block['n_fields']} fields" if block.get("n_fields") else ""
        lines += [f"## {name}: `{block['manifest']}`", "",
                  f"Channels: {', '.join(block['channels'])}; {block['n_wells']} wells on {block['n_plates']} "
                  f"plate(s){fields}.", "",
                  "| metric | " + " | ".join(models) + " | chance |", "|---" * (len(models) + 2) + "|"]
        for key in _metric_keys(report):
            chance = block["chance"].get(key)
            lines.append(f"| {report['metric_titles'][key]} | " + " | ".join(_value(block, m, key) for m in models)
                         + f" | {'' if chance is None else f'{chance:.3f}'} |")
        skipped = _skipped(block)
        if skipped:
            lines += ["", "Not computed: " + "; ".join(skipped) + "."]
        lines += ["", f"![2-D map of well embeddings, {name}](map_{_file_name(name)}.png)", ""]
        if block.get("best_model"):
            lines += [f"![MoA confusion matrix of {block['best_model']}, {name}](confusion_{_file_name(name)}.png)", ""]
    lines += ["## Metrics across models", ""]
    lines += [f"![{report['metric_titles'][key]}](metric_{key}.png)"
              for key in _metric_keys(report, computed_only=True)]
    return "\n".join(lines) + "\n"


def summary_lines(report: dict) -> list[str]:
    """A compact table per channel configuration: one row per computed headline metric, one column per model."""
    models = _models(report)
    keys = _metric_keys(report, computed_only=True)
    width = max(len(k) for k in keys)
    columns = {m: max(15, len(m)) for m in models}
    lines = []
    for name, block in report["results"].items():
        lines.append(f"{name} ({','.join(block['channels'])}; {block['n_wells']} wells, {block['n_plates']} plates)")
        lines.append(f"  {'metric':<{width}}  " + "  ".join(f"{m:>{columns[m]}}" for m in models))
        for key in keys:
            lines.append(f"  {key:<{width}}  " + "  ".join(f"{_value(block, m, key):>{columns[m]}}" for m in models))
    return lines


def _colours(models: list[str]) -> dict[str, str]:
    import matplotlib

    palette = iter(matplotlib.colormaps["tab10"].colors)
    return {m: BASELINE_COLOURS.get(m) or matplotlib.colors.to_hex(next(palette)) for m in models}


def _category_colours(values: list[str]) -> dict[str, str]:
    import matplotlib

    names = [v for v in sorted(set(values)) if v != "control"]
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    colours = {v: matplotlib.colors.to_hex(cmap(i % cmap.N)) for i, v in enumerate(names)}
    return {**colours, "control": CONTROL_COLOUR} if "control" in values else colours


def plot_embedding_map(block: dict, name: str, path: Path) -> None:
    """Rows: models; columns: wells coloured by MoA (mechanism separates?) and by plate (do plates
    separate? then the embedding carries batch effects)."""
    plt = _pyplot()
    models, wells = block["models"], block["map"]["wells"]
    fig, axes = plt.subplots(len(models), 2, figsize=(10.5, 3.6 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        projection = block["map"]["coordinates"][model]
        xy = np.asarray(projection["xy"])
        for col, by in enumerate(("moa", "plate")):
            ax, values = axes[row, col], wells[by]
            colours = _category_colours(values)
            for value, colour in colours.items():
                mask = np.array([v == value for v in values])
                ax.scatter(xy[mask, 0], xy[mask, 1], s=16, c=colour, label=value, alpha=0.85, edgecolors="none")
            variance = projection.get("explained_variance_ratio")
            axis = "PC" if projection["method"] == "pca" else "UMAP "
            ax.set_xlabel(f"{axis}1" + (f" ({variance[0]:.0%})" if variance else ""))
            ax.set_ylabel(f"{axis}2" + (f" ({variance[1]:.0%})" if variance and len(variance) > 1 else ""))
            ax.set_title(f"{model}: by {'MoA' if by == 'moa' else 'plate'}", fontsize=10)
            ax.tick_params(labelsize=7)
            if row == 0:
                ax.legend(fontsize=7, markerscale=1.2, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle(f"{name}: well embeddings ({block['map']['coordinates'][models[0]]['method'].upper()})", y=1.0)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_metric(report: dict, key: str, path: Path) -> None:
    """One headline metric: groups = channel configurations, bars = models (sd over splits as error
    bars where the protocol has splits), a black tick at chance level where it is defined."""
    plt = _pyplot()
    models, names = _models(report), list(report["results"])
    colours = _colours(models)
    width = 0.8 / len(models)
    labelled: set[str] = set()
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names) * max(len(models), 2) / 2, 3.6))
    for i, model in enumerate(models):
        for j, name in enumerate(names):
            block = report["results"][name]
            value = block["metrics"][model].get(key)
            x = j + (i - (len(models) - 1) / 2) * width
            if value is None:
                ax.text(x, 0.02, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
                continue
            spread = block["spread"][model].get(key)
            bar = ax.bar(x, value, width, yerr=spread, capsize=2, color=colours[model],
                         label=None if model in labelled else model)
            labelled.add(model)
            ax.bar_label(bar, fmt="%.2f", fontsize=7, padding=2)
    for j, name in enumerate(names):
        chance = report["results"][name]["chance"].get(key)
        if chance is not None:
            ax.hlines(chance, j - 0.45, j + 0.45, colors="k", linestyles="--", linewidth=1,
                      label="chance" if j == 0 else None)
    ax.set_xticks(range(len(names)), [f"{n}\n({len(report['results'][n]['channels'])} ch)" for n in names])
    ax.set_ylim(0, 1.08)
    ax.set_title(report["metric_titles"][key], fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_confusion(block: dict, name: str, path: Path) -> None:
    """The best model's MoA predictions on held-out compounds, summed over splits; rows (truth) are
    normalized to 1, cells show the well counts."""
    plt = _pyplot()
    model = block["best_model"]
    confusion = block["details"][model]["compound_heldout"]["confusion"]
    counts = np.asarray(confusion["counts"], dtype=float)
    tested = counts.sum(axis=1) > 0  # MoAs with a single compound are never tested
    classes = confusion["classes"]
    rows = counts[tested] / counts[tested].sum(axis=1, keepdims=True)
    fig, ax = plt.subplots(figsize=(1.6 + 0.75 * len(classes), 1.4 + 0.55 * int(tested.sum())))
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for (r, c), value in np.ndenumerate(rows):
        ax.text(c, r, f"{int(counts[tested][r, c])}", ha="center", va="center", fontsize=8,
                color="white" if value > 0.6 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(int(tested.sum())), [c for c, t in zip(classes, tested) if t], fontsize=8)
    ax.set_xlabel("predicted MoA")
    ax.set_ylabel("true MoA (held-out compounds)")
    top1 = block["metrics"][model]["heldout_moa_top1"]
    n_splits = len(block["details"][model]["compound_heldout"]["top1_per_split"])
    ax.set_title(f"{name}: {model}, top-1 {top1:.2f} (wells of {n_splits} splits)", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.04, label="fraction of the row's wells")
    fig.tight_layout()
    _save_figure(fig, path)


def write_report(report: dict, output_dir: str | Path) -> dict[str, Path]:
    """Write every file (each atomically); returns {name: path} for report.json, report.md and each PNG."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    write_file(paths["json"], json.dumps(report, indent=1))
    write_file(paths["markdown"], markdown_report(report))
    for name, block in report["results"].items():
        paths[f"map_{name}"] = out / f"map_{_file_name(name)}.png"
        plot_embedding_map(block, name, paths[f"map_{name}"])
        if block.get("best_model"):
            paths[f"confusion_{name}"] = out / f"confusion_{_file_name(name)}.png"
            plot_confusion(block, name, paths[f"confusion_{name}"])
    for key in _metric_keys(report, computed_only=True):
        paths[f"metric_{key}"] = out / f"metric_{key}.png"
        plot_metric(report, key, paths[f"metric_{key}"])
    return paths
