"""Self-distillation objectives: a student (backbone + heads) trained to match an EMA teacher.

- `dino` (CellRep): DINO CLS loss over 2 global + N local crops against the teacher's centered (or
  Sinkhorn-Knopp) sharpened distribution, plus the KL-to-uniform regulariser. No iBOT.
- `ibot` (C3R, baselines; DINOv2 recipe): the DINO CLS loss + the iBOT masked-patch loss on the global
  crops (the student sees block-masked global crops, the teacher the unmasked ones), with optional KoLeo on
  the student's global CLS, Masked Context Distillation (the student sees a subset of the context
  channels, the teacher all) and a weakly supervised SupCon term on per-sample labels.

`build_objective(cfg)` picks the objective from `ssl.objective`. Every objective calls the student
exactly once per step (the student may be DDP-wrapped: one forward per backward)."""

from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cellfm.config import Config, ConfigError
from cellfm.models.heads import DINOHead
from cellfm.models.registry import build_backbone
from cellfm.ssl.dino_loss import DINOLoss
from cellfm.ssl.ibot_loss import IBOTPatchLoss
from cellfm.ssl.kl_uniform import KLUniformLoss
from cellfm.ssl.koleo import KoLeoLoss
from cellfm.ssl.masking import BlockMaskGenerator
from cellfm.ssl.mcd import MCDSampler, context_channel_mask
from cellfm.ssl.supcon import SupConLoss, label_ids


@functools.lru_cache(maxsize=None)
def _forward_accepts(cls: type, name: str) -> bool:
    params = inspect.signature(cls.forward).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def supcon_label(cfg: Config) -> str:
    """The manifest column the weakly supervised SupCon term needs per sample ("" when it is off)."""
    if cfg.ssl.supcon_weight > 0 and not cfg.ssl.supcon_label:
        raise ConfigError("ssl.supcon_weight > 0 needs ssl.supcon_label (a manifest column, e.g. an antibody id)")
    return cfg.ssl.supcon_label if cfg.ssl.supcon_weight > 0 else ""


