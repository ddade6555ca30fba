"""Evaluation report: JSON (machine-readable), Markdown (tables) and a PNG bar chart."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def markdown_report(report: dict) -> str:
    lines = ["# cellfm evaluation", "", f"Checkpoint: `{report['checkpoint']}`", "",
             "Logistic regression on well embeddings (mean over fields"
             f"{', normalized to negative controls per plate' if report['well_normalization'] == 'negcon' else ''}), "
             f"{len(report['split_seeds'])} fixed stratified splits of wells (test fraction {report['test_fraction']}, "
             f"seeds {report['split_seeds'][0]}..{report['split_seeds'][-1]}); mean ± sd over splits.", ""]
    for manifest_name, block in report["results"].items():
        lines += [f"## {manifest_name}: `{block['manifest']}`", "",
                  f"Channels: {', '.join(block['channels'])}; {block['n_wells']} wells, {block['n_fields']} fields", "",
                  "| encoder | label | top-1 | weighted precision | classes | train / test wells |",
                  "|---|---|---|---|---|---|"]
        for encoder, per_label in block["scores"].items():
            for label, s in per_label.items():
                lines.append(f"| {encoder} | {label} | {s['top1']:.3f} ± {s['top1_sd']:.3f} | "
                             f"{s['weighted_precision']:.3f} ± {s['weighted_precision_sd']:.3f} | "
                             f"{s['n_classes']} | {s['n_train_wells']} / {s['n_test_wells']} |")
        lines.append("")
    lines += ["![scores](report.png)", ""]
    return "\n".join(lines)


def plot_report(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = report["results"]
    labels = next(iter(next(iter(blocks.values()))["scores"].values())).keys()
    fig, axes = plt.subplots(1, len(labels), figsize=(5 * len(labels), 3.6), squeeze=False)
    for ax, label in zip(axes[0], labels):
        names = list(blocks)
        encoders = list(next(iter(blocks.values()))["scores"])
        width = 0.8 / len(encoders)
        for i, enc in enumerate(encoders):
            values = [blocks[n]["scores"][enc][label]["top1"] for n in names]
            spread = [blocks[n]["scores"][enc][label]["top1_sd"] for n in names]
            bars = ax.bar([x + i * width for x in range(len(names))], values, width, yerr=spread, capsize=2, label=enc)
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
        chance = [1 / blocks[n]["scores"][encoders[0]][label]["n_classes"] for n in names]
        ax.scatter([x + 0.4 - width / 2 for x in range(len(names))], chance, marker="_", s=400, c="k", label="chance")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names)
        ax.set_ylim(0, 1)
        ax.set_title(f"top-1 accuracy: {label}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, output_dir: str | Path) -> dict[str, Path]:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "plot": out / "report.png"}
    _atomic_write(paths["json"], json.dumps(report, indent=2))
    _atomic_write(paths["markdown"], markdown_report(report))
    plot_report(report, paths["plot"])
    return paths
