"""The one ViT trunk every backbone builds on: [CLS, registers, patch tokens] -> blocks -> final norm ->
{"cls", "patch", "registers"}, the learned tokens around it, and each backbone's declaration of which
parameter sits at which depth (for layer-wise lr decay)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cellfm.models.layers.block import Block
from cellfm.models.layers.init import init_weights_trunc_normal
from cellfm.models.layers.keep_in_graph import keep_in_graph
from cellfm.models.layers.norm import LayerNorm
from cellfm.models.layers.patch_embed import grid_of
from cellfm.models.layers.pos_embed import interpolate_pos_embed, sincos_pos_embed_2d


@dataclass(frozen=True)
class ParameterLayout:
    """Where every parameter of a backbone sits, by name (as in `named_parameters()`):
    `layer`: 0 = input embedding (with the tokens), 1..num_layers = blocks in forward order,
    num_layers + 1 = final norm; `tokens`: the names of learned tokens and position / channel embeddings."""

    layer: dict[str, int]
    tokens: frozenset[str]
    num_layers: int


class ViTTrunk(nn.Module, ABC):
    """Base class of every backbone (DINOv2's ViT without its patch embedding). It owns

      cls_token, cls_pos_embed  (1, 1, D)   the CLS token and its learned position
      pos_embed                 (1, L, D)   learned patch positions at `img_size`, resampled for other sizes
                                            (None with sincos_positions: fixed 2-D sin-cos positions instead)
      register_tokens           (1, R, D)   optional registers (no position), None when R = 0
      mask_token                (1, D)      iBOT's replacement for masked patches (a backbone applies it)
      blocks                    `len(block_drop_path)` pre-norm blocks at width D
      norm                      the final LayerNorm

    and runs them in `forward_trunk`. A backbone turns (B, C, H, W) images into patch tokens its own way and
    declares, for the parameter groups, its `input_embedding()` modules, any extra `token_parameters()` and,
    if it has blocks outside `blocks`, its `block_layers()`. It calls `init_weights()` at the end of its
    constructor."""

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int],
        patch_size: int,
        embed_dim: int,
        num_heads: int,
        block_drop_path: Sequence[float],
        mlp_ratio: float = 4.0,
        num_register_tokens: int = 0,
        layerscale_init: float | None = 1e-5,
        qkv_bias: bool = True,
        sincos_positions: bool = False,
    ):
        """block_drop_path: the stochastic-depth rate of each trunk block; its length is the trunk's depth.
        sincos_positions: fixed 2-D sin-cos patch positions (no learned `pos_embed`), as MAE and CA-MAE."""
        super().__init__()
        if not block_drop_path:
            raise ValueError("the ViT trunk needs at least one block")
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.grid_size = grid_of(img_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.cls_pos_embed = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = None if sincos_positions else nn.Parameter(
            torch.zeros(1, self.grid_size[0] * self.grid_size[1], embed_dim))
        # None rather than a 0-sized parameter: empty parameters trip up some optimizer/ZeRO code paths.
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens > 0 else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # DINOv2: zeros
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=rate, layerscale_init=layerscale_init)
            for rate in block_drop_path
        )
        self.norm = LayerNorm(embed_dim)

    # -- shared pieces of the forward ----------------------------------------------------------------

    def num_patch_tokens(self, img_size: int | tuple[int, int]) -> int:
        """N of the output `patch` (and of patch_mask): L, the patch grid size (a backbone may override)."""
        h, w = grid_of(img_size, self.patch_size)
        return h * w

    def positions(self, grid: tuple[int, int]) -> Tensor:
        """(1, h * w, D) patch positions for a patch grid (h, w): the learned ones, resampled when the grid is not
        `grid_size`, or the fixed sin-cos ones."""
        if self.pos_embed is None:
            return sincos_pos_embed_2d(grid, self.embed_dim).to(self.cls_token.device, self.cls_token.dtype)
        return interpolate_pos_embed(self.pos_embed, self.grid_size, grid)

    def cls_embedding(self) -> Tensor:
        """(1, 1, D): the CLS token plus its position."""
        return self.cls_token + self.cls_pos_embed

    def forward_trunk(self, tokens: Tensor, cls: Tensor | None = None,
                      key_mask: Tensor | None = None) -> dict[str, Tensor]:
        """tokens: (B, N, D) patch tokens, positions already added. cls: optional (B, D) CLS input (C3R's
        combined branch CLS); default cls_token + cls_pos_embed. key_mask: optional (B, N) bool, False = a
        padding token, never attended to (CLS and registers always are).
        Returns final-normed {"cls": (B, D), "patch": (B, N, D), "registers": (B, R, D)}."""
        B = tokens.shape[0]
        prefix = [self.cls_embedding().expand(B, -1, -1) if cls is None else cls.unsqueeze(1)]
        if self.register_tokens is not None:
            prefix.append(self.register_tokens.expand(B, -1, -1))
        P = 1 + self.num_register_tokens
        h = torch.cat([*prefix, tokens], dim=1)
        if key_mask is not None:
            key_mask = torch.cat([key_mask.new_ones(B, P), key_mask], dim=1)
        for blk in self.blocks:
            h = blk(h, key_mask)
        h = self.norm(h)
        cls_out = h[:, 0]
        if torch.is_grad_enabled():
            # Without a patch_mask the mask token takes no part; DDP (find_unused_parameters=False) needs it.
            cls_out = cls_out + keep_in_graph([self.mask_token])
        return {"cls": cls_out, "registers": h[:, 1:P], "patch": h[:, P:]}

    # -- declarations: initialisation and parameter groups ---------------------------------------------

    def token_parameters(self) -> list[nn.Parameter]:
        """Learned tokens and position / channel embeddings: layer 0, no weight decay, initialised
        ~ trunc normal(std .02) except the mask token (zeros). A backbone with more extends the list."""
        return [p for p in (self.cls_token, self.cls_pos_embed, self.pos_embed, self.register_tokens,
                            self.mask_token) if p is not None]

    @abstractmethod
    def input_embedding(self) -> list[nn.Module | nn.Parameter]:
        """The backbone's modules that turn pixels into the trunk's patch tokens (layer 0 with the tokens;
        `optim.patch_embed_lr_mult` applies). Every backbone declares its own."""

    def block_layers(self) -> list[list[nn.Module | nn.Parameter]]:
        """The modules at depth 1, 2, ... in forward order (one list per depth). Default: the trunk's blocks."""
        return [[blk] for blk in self.blocks]

    def parameter_layout(self) -> ParameterLayout:
        """Every parameter's layer from the declarations above (final norm on top). A parameter that no
        declaration names, or that two name, is an error: a new module must be placed on purpose."""
        layer_of: dict[int, int] = {}

        def place(items: Sequence[nn.Module | nn.Parameter], layer: int) -> None:
            for item in items:
                for p in item.parameters() if isinstance(item, nn.Module) else [item]:
                    if id(p) in layer_of:
                        raise ValueError(f"{type(self).__name__} places a parameter of shape {tuple(p.shape)} "
                                         f"at layers {layer_of[id(p)]} and {layer}")
                    layer_of[id(p)] = layer

        blocks = self.block_layers()
        place([*self.token_parameters(), *self.input_embedding()], 0)
        for depth, modules in enumerate(blocks, start=1):
            place(modules, depth)
        place([self.norm], len(blocks) + 1)
        named = list(self.named_parameters())
        undeclared = [name for name, p in named if id(p) not in layer_of]
        if undeclared:
            raise ValueError(f"{type(self).__name__} does not place {undeclared} in its input_embedding(), "
                             "token_parameters() or block_layers()")
        token_ids = {id(p) for p in self.token_parameters()}
        return ParameterLayout(layer={name: layer_of[id(p)] for name, p in named},
                               tokens=frozenset(name for name, p in named if id(p) in token_ids),
                               num_layers=len(blocks))

    def init_weights(self) -> None:
        """DINOv2 init: tokens ~ trunc normal(std .02) (the mask token stays 0), Linear layers as in
        init_weights_trunc_normal."""
        for p in self.token_parameters():
            if p is not self.mask_token:
                nn.init.trunc_normal_(p, std=0.02)
        self.apply(init_weights_trunc_normal)
