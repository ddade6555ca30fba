"""`cellfm evaluate --from-store`: the features `cellfm refresh` stored, scored without embedding, give the
numbers the embed-then-evaluate path gives on the same checkpoint; a plate or key the store lacks, or a
plate that changed since it was embedded, stops the job with one line each before anything is read."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from cellfm.config import load_config
from cellfm.data.manifest import write_manifest
from cellfm.data.pipeline.dataset import load_manifests
from cellfm.evaluate.run import run_evaluation
from cellfm.features.refresh import refresh
from cellfm.models.registry import build_backbone
from cellfm.train.checkpoint import save_inference_checkpoint
from tests.conftest import REPO, SMOKE_CONFIG

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def filled(tiny_screen, tmp_path_factory, ray_session):
    """A random-init checkpoint of the smoke model and a store holding its features of the seen and unseen
    plates (the eval manifests), filled by `refresh`."""
    root = tmp_path_factory.mktemp("eval-store")
    cfg = load_config(SMOKE_CONFIG)
    torch.manual_seed(0)
    save_inference_checkpoint(root / "ckpt", cfg=cfg, backbone=build_backbone(cfg.model).eval())
    manifests = f"{{seen: {tiny_screen['heldout']}, unseen: {tiny_screen['unseen']}}}"
    overrides = [f"eval.manifests={manifests}", f"features.manifests={manifests}", f"features.store={root / 'store'}",
                 f"features.checkpoint={root / 'ckpt'}", f"train.storage_path={root / 'runs'}",
                 "features.batch_size=8", "eval.copairs_null_size=1000", "data.progress_interval_s=0"]
    summary = refresh(load_config(SMOKE_CONFIG, overrides))
    assert sorted(summary.embedded) == ["SYN-HELDOUT-01", "SYN-UNSEEN-01"]
    return {"root": root, "overrides": overrides, "checkpoint": str(root / "ckpt"), "key": summary.key}


def _evaluate_job(filled, *overrides: str, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    # --address points nowhere: the store path must never need Ray.
    return subprocess.run([sys.executable, str(REPO / "jobs" / "evaluate.py"), "--config", str(SMOKE_CONFIG),
                           "--from-store", "--address=127.0.0.1:1", *flags, *filled["overrides"], *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_store_evaluation_equals_embedding_then_evaluating(filled):
    root = filled["root"]
    embedded, _ = run_evaluation(load_config(SMOKE_CONFIG, filled["overrides"] + [f"eval.output_dir={root / 'a'}"]),
                                 {"trained": filled["checkpoint"]})
    # The command, as a user runs it: features.checkpoint is the default checkpoint, no Ray, no embedding.
    done = _evaluate_job(filled, f"eval.output_dir={root / 'b'}")
    assert done.returncode == 0, done.stderr
    assert "embedding" not in done.stdout and "reading the stored well features (mean)" in done.stdout
    stored = json.loads((root / "b" / "report.json").read_text())
    assert stored["baselines"] == [] and stored["feature_store"]["keys"] == {"trained": filled["key"]}
    assert "Features read from the feature store" in (root / "b" / "report.md").read_text()
    for name in ("seen", "unseen"):
        a, b = embedded["results"][name], stored["results"][name]
        assert b["models"] == ["trained"] and (a["n_wells"], a["n_plates"]) == (b["n_wells"], b["n_plates"]) == (26, 1)
        # Every headline metric and protocol detail, number for number (JSON round trip on one side only).
        assert json.loads(json.dumps(a["metrics"]["trained"])) == b["metrics"]["trained"]
        assert json.loads(json.dumps(a["details"]["trained"])) == b["details"]["trained"]
        assert sum(v is not None for v in b["metrics"]["trained"].values()) >= 8


def test_missing_plate_key_or_changed_plate_is_one_line_each(filled, tiny_screen):
    root = filled["root"]
    heldout = load_manifests([tiny_screen["heldout"]], check_plates=False)
    # A plate the store never saw, and the held-out plate with one annotation changed since it was embedded.
    extra = write_manifest(heldout.assign(plate="SYN-NEW-01"), root / "new.parquet")
    changed = write_manifest(heldout.assign(dose=heldout["dose"] * 2), root / "changed.parquet")
    done = _evaluate_job(filled, f"eval.manifests={{seen: {tiny_screen['heldout']}, new: {extra}, changed: {changed}}}",
                         f"eval.output_dir={root / 'c'}")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 2, done.stderr
    assert lines[0].startswith("error: eval.manifests.new: plate 'SYN-NEW-01': feature store ")
    assert f"key {filled['key']} (trained) has no features of it; run `cellfm refresh`" in lines[0]
    assert lines[1].startswith("error: eval.manifests.changed: plate 'SYN-HELDOUT-01': ")
    assert "(changed since embedded)" in lines[1]
    assert not (root / "c").exists()

    # Another checkpoint: its key is not in the store at all, one line for it.
    other = root / "other-ckpt"
    cfg = load_config(SMOKE_CONFIG)
    torch.manual_seed(1)
    save_inference_checkpoint(other, cfg=cfg, backbone=build_backbone(cfg.model).eval())
    done = _evaluate_job(filled, f"eval.output_dir={root / 'd'}",
                         flags=("--checkpoint", f"first={filled['checkpoint']}", "--checkpoint", f"second={other}"))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "has no features of model 'second'" in lines[0] and "run `cellfm refresh`" in lines[0]

    # A well variable the store does not hold is a config error, named before anything is read.
    done = _evaluate_job(filled, "eval.store_variable=mean_spherize", f"eval.output_dir={root / 'e'}")
    assert done.returncode == 2
    assert "eval.store_variable='mean_spherize' is not a well variable the store holds" in done.stderr
