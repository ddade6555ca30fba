"""C3R: context/concept channel grouping with per-group branch encoders, a channel-mean combiner and a
joint ViT encoder (DESIGN §4; reference: github umarikkar/C3R, models/vision_transformer_cce.py).

Channels are split by *name* into a context group (e.g. DNA, ER, microtubules: where things are) and a
concept group (e.g. the protein / stain of interest). Every channel is embedded and encoded alone with
its group's weights (cost linear in C), the channels of a group are averaged, and the two group means
(each D/2 wide) are concatenated into one D-wide token sequence for the joint encoder."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from cellfm.models.layers import (
    Block,
    ChannelAttentionPool,
    LayerNorm,
    PatchEmbed,
    ViTTrunk,
    apply_patch_mask,
    check_channel_mask,
    check_image,
    check_patch_mask,
    drop_path_rates,
    grid_of,
    keep_in_graph,
    normalize_channel_names,
)

GROUPS = ("context", "concept")


def c3r_joint_depth(depth: int, n_pre: int) -> int:
    """Blocks of the joint encoder f_s of a C3R with the trunk depth of a `depth`-block ViT and `n_pre` branch
    depths: the whole blocks left after the branches (each branch depth costs half a block), never more."""
    return depth - math.ceil(n_pre / 2)


class C3R(ViTTrunk):
    """Context-concept channel-adaptive ViT.

    Per group g in (context, concept), with weights shared by all channels of that group:
      stem      InstanceNorm2d(1, affine=False) -> PatchEmbed(1 -> D/2, kernel=stride=patch_size)
      tokens    [CLS_g, patches] + the group's half of the trunk's positional embedding (context: [:D/2],
                concept: [D/2:]); the trunk's CLS, CLS position and mask token are likewise split in halves;
                no channel-identity embedding anywhere
      f_c       n_pre pre-norm blocks at width D/2, run on every channel independently
    combiner g  per sample and group: mean over that group's real channels (CLS and patch tokens),
                concat(context mean, concept mean) -> LayerNorm(D); with channel_pooling="attention" each
                group's mean is a ChannelAttentionPool (the mean plus k content-chosen channel slots)
    f_s         the ViT trunk: `c3r_joint_depth(depth, n_pre)` blocks at width D (+ optional registers), final
                LayerNorm; its CLS input is the combined CLS.

    Parameter budget. One branch depth (a D/2 block per group, x 2 groups) holds half the weights of one block
    at D. The joint trunk gets the whole blocks left after the branches, never more (the C3R code's rule):
    depth - ceil(n_pre / 2). Even n_pre: exactly a `depth`-block ViT's worth of blocks (n_pre = 2: joint depth
    11 at ViT-S/B, within 2% of the ViT's parameters); odd n_pre: half a block under it.

    Missing group. The reference code assumes both groups present (an empty group's mean is over zero
    channels: NaN / shape error). Here a sample whose group has no real channel (a 1-channel brightfield
    image, or MCD dropping every context channel) gets that group's learned `absent_token` (D/2,
    broadcast over CLS and all patch positions) in place of the group mean; the other half carries the
    image. The absent tokens are trained whenever such inputs occur in training.

    Heads: f_c uses max(1, num_heads // 2) heads at D/2 (keeps head_dim = 64 for ViT-S/B); the reference
    code keeps num_heads (head_dim 32). Head count does not change the parameter count."""

    def __init__(
        self,
        channel_groups: Mapping[str, str] | None = None,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        n_pre: int = 2,
        num_register_tokens: int = 0,
        drop_path_rate: float = 0.0,
        layerscale_init: float | None = 1e-5,
        qkv_bias: bool = True,
        branch_num_heads: int | None = None,
        channel_pooling: str = "mean",
        channel_pooling_queries: int = 4,
    ):
        """channel_groups: channel name -> "context" | "concept" (config `model.channel_groups`); may be
        changed later with set_channel_groups (e.g. at inference for unseen stains).
        channel_pooling: how the combiner pools a group's channels: "mean" (C3R's) or "attention" (per group a
        ChannelAttentionPool with `channel_pooling_queries` content-chosen slots, at width D/2)."""
        if channel_pooling not in ("mean", "attention"):
            raise ValueError(f"channel_pooling must be 'mean' or 'attention', got {channel_pooling!r}")
        if embed_dim % 2:
            raise ValueError(f"C3R needs an even embed_dim (two halves of D/2), got {embed_dim}")
        if n_pre < 0:
            raise ValueError(f"n_pre must be >= 0, got {n_pre}")
        joint_depth = c3r_joint_depth(depth, n_pre)
        if joint_depth < 1:
            raise ValueError(f"depth={depth} leaves no joint block for n_pre={n_pre} "
                             f"(joint depth = depth - ceil(n_pre / 2))")
        # One stochastic-depth ramp over the whole path of a token: branch blocks first, then the joint trunk.
        drop_rates = drop_path_rates(drop_path_rate, n_pre + joint_depth)
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, num_heads=num_heads,
                         block_drop_path=drop_rates[n_pre:], mlp_ratio=mlp_ratio,
                         num_register_tokens=num_register_tokens, layerscale_init=layerscale_init, qkv_bias=qkv_bias)
        self.channel_groups: dict[str, str] = {}
        self.set_channel_groups(channel_groups or {})
        self.half = embed_dim // 2
        self.n_pre = n_pre
        self.joint_depth = joint_depth
        half = self.half
        branch_heads = branch_num_heads or max(1, num_heads // 2)

        self.stems = nn.ModuleDict(
            {g: nn.Sequential(nn.InstanceNorm2d(1, affine=False), PatchEmbed(1, half, patch_size)) for g in GROUPS}
        )
        self.absent_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.branches = nn.ModuleDict(
            {
                g: nn.ModuleList(
                    Block(half, branch_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=drop_rates[i],
                          layerscale_init=layerscale_init)
                    for i in range(n_pre)
                )
                for g in GROUPS
            }
        )
        self.combiner_norm = LayerNorm(embed_dim)
        # None with mean pooling: the default module tree (and its seeded init) is C3R's.
        self.channel_pools = (nn.ModuleDict({g: ChannelAttentionPool(half, channel_pooling_queries) for g in GROUPS})
                              if channel_pooling == "attention" else None)
        self.init_weights()

    def token_parameters(self) -> list[nn.Parameter]:
        queries = [] if self.channel_pools is None else [self.channel_pools[g].queries for g in GROUPS]
        return [*super().token_parameters(), self.absent_token, *queries]

    def combiner(self) -> list[nn.Module]:
        """The combiner's modules: its norm and, with attention pooling, the pools' layers."""
        if self.channel_pools is None:
            return [self.combiner_norm]
        return [self.combiner_norm, *(m for g in GROUPS for m in self.channel_pools[g].weight_modules())]

    def input_embedding(self) -> list[nn.Module]:
        """The two stems (and the combiner when there are no branch blocks)."""
        return [self.stems] + ([] if self.n_pre else self.combiner())

    def block_layers(self) -> list[list[nn.Module]]:
        """Branch depth i (both groups' block i) at layer i + 1, the combiner with the last branch
        blocks, then the joint trunk's blocks: true depth, the branches below the trunk."""
        branch = [[self.branches[g][i] for g in GROUPS] for i in range(self.n_pre)]
        if branch:
            branch[-1].extend(self.combiner())
        return branch + super().block_layers()

    # -- channel grouping -------------------------------------------------------------------------

    def set_channel_groups(self, channel_groups: Mapping[str, str]) -> None:
        """Replace the name -> group mapping (no parameter depends on it)."""
        bad = {k: v for k, v in dict(channel_groups).items() if v not in GROUPS}
        if bad:
            raise ValueError(f"channel_groups values must be one of {list(GROUPS)}, got {bad}")
        self.channel_groups = {str(k): str(v) for k, v in dict(channel_groups).items()}

    def group_ids(self, channel_names: list[list[str]], channel_mask: Tensor | None, device) -> Tensor:
        """(B, C) long: 0 = context, 1 = concept, -1 = masked channel (its name is not looked up)."""
        ids = []
        for b, row in enumerate(channel_names):
            out = []
            for c, name in enumerate(row):
                if channel_mask is not None and not bool(channel_mask[b, c]):
                    out.append(-1)
                    continue
                group = self.channel_groups.get(name)
                if group is None:
                    raise ValueError(
                        f"C3R: channel {name!r} (sample {b}, channel {c}) has no context/concept group; known "
                        f"mapping (model.channel_groups): {self.channel_groups or '{} (empty)'}. Add it to "
                        f"model.channel_groups, e.g. model.channel_groups={{{name!r}: context}}"
                    )
                out.append(GROUPS.index(group))
            ids.append(out)
        return torch.tensor(ids, dtype=torch.long, device=device)

    # -- forward ----------------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        channel_names=None,
        channel_mask: Tensor | None = None,
        patch_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """x: (B, C, H, W), any C >= 1; channel_names: B lists of C names (or one list shared by the
        batch), required, each real name must be in channel_groups; channel_mask: (B, C) bool, False =
        padding / dropped (MCD): such channels are not computed and excluded from the group means;
        patch_mask: (B, L) bool, True = every channel's patch token at that grid position is replaced by
        the group's half of mask_token before the branch encoders (as in C3R).
        Returns final-normed cls (B, D), patch (B, L, D), registers (B, R, D)."""
        h = self.prepare_tokens(x, channel_names, channel_mask, patch_mask)
        return self.forward_trunk(h[:, 1:], cls=h[:, 0])

    def embed_channels(self, planes: Tensor, group: int, grid: tuple[int, int],
                       patch_mask: Tensor | None = None) -> Tensor:
        """Stem + tokens of one group: planes (n, 1, H, W) -> (n, 1 + L, D/2) = [CLS, patches] + positions.
        patch_mask: (n, L) bool per plane."""
        sl = slice(group * self.half, (group + 1) * self.half)
        tokens = apply_patch_mask(self.stems[GROUPS[group]](planes), patch_mask, self.mask_token[:, sl])  # (n, L, D/2)
        cls = self.cls_embedding()[:, :, sl].expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens + self.positions(grid)[:, :, sl]], dim=1)

    def prepare_tokens(
        self,
        x: Tensor,
        channel_names=None,
        channel_mask: Tensor | None = None,
        patch_mask: Tensor | None = None,
    ) -> Tensor:
        """Stems, branch encoders and combiner: (B, C, H, W) -> (B, 1 + L, D) = [combined CLS, combined patch
        tokens], the input of the joint trunk."""
        B, C, H, W = check_image(x, "C3R")
        grid = grid_of((H, W), self.patch_size)
        L = grid[0] * grid[1]
        check_channel_mask(channel_mask, B, C)
        check_patch_mask(patch_mask, B, L)
        names = normalize_channel_names(channel_names, B, C, "C3R")
        if names is None:
            raise ValueError(
                "C3R needs channel_names (B lists of C names) to split channels into context/concept groups"
            )
        ids = self.group_ids(names, channel_mask, x.device)  # (B, C)

        halves, unused = [], []
        for group, g in enumerate(GROUPS):
            sl = slice(group * self.half, (group + 1) * self.half)
            absent = self.absent_token[:, :, sl].to(x.dtype).expand(B, 1 + L, -1)
            member = ids == group  # (B, C)
            count = member.sum(dim=1)  # (B,)
            if not bool(member.any()):
                # Nobody in the batch has this group: no compute; its weights stay in the graph (DDP).
                halves.append(absent)
                unused += list(self.stems[g].parameters()) + list(self.branches[g].parameters())
                if self.channel_pools is not None:
                    unused += list(self.channel_pools[g].parameters())
                continue
            b_idx, c_idx = member.nonzero(as_tuple=True)  # real channels of this group, flattened
            planes = x[b_idx, c_idx].unsqueeze(1)  # (n, 1, H, W)
            tokens = self.embed_channels(planes, group, grid, None if patch_mask is None else patch_mask[b_idx])
            for blk in self.branches[g]:
                tokens = blk(tokens)  # every channel alone: cost linear in C
            present = (count > 0)[:, None, None]
            if self.channel_pools is None:
                summed = tokens.new_zeros(B, 1 + L, self.half).index_add_(0, b_idx, tokens)
                pooled = summed / count.clamp_min(1).to(tokens.dtype)[:, None, None]
            else:
                per_channel = tokens.new_zeros(B, C, 1 + L, self.half).index_put((b_idx, c_idx), tokens)
                # A sample without this group pools its zero tokens (finite, replaced by `absent` below) rather
                # than an empty set (a softmax over no channel is NaN, and NaN would leak into the gradients).
                pooled = self.channel_pools[g](per_channel, member | (count == 0)[:, None])
            halves.append(torch.where(present, pooled, absent))
            if bool(present.all()):
                unused.append(self.absent_token)

        h = self.combiner_norm(torch.cat(halves, dim=-1))  # (B, 1 + L, D)
        if torch.is_grad_enabled():
            h = h + keep_in_graph(unused)  # keeps DDP (find_unused_parameters=False) happy
        return h
