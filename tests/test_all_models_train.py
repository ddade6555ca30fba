"""Every backbone pre-trains on mixed channel counts with the objective that model trains with (CellRep:
DINO; C3R: iBOT + MCD + SupCon; ChannelViT: iBOT + hierarchical channel sampling; other baselines: iBOT):
5-channel Cell Painting, the 4-channel unseen stain set and 1-channel brightfield fields padded into the
same batches with a channel mask (`data.mixed_channels=pad`).

Every model, in memory: the training step every Ray worker runs (`SSLMetaArch.forward_backward` and
`optimizer_step`, one process) on such padded batches lowers the loss, and the trained teacher backbone
comes back from the inference checkpoint evaluation loads with the same outputs. One model (C3R, the one that
also samples the student's channels and carries a manifest column to its loss) through Ray: a 2-worker DDP
run on the mixed manifest lowers its loss, and evaluation scores its checkpoint.

Loss criterion. In a normal run the self-distillation loss is not monotone over a few epochs: it is a
cross-entropy to targets whose entropy itself moves (the teacher temperature warms up, the running center
converges and sharpens the targets, the EMA teacher changes). So the tests make the targets a stationary
function of the input: fixed teacher temperature (0.04), teacher held at its initial weights (EMA momentum
1), center = the current batch mean (center momentum 0, all-reduced over the workers). The student then
minimises a fixed objective, and the mean loss of the last epoch must be below that of the first."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cellfm.config import load_config
from cellfm.data.manifest import MANIFEST_COLUMNS, write_manifest
from cellfm.data.batch import FieldBatch
from cellfm.data.pipeline.dataset import epoch_shard, load_manifests
from cellfm.evaluate.run import run_evaluation
from cellfm.seeding import Stream, torch_generator
from cellfm.train.checkpoint import latest_checkpoint, load_inference_backbone, save_inference_checkpoint
from cellfm.train.in_memory import load_normalized_fields, pad_field_sets
from cellfm.train.meta_arch import SSLMetaArch
from cellfm.storage import run_directory
from cellfm.train.trainer import run_pretraining
from tests.conftest import SMOKE_CONFIG

EPOCHS = 3
C3R_GROUPS = "{DNA: context, ER: context, RNA: context, AGP: context, Mito: concept}"
IBOT = ["ssl.objective=ibot", "ssl.kl_uniform_weight=0.0"]
MODELS = {
    "cellrep": ["ssl.objective=dino"],
    # C3R also trains the weakly supervised SupCon term on a manifest column.
    "c3r": [*IBOT, "ssl.mcd=true", f"model.channel_groups={C3R_GROUPS}", "ssl.supcon_weight=0.1",
            "ssl.supcon_label=perturbation_id"],
    "vit_rgb": IBOT,
    "channelvit": IBOT,
    "single_channel": IBOT,
}
# Targets that are a fixed function of the input (module docstring).
STATIONARY = ["ssl.warmup_teacher_temp=0.04", "ssl.teacher_temp=0.04", "ssl.ema_momentum_start=1.0",
              "ssl.ema_momentum_end=1.0", "ssl.center_momentum=0.0", "ssl.freeze_last_layer_epochs=0",
              "optim.base_lr=2.0e-2", "model.size=tiny", "ssl.n_local_crops=2", f"optim.epochs={EPOCHS}"]
CHANNEL_COUNTS = {5, 4, 1}
# Fields of each channel count: Cell Painting (train), the unseen stain set, brightfield.
FIELDS_PER_COUNT = {"train": 24, "unseen": 20, "brightfield": 16}
# Measured epoch losses, printed at the end of the module (run with -s to see them).
MEASURED: dict[str, list[float]] = {}


@pytest.fixture(scope="module")
def mixed_parts(tiny_screen, family_screen) -> list[pd.DataFrame]:
    """The Cell Painting (5 channels), unseen (4) and brightfield (1) fields that train together."""
    brightfield = family_screen("brightfield1")["train"]
    paths = {"train": tiny_screen["train"], "unseen": tiny_screen["unseen"], "brightfield": brightfield}
    return [load_manifests([paths[name]]).iloc[:n][list(MANIFEST_COLUMNS)] for name, n in FIELDS_PER_COUNT.items()]


@pytest.fixture(scope="module")
def padded_fields(mixed_parts) -> tuple[torch.Tensor, torch.Tensor, list[list[str]], list[str]]:
    """Every other mixed field (one worker's share of the Ray run: 7 batches an epoch) normalized as the
    pipeline does and padded to 5 channels as `data.mixed_channels=pad` pads them (real channels first,
    zeros and "" after): (images, channel mask, channel names, labels)."""
    cfg = load_config(SMOKE_CONFIG)
    parts = [part.iloc[::2] for part in mixed_parts]
    images, names = pad_field_sets([(load_normalized_fields(part, cfg.data), list(part["channel_names"].iloc[0]))
                                    for part in parts])
    masks = torch.tensor([[name != "" for name in row] for row in names])
    labels = [str(v) for part in parts for v in part["perturbation_id"]]
    return images, masks, names, labels


def mixed_batches(fields, epoch: int, batch_size: int) -> list[FieldBatch]:
    """One epoch: the fields in an order drawn from (seed 0, epoch), the remainder dropped (as `pad` does)."""
    images, mask, names, labels = fields
    order = torch.randperm(len(images), generator=torch_generator(0, Stream.FIELD_ORDER, epoch)).tolist()
    batches = []
    for start in range(0, len(order) - batch_size + 1, batch_size):
        index = order[start:start + batch_size]
        batch_mask = mask[index]
        batches.append(FieldBatch(images[index], [names[i] for i in index],
                                  None if bool(batch_mask.all()) else batch_mask, [labels[i] for i in index]))
    return batches


@pytest.mark.parametrize("model", list(MODELS))
def test_every_model_lowers_its_loss_on_padded_mixed_channels_and_round_trips(model, mixed_parts, padded_fields,
                                                                                tmp_path):
    cfg = load_config(SMOKE_CONFIG, [f"model.name={model}", *MODELS[model], *STATIONARY])
    # What a run fills in from its manifest: every stain's group (C3R) and the vocabulary (ChannelViT).
    groups = {name: group for part in mixed_parts
              for names, stain_groups in zip(part["channel_names"], part["channel_groups"])
              for name, group in zip(names, stain_groups)}
    cfg.model.channel_groups = {**groups, **cfg.model.channel_groups}
    cfg.model.channel_vocabulary = sorted(groups)
    batch_size = cfg.optim.batch_size_per_worker
    epochs = [mixed_batches(padded_fields, epoch, batch_size) for epoch in range(EPOCHS)]
    # The padded batches mix channel counts: at least half hold fields of two or three counts.
    counts = [{int(n) for n in b.channel_mask.sum(dim=1)} for b in epochs[0] if b.channel_mask is not None]
    assert sum(len(c) > 1 for c in counts) >= len(epochs[0]) // 2 and set().union(*counts) == CHANNEL_COUNTS

    meta_arch = SSLMetaArch(cfg, steps_per_epoch=len(epochs[0]), rank=0, world_size=1, device=torch.device("cpu"),
                            prepare_model=lambda module: module)
    losses, step = [], 0
    for epoch, batches in enumerate(epochs):
        terms: dict[str, float] = {}
        for batch in batches:
            step_losses = meta_arch.forward_backward(batch, epoch=epoch, step=step, micro=0)
            meta_arch.optimizer_step(step)
            for name, value in {"total": step_losses.total, **step_losses.terms}.items():
                terms[name] = terms.get(name, 0.0) + float(value.detach()) / len(batches)
            step += 1
        losses.append(terms["total"])
    MEASURED[model] = losses
    print(f"[all-models] {model}: epoch losses {', '.join(f'{v:.4f}' for v in losses)}")
    assert losses[-1] < losses[0], f"{model}: loss did not decrease over {EPOCHS} epochs: {losses}"
    if cfg.ssl.objective == "ibot":
        assert terms["ibot"] > 0
    if cfg.ssl.supcon_weight > 0:
        assert terms["supcon"] > 0

    # The inference checkpoint (what evaluation and the feature store embed with) gives back the trained
    # teacher: the same outputs on a padded batch, to the bit.
    teacher = meta_arch.teacher.backbone.eval()
    save_inference_checkpoint(tmp_path / "ckpt", cfg=cfg, backbone=teacher)
    loaded, saved_cfg = load_inference_backbone(tmp_path / "ckpt")
    assert saved_cfg.model == cfg.model
    batch = epochs[0][0]
    with torch.no_grad():
        crop = batch.images[..., :32, :32]
        expected = teacher(crop, channel_names=batch.channel_names, channel_mask=batch.channel_mask)
        got = loaded.eval()(crop, channel_names=batch.channel_names, channel_mask=batch.channel_mask)
    assert all(torch.equal(expected[key], got[key]) for key in ("cls", "patch"))


@pytest.mark.integration
def test_c3r_pretrains_on_mixed_channels_through_ray_and_evaluates(ray_session, smoke_overrides, tiny_screen,
                                                                   mixed_parts, tmp_path):
    mixed_manifest = write_manifest(pd.concat(mixed_parts, ignore_index=True), tmp_path / "mixed.parquet")
    overrides = smoke_overrides + [
        f"data.train_manifest={mixed_manifest}", "data.mixed_channels=pad", "model.name=c3r", *MODELS["c3r"],
        *STATIONARY, "train.run_name=all-c3r", f"train.num_to_keep={EPOCHS}",
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
    # MCD samples the student's channels; the run reports how many it saw.
    assert 1 <= result.metrics["student_channels_seen"] <= 5
    assert result.metrics["ibot"] > 0 and result.metrics["supcon"] > 0

    events = EventAccumulator(str(run_directory(cfg) / "tensorboard"))
    events.Reload()
    losses = [e.value for e in sorted(events.Scalars("train/epoch_loss"), key=lambda e: e.step)]
    print(f"[all-models] c3r through Ray: epoch losses {', '.join(f'{v:.4f}' for v in losses)}")
    assert len(losses) == EPOCHS
    assert losses[-1] < losses[0], f"c3r: loss did not decrease over {EPOCHS} epochs: {losses}"

    # Evaluation embeds the checkpoint's teacher. This run held the teacher at its initial weights (EMA
    # momentum 1), the network that seed 0 draws, which is also the random-init baseline (eval.random_init_seed
    # 0, same architecture): every metric of the checkpoint must be the baseline's, to the bit. A checkpoint
    # that saved the student, or weights evaluation loaded wrongly, would give other numbers.
    assert (cfg.train.seed, cfg.eval.random_init_seed) == (0, 0)
    ckpt = latest_checkpoint(run_directory(cfg))
    report, paths = run_evaluation(cfg, ckpt)
    block = report["results"]["unseen"]
    assert block["models"][:2] == ["trained", "random_init"]
    assert block["metrics"]["trained"] == block["metrics"]["random_init"]
    assert block["details"]["trained"]["probe"] == block["details"]["random_init"]["probe"]
    saved = json.loads(paths["json"].read_text())
    assert saved["model"]["name"] == "c3r" and saved["checkpoint"] == str(ckpt.resolve())
