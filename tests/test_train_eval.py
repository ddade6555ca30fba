"""End to end on real components: a 2-worker DDP run on the tiny screen writes a checkpoint,
evaluation loads it through Ray Data batch inference and writes the report of every protocol;
relaunching the same run name resumes it."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cellfm.config import load_config
from cellfm.evaluate.run import run_evaluation
from cellfm.train.checkpoint import latest_checkpoint, load_inference_backbone
from cellfm.storage import run_directory
from cellfm.train.trainer import run_pretraining
from tests.conftest import SMOKE_CONFIG

pytestmark = pytest.mark.integration


def test_pretrain_checkpoint_evaluate_resume(ray_session, smoke_overrides, tiny_screen):
    cfg = load_config(SMOKE_CONFIG, smoke_overrides + ["train.run_name=e2e"])
    result = run_pretraining(cfg)
    run_dir = run_directory(cfg)
    ckpt = latest_checkpoint(run_dir)
    assert ckpt.resolve() == __import__("pathlib").Path(result.checkpoint.path).resolve()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["epoch"] == 0 and state["step"] > 0
    assert (run_dir / "config.yaml").is_file()
    assert result.metrics["loss"] > 0 and result.metrics["images_per_s"] > 0

    # Rank 0 wrote TensorBoard scalars.
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/dino_local", "train/kl_uniform", "schedule/lr", "schedule/teacher_temp"} <= tags

    # The inference checkpoint rebuilds the teacher backbone without training code or pickle.
    backbone, saved_cfg = load_inference_backbone(ckpt)
    assert saved_cfg.model == cfg.model
    with torch.no_grad():
        out = backbone(torch.rand(2, 3, 32, 32))
    assert out["cls"].shape == (2, backbone.embed_dim)

    # The same checkpoint under two names beside the baselines: one report, every metric per model and
    # channel configuration, and identical numbers for identical features.
    report, paths = run_evaluation(cfg, {"cellrep": ckpt, "again": ckpt})
    models = ["cellrep", "again", "random_init", "intensity_stats"]
    assert set(report["results"]) == {"seen", "unseen"}
    assert report["results"]["unseen"]["channels"] != report["results"]["seen"]["channels"]
    for block in report["results"].values():
        assert block["models"] == models and block["n_fields"] == 2 * block["n_wells"]  # tiny: 2 fields/well
        assert block["metrics"]["cellrep"] == block["metrics"]["again"]
        for model in models:
            metrics = block["metrics"][model]
            assert set(metrics) == set(report["metric_titles"])
            # The tiny screen has one plate per configuration (no protocol across plates) and no localization
            # labels; every other protocol runs on it.
            assert [k for k, v in metrics.items() if v is None] == [
                "per_plate_probe_perturbation_id_top1", "lopo_probe_perturbation_id_top1", "per_plate_probe_moa_top1",
                "lopo_probe_moa_top1", "nn_lopo_perturbation_id_macro_f1", "nn_lopo_moa_macro_f1", "localization_map"]
            assert block["details"][model]["probe"]["moa"]["n_test_wells"] > 0
    assert paths["json"].is_file() and paths["markdown"].is_file()
    assert {p.name for p in paths.values() if p.suffix == ".png"} >= {
        "map_seen.png", "map_unseen.png", "confusion_seen.png", "metric_heldout_moa_top1.png", "metric_replicate_map.png"}
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    saved = json.loads(paths["json"].read_text())
    assert saved["checkpoint"] == str(ckpt.resolve()) and saved["checkpoints"]["again"] == str(ckpt.resolve())

    # Relaunch with the same run name and one more epoch: resumes at the saved step.
    resumed = run_pretraining(load_config(SMOKE_CONFIG, smoke_overrides + ["train.run_name=e2e", "optim.epochs=2"]))
    assert resumed.metrics["epoch"] == 1
    assert resumed.metrics["step"] == 2 * state["step"]
