"""AdamW parameter groups as in DINOv2: weight decay, layer-wise lr decay and the input-embedding lr
multiplier, with every backbone parameter's depth taken from the backbone's own declaration
(`ViTTrunk.parameter_layout`) rather than guessed from its name."""

from __future__ import annotations

from torch import nn

from cellfm.models.layers import ViTTrunk


def _backbone_layout(model: nn.Module) -> tuple[dict[str, int], frozenset[str], int]:
    """(layer of each backbone parameter, token parameter names, number of block layers), names as in
    `model.named_parameters()`; empty with 0 layers when the model holds no ViT trunk."""
    trunks = [(prefix, m) for prefix, m in model.named_modules() if isinstance(m, ViTTrunk)]
    if not trunks:
        return {}, frozenset(), 0
    if len(trunks) > 1:
        raise ValueError(f"parameter_groups expects one backbone, found ViT trunks at {[p for p, _ in trunks]}")
    prefix, trunk = trunks[0]
    layout = trunk.parameter_layout()
    full = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
    return ({full(n): layer for n, layer in layout.layer.items()}, frozenset(full(n) for n in layout.tokens),
            layout.num_layers)


def parameter_groups(model: nn.Module, layerwise_decay: float = 1.0, patch_embed_lr_mult: float = 1.0) -> list[dict]:
    """AdamW groups of the trainable parameters of `model` (a backbone, or a module holding one backbone
    and heads, such as the student).

    Layers: 0 = the backbone's input embedding with its tokens, 1..n = its blocks in forward order, n + 1 =
    its final norm and everything outside the backbone (heads). A group's `lr_scale` (applied to the
    scheduled lr) is `layerwise_decay ** (n + 1 - layer)`, times `patch_embed_lr_mult` at layer 0.
    No weight decay (`apply_wd` False, `weight_decay` 0.0) on biases, norms, layerscales (every parameter
    of at most one dimension) and on the backbone's tokens, positional and channel embeddings.
    `last_layer`: the heads' prototype layers, in groups of their own so an engine can hold them still
    while they are frozen."""
    layer_of, tokens, n_layers = _backbone_layout(model)
    groups: dict[tuple[bool, float, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        apply_wd = p.ndim > 1 and name not in tokens
        layer = layer_of.get(name, n_layers + 1)
        scale = layerwise_decay ** (n_layers + 1 - layer) * (patch_embed_lr_mult if layer == 0 else 1.0)
        last_layer = ".last_layer." in name
        group = groups.setdefault((apply_wd, scale, last_layer),
                                  {"params": [], "apply_wd": apply_wd, "lr_scale": scale, "last_layer": last_layer,
                                   **({} if apply_wd else {"weight_decay": 0.0})})
        group["params"].append(p)
    return list(groups.values())
