"""Self-distillation objectives: a student (backbone + heads) trained to match an EMA teacher.

- `dino` (CellRep): DINO CLS loss over 2 global + N local crops against the teacher's centered (or
  Sinkhorn-Knopp) sharpened distribution, plus the KL-to-uniform regulariser. No iBOT.
- `ibot` (C3R, baselines; DINOv2 recipe): the DINO CLS loss + the iBOT masked-patch loss on the global
  crops (the student sees block-masked global crops, the teacher the unmasked ones), with optional KoLeo on
  the student's global CLS and a weakly supervised SupCon term on per-sample labels.
- With DiChaViT either objective adds its token diversification loss on the student's global crops
  (`ssl.token_orthogonality_weight`). (`mae`, masked autoencoding, lives in `cellfm.train.masked_autoencoding`.)

An objective computes the loss of one micro-batch from its `StepViews` (crops, channel names, the
teacher's and the student's channel masks, iBOT patch masks, labels), all drawn by the training step's
owner (`cellfm.train.meta_arch.SSLMetaArch`); it calls the student exactly once (the student may be
DDP-wrapped: one forward per backward) and the teacher once, without gradients."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cellfm.config import Config, ConfigError
from cellfm.models.heads import DINOHead
from cellfm.models.registry import build_backbone
from cellfm.ssl.dino_loss import DINOLoss
from cellfm.ssl.ibot_loss import IBOTPatchLoss
from cellfm.ssl.kl_uniform import KLUniformLoss
from cellfm.ssl.koleo import KoLeoLoss
from cellfm.ssl.supcon import SupConLoss, label_ids
from cellfm.ssl.token_orthogonality import TokenOrthogonalityLoss


def supcon_label(cfg: Config) -> str:
    """The manifest column the weakly supervised SupCon term needs per sample ("" when it is off)."""
    if cfg.ssl.supcon_weight > 0 and not cfg.ssl.supcon_label:
        raise ConfigError("ssl.supcon_weight > 0 needs ssl.supcon_label (a manifest column, e.g. an antibody id)")
    return cfg.ssl.supcon_label if cfg.ssl.supcon_weight > 0 else ""


class EncoderWithHead(nn.Module):
    """Backbone + DINO head (+ an optional separate iBOT patch head). One forward call runs every crop,
    so DDP sees one graph per step.

    The backbone follows the common interface
        backbone(x (N, C, H, W), channel_names, channel_mask=None, patch_mask=None)
            -> {"cls": (N, D), "patch": (N, P, D), "registers": (N, R, D)}."""

    def __init__(self, backbone: nn.Module, head: DINOHead, ibot_head: DINOHead | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        # None: patch tokens go through `head` (iBOT's shared head) when patch predictions are asked for.
        self.ibot_head = ibot_head

    def forward(
        self,
        global_crops: Tensor,
        local_crops: Tensor | None,
        *,
        channel_names: list[list[str]],
        channel_mask: Tensor | None,
        patch_mask: Tensor | None = None,
        predict_patches: Tensor | None = None,
        return_cls: bool = False,
        token_loss: nn.Module | None = None,
    ) -> dict[str, Tensor]:
        """global_crops (G, B, C, g, g), local_crops (L, B, C, l, l) or None.

        channel_names: B per-sample name lists; channel_mask (B, C) bool (True = the channel is seen) or
        None (every channel is), applied to every crop of a sample; patch_mask (G, B, P) bool: global-crop
        patches the backbone replaces by its mask token; predict_patches (G, B, P) bool: global-crop patch
        tokens to send through the patch head; token_loss: a loss of the global crops' per-channel tokens
        (DiChaViT's "channel_tokens" output (G*B, C, L, D) and the channel mask), added as "token_orthogonality".

        Returns {"global": (G*B, K) CLS logits, "local": (L*B, K) if local crops,
                 "global_cls": (G*B, D) backbone CLS if return_cls,
                 "patch": (M, K') patch logits at the M True entries of predict_patches (row-major order of
                          predict_patches.flatten(0, 1).nonzero())}.
        Rows are view-major: row v*B + b is view v of sample b."""
        n_global, batch = global_crops.shape[:2]
        out: dict[str, Tensor] = {}
        g = self.backbone(global_crops.flatten(0, 1), channel_names=channel_names * n_global,
                          channel_mask=per_view(channel_mask, n_global),
                          patch_mask=None if patch_mask is None else patch_mask.flatten(0, 1))
        out["global"] = self.head(g["cls"])
        if token_loss is not None:
            out["token_orthogonality"] = token_loss(g["channel_tokens"], per_view(channel_mask, n_global))
        if return_cls:
            out["global_cls"] = g["cls"]
        if predict_patches is not None:
            tokens = g["patch"]  # (G*B, P, D)
            select = predict_patches.flatten(0, 1)
            if select.shape != tokens.shape[:2]:
                raise ValueError(
                    f"predict_patches {tuple(predict_patches.shape)} does not match the backbone's "
                    f"{tuple(tokens.shape[:2])} (views*batch, patch tokens)"
                )
            patch_head = self.ibot_head if self.ibot_head is not None else self.head
            out["patch"] = patch_head(tokens[select])
        if local_crops is not None:
            n_local = local_crops.shape[0]
            if local_crops.shape[1] != batch:
                raise ValueError(f"local crops have batch {local_crops.shape[1]}, global crops {batch}")
            loc = self.backbone(local_crops.flatten(0, 1), channel_names=channel_names * n_local,
                                channel_mask=per_view(channel_mask, n_local), patch_mask=None)
            out["local"] = self.head(loc["cls"])
        return out


def per_view(channel_mask: Tensor | None, n_views: int) -> Tensor | None:
    """(B, C) -> (n_views * B, C), view-major like the crops."""
    return None if channel_mask is None else channel_mask.repeat(n_views, 1)


def _separate_ibot_head(cfg: Config) -> bool:
    # DINOv2's training recipes untie the DINO and iBOT heads; the original iBOT (and C3R's code) share one.
    return cfg.ssl.ibot_separate_head


def _dino_head(cfg: Config, in_dim: int) -> DINOHead:
    return DINOHead(in_dim, cfg.ssl.head_out_dim, hidden_dim=cfg.ssl.head_hidden_dim,
                    bottleneck_dim=cfg.ssl.head_bottleneck_dim, nlayers=cfg.ssl.head_nlayers,
                    use_bn=cfg.ssl.head_use_bn)


def build_student_teacher(cfg: Config) -> tuple[nn.Module, nn.Module]:
    """Student and an identical teacher (no gradients; updated only by EMA): an `EncoderWithHead`, or for
    `ssl.objective: mae` a `MaskedAutoencoder` (encoder + decoder). With `ssl.objective: ibot` and a separate
    iBOT head, both carry an `ibot_head` too. Without iBOT a backbone's `mask_token` is never used, so it is
    frozen (a trainable parameter that gets no gradient breaks DDP). Both hold the backbone as `.backbone`."""
    backbone = build_backbone(cfg.model)
    if cfg.ssl.objective != "ibot":
        for name, p in backbone.named_parameters():
            if name.rsplit(".", 1)[-1] == "mask_token":
                p.requires_grad_(False)
    if cfg.ssl.objective == "mae":
        from cellfm.train.masked_autoencoding import build_masked_autoencoder

        student: nn.Module = build_masked_autoencoder(cfg, backbone)
    else:
        head = _dino_head(cfg, backbone.embed_dim)  # before the iBOT head: the init draws keep their order
        ibot_head = _dino_head(cfg, backbone.embed_dim) if cfg.ssl.objective == "ibot" and _separate_ibot_head(cfg) \
            else None
        student = EncoderWithHead(backbone, head, ibot_head)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


@dataclass(frozen=True)
class StepViews:
    """Everything one micro-batch feeds the networks, drawn by the step's owner.

    global_crops (G, B, C, g, g); local_crops (L, B, C, l, l) or None; channel_names: B lists of C names
    ("" for padding); teacher_channels (B, C) bool: the real channels (None: all are real);
    student_channels (B, C) bool: the real channels the student sees (MCD / hierarchical / diverse channel
    sampling; never a padded one), None: all; patch_mask (G, B, P) bool: the iBOT-masked global-crop
    patches of the student (None without iBOT); labels: B weak labels for SupCon, or None; token_mask
    (G, B, C, L) bool: MAE's hidden tokens of each global crop, per channel and grid position (None without MAE)."""

    global_crops: Tensor
    local_crops: Tensor | None
    channel_names: list[list[str]]
    teacher_channels: Tensor | None
    student_channels: Tensor | None
    patch_mask: Tensor | None
    labels: list[str] | None
    token_mask: Tensor | None = None


@dataclass
class StepLosses:
    """The loss to backpropagate and its named terms (logged as train/<name>)."""

    total: Tensor
    terms: dict[str, Tensor]


def _teacher_targets(loss: DINOLoss | IBOTPatchLoss, logits: Tensor, teacher_temp: float, centering: str) -> Tensor:
    """Centered-and-sharpened (then center updated) or Sinkhorn-Knopp teacher targets, (N, K) -> (N, K)."""
    if centering == "sinkhorn_knopp":
        return loss.sinkhorn_knopp_teacher(logits, teacher_temp)
    probs = loss.softmax_center_teacher(logits, teacher_temp)
    loss.update_center(logits)
    return probs


def _dino_cls_terms(dino_loss: DINOLoss, student: dict[str, Tensor], teacher_probs: Tensor,
                    n_global: int, batch: int) -> tuple[Tensor, Tensor, Tensor]:
    """DINO CLS loss: student global crop i vs teacher crop 1 - i, each local crop vs both teacher crops,
    the two parts weighted by their number of pairs. teacher_probs (G, B, K). -> (dino, global, local)."""
    k = student["global"].shape[-1]
    dino_global = dino_loss(student["global"].view(n_global, batch, k), teacher_probs, skip_same_view=True)
    global_pairs = n_global * (n_global - 1)
    if "local" in student:
        n_local = student["local"].shape[0] // batch
        dino_local = dino_loss(student["local"].view(n_local, batch, k), teacher_probs, skip_same_view=False)
        local_pairs = n_local * n_global
    else:
        dino_local = torch.zeros((), device=teacher_probs.device)
        local_pairs = 0
    dino = (dino_global * global_pairs + dino_local * local_pairs) / (global_pairs + local_pairs)
    return dino, dino_global, dino_local


def token_orthogonality_loss(cfg: Config) -> TokenOrthogonalityLoss | None:
    """DiChaViT's token diversification loss when it applies (model dichavit, weight > 0), else None."""
    if cfg.model.name == "dichavit" and cfg.ssl.token_orthogonality_weight > 0:
        return TokenOrthogonalityLoss()
    return None


def _add_token_orthogonality(total: Tensor, terms: dict[str, Tensor], student: dict[str, Tensor],
                             weight: float) -> Tensor:
    """total + weight * the student's token_orthogonality output (logged as a term), when it has one."""
    if "token_orthogonality" not in student:
        return total
    terms["token_orthogonality"] = student["token_orthogonality"]
    return total + weight * student["token_orthogonality"]


def _kl_uniform_term(kl_uniform: KLUniformLoss, student: dict[str, Tensor], student_temp: float) -> Tensor:
    logits = torch.cat([student["global"], student["local"]]) if "local" in student else student["global"]
    return kl_uniform(torch.softmax(logits.float() / student_temp, dim=-1))


class DinoObjective(nn.Module):
    """Loss of one step, with explicit shapes.

    global_crops (2, B, C, g, g), local_crops (N, B, C, l, l) or None. Student global crop i is
    matched to teacher crop 1 - i (never to its own view); each local crop to both teacher crops.
    Global and local terms are weighted by their number of pairs, as in DINO.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.dino_loss = DINOLoss(cfg.ssl.head_out_dim, cfg.ssl.student_temp, cfg.ssl.center_momentum)
        self.kl_uniform = KLUniformLoss()
        self.token_orthogonality = token_orthogonality_loss(cfg)

    def forward(self, student: nn.Module, teacher: EncoderWithHead, views: StepViews, teacher_temp: float
                ) -> StepLosses:
        """One micro-batch's loss. `views.patch_mask` must be None (no iBOT); labels are not used."""
        if views.patch_mask is not None:
            raise ValueError("the dino objective has no masked-patch term; got iBOT patch masks")
        global_crops = views.global_crops
        n_global, batch = global_crops.shape[:2]
        with torch.no_grad():
            teacher_logits = teacher(global_crops, None, channel_names=views.channel_names,
                                     channel_mask=views.teacher_channels)["global"]
            teacher_probs = _teacher_targets(self.dino_loss, teacher_logits, teacher_temp, self.cfg.ssl.centering)
            teacher_probs = teacher_probs.view(n_global, batch, -1)

        out = student(global_crops, views.local_crops, channel_names=views.channel_names,
                      channel_mask=views.student_channels, token_loss=self.token_orthogonality)
        dino, dino_global, dino_local = _dino_cls_terms(self.dino_loss, out, teacher_probs, n_global, batch)
        kl = _kl_uniform_term(self.kl_uniform, out, self.cfg.ssl.student_temp)
        terms = {"dino_global": dino_global, "dino_local": dino_local, "kl_uniform": kl}
        total = _add_token_orthogonality(dino + self.cfg.ssl.kl_uniform_weight * kl, terms, out,
                                         self.cfg.ssl.token_orthogonality_weight)
        return StepLosses(total=total, terms=terms)


class IbotObjective(nn.Module):
    """DINO CLS loss + iBOT masked-patch loss (+ KoLeo, SupCon, KL-uniform when configured).

    Per micro-batch, with global crops (G=2, B, C, g, g), local crops (L, B, C, l, l) or None and block
    masks (G, B, P) for the global crops:
    - teacher (no grad): unmasked global crops with every real channel -> CLS targets and patch targets at
      the masked positions;
    - student (one call): masked global crops + local crops with the student's channels -> CLS logits,
      patch logits at the masked positions;
    - total = dino + ibot_loss_weight * ibot + kl_uniform_weight * kl + koleo_weight * koleo
              + supcon_weight * supcon.
    KoLeo is summed over the global crops, each on its B student CLS tokens (DINOv2); SupCon runs on the
    student's 2B global CLS tokens with labels repeated per crop (the two views of an image are positives).
    """

    def __init__(self, cfg: Config):
        super().__init__()
        s = cfg.ssl
        self.cfg = cfg
        # Both centers in one module: the checkpoint stores `objective.dino_loss` (see the property below).
        self.losses = nn.ModuleDict({
            "dino": DINOLoss(s.head_out_dim, s.student_temp, s.center_momentum),
            "ibot": IBOTPatchLoss(s.head_out_dim, s.student_temp, s.center_momentum),
        })
        self.kl_uniform = KLUniformLoss()
        self.koleo = KoLeoLoss()
        self.supcon = SupConLoss(s.supcon_temperature)
        self.token_orthogonality = token_orthogonality_loss(cfg)

    @property
    def dino_loss(self) -> nn.Module:
        """Every teacher-center buffer of this objective (`dino.center`, `ibot.center`): what the training
        checkpoint saves as dino_loss.safetensors and restores on resume."""
        return self.losses

    def forward(self, student: nn.Module, teacher: EncoderWithHead, views: StepViews, teacher_temp: float
                ) -> StepLosses:
        """One micro-batch's loss; `views.patch_mask` is required, `views.labels` feed SupCon (skipped when
        None)."""
        s = self.cfg.ssl
        patch_mask = views.patch_mask
        if patch_mask is None:
            raise ValueError("the ibot objective needs the global crops' patch masks (views.patch_mask)")
        global_crops = views.global_crops
        n_global, batch = global_crops.shape[:2]
        with torch.no_grad():
            t = teacher(global_crops, None, channel_names=views.channel_names, channel_mask=views.teacher_channels,
                        predict_patches=patch_mask)
            cls_probs = _teacher_targets(self.losses["dino"], t["global"], teacher_temp, s.centering)
            cls_probs = cls_probs.view(n_global, batch, -1)
            patch_probs = _teacher_targets(self.losses["ibot"], t["patch"], teacher_temp, s.centering)

        labels = views.labels
        use_supcon = s.supcon_weight > 0 and labels is not None
        out = student(global_crops, views.local_crops, channel_names=views.channel_names,
                      channel_mask=views.student_channels, patch_mask=patch_mask, predict_patches=patch_mask,
                      return_cls=s.koleo_weight > 0 or use_supcon, token_loss=self.token_orthogonality)
        dino, dino_global, dino_local = _dino_cls_terms(self.losses["dino"], out, cls_probs, n_global, batch)
        ibot = self.losses["ibot"](out["patch"], patch_probs, patch_mask.flatten(0, 1))
        kl = _kl_uniform_term(self.kl_uniform, out, s.student_temp)
        total = dino + s.ibot_loss_weight * ibot + s.kl_uniform_weight * kl
        terms = {"dino_global": dino_global, "dino_local": dino_local, "ibot": ibot, "kl_uniform": kl}
        total = _add_token_orthogonality(total, terms, out, s.token_orthogonality_weight)
        if s.koleo_weight > 0:
            cls = out["global_cls"].view(n_global, batch, -1)
            koleo = sum(self.koleo(cls[v]) for v in range(n_global))
            total = total + s.koleo_weight * koleo
            terms["koleo"] = koleo
        if use_supcon:
            if len(labels) != batch:
                raise ValueError(f"got {len(labels)} labels for a batch of {batch}")
            supcon = self.supcon(out["global_cls"], label_ids(labels, global_crops.device).repeat(n_global))
            total = total + s.supcon_weight * supcon
            terms["supcon"] = supcon
        terms["mask_ratio"] = patch_mask.float().mean()
        return StepLosses(total=total, terms=terms)


OBJECTIVES: dict[str, type[nn.Module]] = {"dino": DinoObjective, "ibot": IbotObjective}


def build_objective(cfg: Config) -> nn.Module:
    """The training objective named by `ssl.objective` (dino | ibot | mae)."""
    if cfg.ssl.objective == "mae":
        from cellfm.train.masked_autoencoding import MAEObjective

        return MAEObjective(cfg)
    if cfg.ssl.objective not in OBJECTIVES:
        raise ValueError(f"ssl.objective={cfg.ssl.objective!r} is not one of {sorted(OBJECTIVES) + ['mae']}")
    return OBJECTIVES[cfg.ssl.objective](cfg)
