"""Putting LoRA factors into a model: validated first, then fused into the weights or injected with peft."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .files import CheckpointError


@dataclass
class LoRAWeights:
    """LoRA factors per module name: A is (r, in[, kh, kw]), B is (out, r[, 1, 1]); delta = scale * B @ A."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scale: float


def collect_lora_factors(
    sd: dict[str, torch.Tensor], path: str | os.PathLike
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Group peft keys `<module>.lora_A.<adapter>.weight` by module; adapters are merged (disjoint targets)."""
    a_parts: dict[str, torch.Tensor] = {}
    b_parts: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        for marker, parts in ((".lora_A.", a_parts), (".lora_B.", b_parts)):
            if marker in key:
                module = key.split(marker)[0]
                if module in parts:
                    raise CheckpointError(f"{path}: module {module} has LoRA weights in more than one adapter")
                parts[module] = value
    if a_parts.keys() != b_parts.keys():
        missing = sorted(a_parts.keys() ^ b_parts.keys())[:5]
        raise CheckpointError(f"{path}: LoRA A/B factors do not pair up (e.g. {missing}); the file looks truncated")
    return {m: (a_parts[m], b_parts[m]) for m in a_parts}


def apply_lora(
    model: nn.Module, lora: LoRAWeights, *, fuse: bool, adapter_name: str, source: str, release: Any = None
) -> None:
    """Add `lora` to `model`.

    fuse=True:  W <- W + scale * B @ A in place (plain modules afterwards: fast, saveable).
    fuse=False: peft LoRA layers with lora_alpha/r equal to the file's scale (unfusable, inspectable).
    `release(tensor)` runs for each factor once it is fused or copied (e.g. `MappedPages.release`: a memory-mapped
    LoRA file's pages then stay resident one layer at a time, not all of them to the end of the load).
    """
    if not lora.factors:
        return
    modules = dict(model.named_modules())
    for name, (a, b) in lora.factors.items():
        _check_factors(modules.get(name), name, a, b, source)
    release = release or (lambda tensor: None)
    if fuse:
        for name, (a, b) in lora.factors.items():
            fuse_lora_delta(modules[name], a, b, lora.scale)
            release(a), release(b)
        return
    from peft import LoraConfig

    targets = "^(" + "|".join(re.escape(n) for n in sorted(lora.factors)) + ")$"
    ranks = {name: a.shape[0] for name, (a, _) in lora.factors.items()}
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    # peft's scale is lora_alpha / r: give every module alpha = scale * its own rank
    odd = {name: r for name, r in ranks.items() if r != rank}
    config = LoraConfig(
        r=rank,
        lora_alpha=lora.scale * rank,
        target_modules=targets,
        init_lora_weights=False,
        rank_pattern={f"^{re.escape(n)}$": r for n, r in odd.items()},
        alpha_pattern={f"^{re.escape(n)}$": lora.scale * r for n, r in odd.items()},
    )
    model.add_adapter(config, adapter_name=adapter_name)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (a, b) in lora.factors.items():
            layer = modules[name]
            layer.lora_A[adapter_name].weight.copy_(a)
            layer.lora_B[adapter_name].weight.copy_(b)
            release(a), release(b)


FUSION_BLOCK_VALUES = 2**19  # float64 values per block of output rows: 4 MiB of workspace, whatever the layer


def fuse_lora_delta(module: nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """W += scale * B @ A, computed in float64; conv A carries the kernel, B is 1x1 (peft convention). A few output
    rows at a time, so the float64 workspace stays small next to the weights (a whole 1280x1280x3x3 layer in float64
    would be 3 x 118 MB at once); each value is the same sum as in one product."""
    weight = module.weight
    a = a.double().reshape(a.shape[0], -1).to(weight.device)
    b = b.double().reshape(b.shape[0], -1).to(weight.device)
    step = max(1, FUSION_BLOCK_VALUES // max(a.shape[1], 1))
    workspace = torch.empty(min(step, weight.shape[0]), a.shape[1], dtype=torch.float64, device=weight.device)
    with torch.no_grad():
        for start in range(0, weight.shape[0], step):
            block = weight[start : start + step]  # a view in any memory format (channels-last included)
            rows = workspace[: block.shape[0]]
            rows.view(block.shape).copy_(block)
            # W + scale * (B @ A) in one float64 pass: the same values as the product, added and scaled separately
            # (tests), at under half the memory traffic (OSEDiff's fusion took 1.5 s of a 4.4 s load that way)
            rows.addmm_(b[start : start + step], a, alpha=scale)
            block.copy_(rows.view(block.shape))


def replace_weights(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Overwrite parameters by name (e.g. OSEDiff's fully retrained `conv_in`), shapes checked."""
    params = dict(model.named_parameters())
    for name, value in tensors.items():
        if name not in params:
            raise CheckpointError(
                f"{source}: the base model has no parameter {name}; wrong base model for these weights?"
            )
        if params[name].shape != value.shape:
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(value.shape)} but the base model expects "
                f"{tuple(params[name].shape)}; wrong base model for these weights?"
            )
        with torch.no_grad():
            params[name].copy_(value)


def _check_factors(module, name: str, a: torch.Tensor, b: torch.Tensor, source: str) -> None:
    hint = "wrong base model for these weights?"
    if module is None:
        raise CheckpointError(f"{source}: LoRA targets module {name!r}, which the base model does not have; {hint}")
    module = getattr(module, "base_layer", module)  # a layer that already carries an adapter: its base layer
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise CheckpointError(f"{source}: LoRA target {name!r} is a {type(module).__name__}, not Linear/Conv2d")
    w = module.weight
    rank = a.shape[0]
    if rank < 1:
        raise CheckpointError(f"{source}: LoRA for {name!r} has rank 0 (A {tuple(a.shape)}); a rank is >= 1")
    if isinstance(module, nn.Linear):
        expected_a, expected_b = (rank, w.shape[1]), (w.shape[0], rank)
    else:
        expected_a, expected_b = (rank, *w.shape[1:]), (w.shape[0], rank, 1, 1)
    if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
        raise CheckpointError(
            f"{source}: LoRA for {name!r} has A {tuple(a.shape)}, B {tuple(b.shape)}; the base layer "
            f"{tuple(w.shape)} with rank {rank} needs A {expected_a}, B {expected_b}; {hint}"
        )
