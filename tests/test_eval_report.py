"""The evaluation report: every file written, every metric per model and channel configuration in the
JSON, tables and plots that match it (no Ray)."""

import dataclasses
import json

import numpy as np
import pytest

from cellfm.config import EvalConfig
from cellfm.evaluate.protocols import evaluate_features, evaluation_settings, metric_specs
from cellfm.evaluate.report import markdown_report, summary_lines, write_report
from tests.test_eval_protocols import _random_screen

MODELS = ("trained", "random_init", "intensity_stats")


@pytest.fixture(scope="module")
def report():
    """Seen: 3 plates (every protocol but localization); unseen: 1 plate (no leave-one-plate-out)."""
    cfg = EvalConfig(n_splits=2, n_compound_splits=2, copairs_null_size=500)
    results = {}
    for name, n_plates, dims in (("seen", 3, 16), ("unseen", 1, 12)):
        meta, x = _random_screen(7, n_plates=n_plates, dim=dims)
        noise = np.random.default_rng(8).normal(size=x.shape)
        features = {"trained": (meta, x), "random_init": (meta, noise), "intensity_stats": (meta, 0.3 * x + noise)}
        results[name] = {"manifest": f"/data/{name}.parquet", "channels": ["DNA", "RNA", "ER", "Mito"][:dims // 4],
                         **evaluate_features(features, cfg)}
    return {"checkpoint": "/runs/r/checkpoint_1", "checkpoints": {"trained": "/runs/r/checkpoint_1"},
            "baselines": ["random_init", "intensity_stats"], **evaluation_settings(cfg), "results": results}


def test_report_writes_every_file_and_the_json_holds_every_metric(report, tmp_path):
    paths = write_report(report, tmp_path)
    computed = [k for k in report["metric_titles"] if k != "localization_map"]  # no localization labels here
    expected = {"json", "markdown", "map_seen", "map_unseen", "confusion_seen", "confusion_unseen",
                *(f"metric_{k}" for k in computed)}
    assert set(paths) == expected
    for key, path in paths.items():
        assert path.parent == tmp_path and path.stat().st_size > 0
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", key
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind

    saved = json.loads(paths["json"].read_text())
    assert saved == json.loads(json.dumps(report))
    all_keys = {spec.key for spec in metric_specs(["perturbation_id", "moa"])}
    assert set(saved["metric_titles"]) == all_keys
    for name, block in saved["results"].items():
        assert block["models"] == list(MODELS)
        for model in MODELS:
            assert set(block["metrics"][model]) == all_keys, (name, model)
            assert set(block["details"][model]) == set(saved["protocols"])
            assert len(block["map"]["coordinates"][model]["xy"]) == block["n_wells"]
        assert block["metrics"]["trained"]["localization_map"] is None
    seen, unseen = saved["results"]["seen"], saved["results"]["unseen"]
    assert all(v is not None for k, v in seen["metrics"]["trained"].items() if k != "localization_map")
    assert unseen["metrics"]["trained"]["nn_lopo_moa_macro_f1"] is None
    # The trained features carry the signal; the others are noise or diluted by it.
    assert seen["best_model"] == "trained"
    for key in ("heldout_moa_top1", "replicate_map", "nn_lopo_moa_macro_f1"):
        assert seen["metrics"]["trained"][key] > seen["metrics"]["random_init"][key], key
    assert seen["chance"]["heldout_moa_top1"] == pytest.approx(1 / 4)  # m0, m1, m2, m0|m2


def test_markdown_and_summary_show_the_json_numbers(report):
    text = markdown_report(report)
    seen = report["results"]["seen"]
    value = seen["metrics"]["trained"]["heldout_moa_top1"]
    spread = seen["spread"]["trained"]["heldout_moa_top1"]
    row = next(line for line in text.splitlines() if line.startswith("| MoA top-1, held-out compounds |")
               and f"{value:.3f} ± {spread:.3f}" in line)
    assert row.endswith(f"| {1 / 4:.3f} |")
    assert "Not computed: per_plate_probe (perturbation_id): per-plate probe needs two or more plates" in text
    assert "lopo_probe (moa): leave-one-plate-out probe needs two or more plates, found 1" in text
    assert "; nn_lopo (perturbation_id): leave-one-plate-out needs two or more plates, found 1" in text
    assert "localization_map: no well has a localization label" in text
    assert "![2-D map of well embeddings, unseen](map_unseen.png)" in text
    assert "(metric_localization_map.png)" not in text and "(metric_replicate_map.png)" in text
    assert "`trained` (`/runs/r/checkpoint_1`)" in text

    lines = summary_lines(report)
    assert lines[0].startswith("seen (DNA,RNA,ER,Mito; ") and lines[1].split()[1:] == list(MODELS)
    replicate = next(line for line in lines if line.strip().startswith("replicate_map"))
    assert replicate.split()[1:] == [f"{seen['metrics'][m]['replicate_map']:.3f}" for m in MODELS]
    assert not any(line.strip().startswith("localization_map") for line in lines)  # never computed
    unseen_rows = lines[lines.index(next(line for line in lines if line.startswith("unseen"))):]
    assert next(line for line in unseen_rows if "nn_lopo_moa_macro_f1" in line).split()[1:] == ["n/a"] * 3


def test_settings_name_only_the_protocols_that_ran():
    cfg = dataclasses.replace(EvalConfig(), protocols=["replicate_map", "probe"], labels=["moa"])
    settings = evaluation_settings(cfg)
    assert settings["protocols"] == ["probe", "replicate_map"]  # report order
    assert list(settings["metric_titles"]) == ["probe_moa_top1", "probe_moa_weighted_precision", "replicate_map",
                                               "replicate_fraction_retrieved"]
    assert settings["split_seeds"] == [0, 1, 2, 3, 4] and settings["embedding_map"] in ("pca", "umap")
