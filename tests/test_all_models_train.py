"""Every backbone pre-trains end to end on mixed channel counts: a short 2-worker DDP run on 5-, 4- and
1-channel fields in one manifest (padded into the same batches with a channel mask, `data.mixed_channels=pad`),
with the objective that model trains with (CellRep: DINO; C3R: iBOT + MCD; ChannelViT: iBOT + hierarchical
channel sampling; other baselines: iBOT), lowers its loss and writes a checkpoint that the evaluation accepts.

Loss criterion. In a normal run the self-distillation loss is not monotone over a few epochs: it is a
cross-entropy to targets whose entropy itself moves (the teacher temperature warms up, the running center
converges and sharpens the targets, the EMA teacher changes). So the test makes the targets a stationary
function of the input: fixed teacher temperature (0.04), teacher held at its initial weights (EMA momentum
1), center = the current batch mean (center momentum 0, still all-reduced over both workers). The student
then minimises a fixed objective, and the mean loss of the last epoch must be below that of the first
(rank 0's TensorBoard `train/epoch_loss`, one value per epoch)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cellfm.config import load_config
from cellfm.data.manifest import MANIFEST_COLUMNS, write_manifest
from cellfm.data.pipeline import epoch_shard, load_manifests
from cellfm.data.synthetic import generate_family_screen
from cellfm.evaluate.run import run_evaluation
from cellfm.train.checkpoint import latest_checkpoint
from cellfm.train.storage import run_directory
from cellfm.train.trainer import run_pretraining
from tests.conftest import SMOKE_CONFIG

pytestmark = pytest.mark.integration

EPOCHS = 3
C3R_GROUPS = "{DNA: context, ER: context, RNA: context, AGP: context, Mito: concept}"
IBOT = ["ssl.objective=ibot", "ssl.kl_uniform_weight=0.0"]
MODELS = {
    "cellrep": ["ssl.objective=dino"],
    # C3R also trains the weakly supervised SupCon term on a manifest column, end to end.
    "c3r": [*IBOT, "ssl.mcd=true", f"model.channel_groups={C3R_GROUPS}", "ssl.supcon_weight=0.1",
            "ssl.supcon_label=perturbation_id"],
    "vit_rgb": IBOT,
    # The vocabulary (every stain of the mixed manifest) is filled in from the manifest.
    "channelvit": IBOT,
    "single_channel": IBOT,
}
CHANNEL_COUNTS = {5, 4, 1}
# Measured epoch losses, printed at the end of the module (run with -s to see them).
MEASURED: dict[str, list[float]] = {}


def epoch_losses(run_dir) -> list[float]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [e.value for e in sorted(events.Scalars("train/epoch_loss"), key=lambda e: e.step)]


@pytest.fixture(scope="module")
def mixed_manifest(tiny_screen, tmp_path_factory):
    """Cell Painting (5 channels), the unseen stain set (4) and brightfield (1) fields in one training
    manifest: 24 + 20 + 16 fields."""
    root = tmp_path_factory.mktemp("mixed")
    brightfield = generate_family_screen(root / "brightfield", "brightfield1", "tiny", seed=0)["train"]
    parts = [load_manifests([path]).iloc[:n][list(MANIFEST_COLUMNS)]
             for path, n in ((tiny_screen["train"], 24), (tiny_screen["unseen"], 20), (brightfield, 16))]
    return write_manifest(pd.concat(parts, ignore_index=True), root / "mixed.parquet")


@pytest.mark.parametrize("model", list(MODELS))
def test_every_model_pretrains_lowers_loss_and_evaluates(model, ray_session, smoke_overrides, tiny_screen,
                                                         mixed_manifest):
    overrides = smoke_overrides + [
        f"data.train_manifest={mixed_manifest}", "data.mixed_channels=pad",
        f"model.name={model}", *MODELS[model], f"train.run_name=all-{model}", f"optim.epochs={EPOCHS}",
        "ssl.warmup_teacher_temp=0.04", "ssl.teacher_temp=0.04", "ssl.ema_momentum_start=1.0",
        "ssl.ema_momentum_end=1.0", "ssl.center_momentum=0.0", "ssl.freeze_last_layer_epochs=0",
        "optim.base_lr=2.0e-2",
        "model.size=tiny", "ssl.n_local_crops=2", f"train.num_to_keep={EPOCHS}",
        # One held-out manifest (the unseen channel set, the harder case) keeps evaluation short.
        f"eval.manifests={{unseen: {tiny_screen['unseen']}}}",
    ]
    cfg = load_config(SMOKE_CONFIG, overrides)
    # Every rank's share of every epoch holds fields of all three channel counts: the workers train on
    # fields padded to 5 channels with masks of 5, 4 and 1 real channels.
    manifest = load_manifests([mixed_manifest])
    for epoch in range(EPOCHS):
        for rank in range(cfg.train.num_workers):
            share = epoch_shard(manifest, cfg.data, seed=cfg.train.seed, epoch=epoch, rank=rank,
                                world_size=cfg.train.num_workers)
            assert set(share["channel_names"].map(len)) == CHANNEL_COUNTS, (epoch, rank)
    result = run_pretraining(cfg)
    assert result.metrics["epoch"] == EPOCHS - 1
    # Only a run that samples the student's channels (C3R: MCD; ChannelViT: HCS) reports how many it saw.
    assert ("student_channels_seen" in result.metrics) == (model in ("c3r", "channelvit"))
    if model == "channelvit":
        assert "Brightfield" in cfg.model.channel_vocabulary

    losses = epoch_losses(run_directory(cfg))
    MEASURED[model] = losses
    print(f"[all-models] {model}: epoch losses {', '.join(f'{v:.4f}' for v in losses)}")
    assert len(losses) == EPOCHS
    assert losses[-1] < losses[0], f"{model}: loss did not decrease over {EPOCHS} epochs: {losses}"
    if cfg.ssl.objective == "ibot":
        assert result.metrics["ibot"] > 0
    if cfg.ssl.supcon_weight > 0:
        assert result.metrics["supcon"] > 0

    ckpt = latest_checkpoint(run_directory(cfg))
    report, paths = run_evaluation(cfg, ckpt)
    probe = report["results"]["unseen"]["details"]["trained"]["probe"]
    assert all(0.0 <= probe[label]["top1"] <= 1.0 for label in cfg.eval.labels)
    assert json.loads(paths["json"].read_text())["model"]["name"] == model