class EncoderWithHead(nn.Module):
    """Backbone + DINO head (+ an optional separate iBOT patch head). One forward call runs every crop,
    so DDP sees one graph per step.

    The backbone follows the common interface
        backbone(x (N, C, H, W), channel_names=None, channel_mask=None, patch_mask=None)
            -> {"cls": (N, D), "patch": (N, P, D), "registers": (N, R, D)}.
    `channel_names` is left out for a backbone whose forward does not take it (one that ignores channel
    identity); every other argument is passed only when given."""

    def __init__(self, backbone: nn.Module, head: DINOHead, ibot_head: DINOHead | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        # None: patch tokens go through `head` (iBOT's shared head) when patch predictions are asked for.
        self.ibot_head = ibot_head

    def forward(
        self,
        global_crops: Tensor,
        local_crops: Tensor | None = None,
        *,
        channel_names: list[list[str]] | None = None,
        channel_mask: Tensor | None = None,
        patch_mask: Tensor | None = None,
        predict_patches: Tensor | None = None,
        return_cls: bool = False,
    ) -> dict[str, Tensor]:
        """global_crops (G, B, C, g, g) (or (B, C, g, g) for one view), local_crops (L, B, C, l, l) or None.

        channel_names: B per-sample name lists; channel_mask (B, C) bool (True = the channel is seen), applied
        to every crop of a sample; patch_mask (G, B, P) bool: global-crop patches the backbone replaces by its
        mask token; predict_patches (G, B, P) bool: global-crop patch tokens to send through the patch head.

        Returns {"global": (G*B, K) CLS logits, "local": (L*B, K) if local crops,
                 "global_cls": (G*B, D) backbone CLS if return_cls,
                 "patch": (M, K') patch logits at the M True entries of predict_patches (row-major order of
                          predict_patches.flatten(0, 1).nonzero())}.
        Rows are view-major: row v*B + b is view v of sample b."""
        if global_crops.ndim == 4:
            global_crops = global_crops[None]
        n_global, batch = global_crops.shape[:2]
        out: dict[str, Tensor] = {}
        g = self.backbone(global_crops.flatten(0, 1),
                          **self._backbone_kwargs(n_global, channel_names, channel_mask, patch_mask))
        out["global"] = self.head(g["cls"])
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
            loc = self.backbone(local_crops.flatten(0, 1),
                                **self._backbone_kwargs(n_local, channel_names, channel_mask, None))
            out["local"] = self.head(loc["cls"])
        return out

    def _backbone_kwargs(self, n_views: int, channel_names: list[list[str]] | None, channel_mask: Tensor | None,
                         patch_mask: Tensor | None) -> dict:
        kwargs: dict = {}
        if channel_names is not None and _forward_accepts(type(self.backbone), "channel_names"):
            kwargs["channel_names"] = [list(names) for _ in range(n_views) for names in channel_names]
        if channel_mask is not None:
            kwargs["channel_mask"] = channel_mask.repeat(n_views, 1)
        if patch_mask is not None:
            kwargs["patch_mask"] = patch_mask.flatten(0, 1)
        return kwargs


def _separate_ibot_head(cfg: Config) -> bool:
    # DINOv2's training recipes untie the DINO and iBOT heads; the original iBOT (and C3R's code) share one.
    return cfg.ssl.ibot_separate_head


def _dino_head(cfg: Config, in_dim: int) -> DINOHead:
    return DINOHead(in_dim, cfg.ssl.head_out_dim, hidden_dim=cfg.ssl.head_hidden_dim,
                    bottleneck_dim=cfg.ssl.head_bottleneck_dim, nlayers=cfg.ssl.head_nlayers,
                    use_bn=cfg.ssl.head_use_bn)


def build_student_teacher(cfg: Config) -> tuple[EncoderWithHead, EncoderWithHead]:
    """Student and an identical teacher (no gradients; updated only by EMA). With `ssl.objective: ibot` and a
    separate iBOT head, both carry an `ibot_head` too. Without iBOT a backbone's `mask_token` is never used,
    so it is frozen (a trainable parameter that gets no gradient breaks DDP)."""
    backbone = build_backbone(cfg.model)
    head = _dino_head(cfg, backbone.embed_dim)
    ibot_head = None
    if cfg.ssl.objective == "ibot":
        if _separate_ibot_head(cfg):
            ibot_head = _dino_head(cfg, backbone.embed_dim)
    else:
        for name, p in backbone.named_parameters():
            if name.rsplit(".", 1)[-1] == "mask_token":
                p.requires_grad_(False)
    student = EncoderWithHead(backbone, head, ibot_head)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


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

    def forward(self, student: nn.Module, teacher: EncoderWithHead, global_crops: Tensor,
                local_crops: Tensor | None, teacher_temp: float,
                channel_names: list[list[str]] | None = None, **kwargs) -> StepLosses:
        """channel_names: per sample, the names of its channels in order (passed to backbones that take
        them; CellRep computes its channel embedding from content). Other keyword arguments (labels, ...)
        are ignored."""
        n_global, batch = global_crops.shape[:2]
        with torch.no_grad():
            teacher_logits = teacher(global_crops, channel_names=channel_names)["global"]
            teacher_probs = _teacher_targets(self.dino_loss, teacher_logits, teacher_temp, self.cfg.ssl.centering)
            teacher_probs = teacher_probs.view(n_global, batch, -1)

        out = student(global_crops, local_crops, channel_names=channel_names)
        dino, dino_global, dino_local = _dino_cls_terms(self.dino_loss, out, teacher_probs, n_global, batch)
        kl = _kl_uniform_term(self.kl_uniform, out, self.cfg.ssl.student_temp)
        total = dino + self.cfg.ssl.kl_uniform_weight * kl
        return StepLosses(total=total, terms={"dino_global": dino_global, "dino_local": dino_local, "kl_uniform": kl})


class IbotObjective(nn.Module):
    """DINO CLS loss + iBOT masked-patch loss (+ KoLeo, MCD, SupCon, KL-uniform when configured).

    Per step, with global_crops (G=2, B, C, g, g) and local_crops (L, B, C, l, l) or None:
    - block masks (G, B, P) for the global crops, P = (g / patch_size)^2 (`ssl.mask_sample_probability`,
      `ssl.mask_ratio_min_max`);
    - with `ssl.mcd`, a student channel mask (B, C) from the channel groups of `model.channel_groups`
      (every crop of a sample gets the same one); the teacher sees all channels;
    - teacher (no grad): unmasked global crops -> CLS targets and patch targets at the masked positions;
    - student (one call): masked global crops + local crops -> CLS logits, patch logits at masked positions;
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
        if s.global_crop_size % cfg.model.patch_size:
            raise ValueError(f"ssl.global_crop_size={s.global_crop_size} is not a multiple of "
                             f"model.patch_size={cfg.model.patch_size}")
        self.grid = s.global_crop_size // cfg.model.patch_size
        self.masking = BlockMaskGenerator(self.grid, tuple(s.mask_ratio_min_max), s.mask_sample_probability)
        self.mcd: MCDSampler | None = None
        if s.mcd:
            if not cfg.model.channel_groups:
                raise ValueError("ssl.mcd=true needs model.channel_groups (channel name -> context | concept)")
            self.mcd = MCDSampler(s.mcd_keep_counts)
        self._generator: torch.Generator | None = None

    @property
    def dino_loss(self) -> nn.Module:
        """Every teacher-center buffer of this objective (`dino.center`, `ibot.center`): what the training
        checkpoint saves as dino_loss.safetensors and restores on resume."""
        return self.losses

    def generator(self) -> torch.Generator:
        """CPU generator for masks and MCD, seeded per rank from train.seed (differs from multi-crop's)."""
        if self._generator is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            self._generator = torch.Generator().manual_seed(self.cfg.train.seed * 1000 + rank + 500_009)
        return self._generator

    def forward(self, student: nn.Module, teacher: EncoderWithHead, global_crops: Tensor,
                local_crops: Tensor | None, teacher_temp: float,
                channel_names: list[list[str]] | None = None, labels: list[str] | None = None,
                generator: torch.Generator | None = None, **kwargs) -> StepLosses:
        """channel_names: B per-sample channel-name lists (needed by MCD and name-aware backbones);
        labels: B per-sample weak labels for SupCon (skipped when None); generator: overrides the
        objective's own CPU generator for masks and MCD."""
        s = self.cfg.ssl
        gen = generator if generator is not None else self.generator()
        device = global_crops.device
        n_global, batch = global_crops.shape[:2]
        patch_mask = self.masking(n_global * batch, generator=gen).to(device).view(n_global, batch, -1)

        channel_mask = None
        if self.mcd is not None:
            if channel_names is None:
                raise ValueError("ssl.mcd=true needs the per-sample channel_names")
            is_context = context_channel_mask(channel_names, self.cfg.model.channel_groups)
            if is_context.shape != (batch, global_crops.shape[2]):
                raise ValueError(f"channel_names give {tuple(is_context.shape)} (samples, channels), "
                                 f"crops have {(batch, global_crops.shape[2])}")
            channel_mask = self.mcd(is_context, generator=gen).to(device)

        with torch.no_grad():
            t = teacher(global_crops, channel_names=channel_names, predict_patches=patch_mask)
            cls_probs = _teacher_targets(self.losses["dino"], t["global"], teacher_temp, s.centering)
            cls_probs = cls_probs.view(n_global, batch, -1)
            patch_probs = _teacher_targets(self.losses["ibot"], t["patch"], teacher_temp, s.centering)

        use_supcon = s.supcon_weight > 0 and labels is not None
        out = student(global_crops, local_crops, channel_names=channel_names, channel_mask=channel_mask,
                      patch_mask=patch_mask, predict_patches=patch_mask,
                      return_cls=s.koleo_weight > 0 or use_supcon)
        dino, dino_global, dino_local = _dino_cls_terms(self.losses["dino"], out, cls_probs, n_global, batch)
        ibot = self.losses["ibot"](out["patch"], patch_probs, patch_mask.flatten(0, 1))
        kl = _kl_uniform_term(self.kl_uniform, out, s.student_temp)
        total = dino + s.ibot_loss_weight * ibot + s.kl_uniform_weight * kl
        terms = {"dino_global": dino_global, "dino_local": dino_local, "ibot": ibot, "kl_uniform": kl}
        if s.koleo_weight > 0:
            cls = out["global_cls"].view(n_global, batch, -1)
            koleo = sum(self.koleo(cls[v]) for v in range(n_global))
            total = total + s.koleo_weight * koleo
            terms["koleo"] = koleo
        if use_supcon:
            if len(labels) != batch:
                raise ValueError(f"got {len(labels)} labels for a batch of {batch}")
            supcon = self.supcon(out["global_cls"], label_ids(labels, device).repeat(n_global))
            total = total + s.supcon_weight * supcon
            terms["supcon"] = supcon
        terms["mask_ratio"] = patch_mask.float().mean()
        if channel_mask is not None:
            terms["mcd_channels_seen"] = channel_mask.float().sum(dim=1).mean()
        return StepLosses(total=total, terms=terms)


OBJECTIVES: dict[str, type[nn.Module]] = {"dino": DinoObjective, "ibot": IbotObjective}


def build_objective(cfg: Config) -> nn.Module:
    """The training objective named by `ssl.objective` (dino | ibot)."""
    if cfg.ssl.objective not in OBJECTIVES:
        raise ValueError(f"ssl.objective={cfg.ssl.objective!r} is not one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[cfg.ssl.objective](cfg)
