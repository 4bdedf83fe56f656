"""Reading SR weight files safely and telling which method they belong to.

Each supported format has one small detector that looks only at the keys (spandrel style);
`read_weights` never unpickles code: pickles go through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

PICKLE_SUFFIXES = (".pkl", ".pth", ".pt", ".ckpt", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


class CheckpointError(ValueError):
    """A weight file that is missing, unreadable, of an unknown format, or does not fit the base model."""


def read_weights(path: str | os.PathLike, allow_tensor: bool = False) -> Any:
    """Load a weight file into a dict (or, with allow_tensor, a single tensor) without executing code from it."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; expected a weight file such as osediff.pkl")
    if not path.is_file():
        raise CheckpointError(f"weight file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupted?): {err}") from err
    if suffix in PICKLE_SUFFIXES:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=_is_zip(path))
        except pickle.UnpicklingError as err:
            raise CheckpointError(
                f"{path}: refused to load: the pickle contains more than tensors and plain containers, and "
                f"unpickling arbitrary objects could run code. Convert it to safetensors from a trusted source. ({err})"
            ) from err
        except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: could not be read (truncated or corrupted?): {err}") from err
        if not isinstance(state, dict) and not (allow_tensor and isinstance(state, torch.Tensor)):
            raise CheckpointError(f"{path}: expected a dict of weights, found a {type(state).__name__}")
        return state
    raise CheckpointError(
        f"{path}: unknown file type {suffix!r}; expected one of {SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES}"
    )


def read_weight_keys(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a (possibly huge) checkpoint, cheaply: safetensors headers only, pickles memory-mapped."""
    path = Path(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES and path.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupted?): {err}") from err
    state = read_weights(path)
    if isinstance(state.get("state_dict"), dict):  # LDM .ckpt files nest the weights
        state = state["state_dict"]
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _is_zip(path: Path) -> bool:
    # memory-mapping needs the zip-based format; legacy pickles are read into memory
    return zipfile.is_zipfile(path)


# ---------------------------------------------------------------------------- detectors


def _is_osediff(state: dict[str, Any]) -> bool:
    return {"state_dict_unet", "state_dict_vae", "rank_unet", "rank_vae"} <= state.keys()


def _lora_keys_under(state: dict[str, Any], prefix: str) -> bool:
    keys = [k for k in state if isinstance(k, str)]
    return bool(keys) and all(k.startswith(prefix) for k in keys) and any(".lora_A." in k for k in keys)


def _is_tsdsr_transformer(state: dict[str, Any]) -> bool:
    # saved by StableDiffusion3Pipeline.save_lora_weights: peft keys behind a `transformer.` prefix
    return _lora_keys_under(state, "transformer.") and any(".transformer_blocks." in k for k in state)


def _is_tsdsr_vae(state: dict[str, Any]) -> bool:
    # the TSD-SR quirk: the VAE-encoder LoRA file carries the `transformer.` prefix too
    return _lora_keys_under(state, "transformer.") and all(
        k.startswith(("transformer.encoder.", "transformer.quant_conv.")) for k in state
    )


FORMAT_DETECTORS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "osediff": _is_osediff,
    "tsdsr-transformer": _is_tsdsr_transformer,
    "tsdsr-vae": _is_tsdsr_vae,
}


def detect_format(state: dict[str, Any], path: str | os.PathLike = "<weights>") -> str:
    for name, detector in FORMAT_DETECTORS.items():
        if detector(state):
            return name
    keys = ", ".join(list(map(str, state.keys()))[:8])
    raise CheckpointError(
        f"{path}: unknown SR weight format (first keys: {keys}). Supported: "
        "OSEDiff `osediff.pkl` (keys state_dict_unet, state_dict_vae, rank_unet, rank_vae); "
        "TSD-SR `transformer.safetensors` + `vae.safetensors` (LoRA keys `transformer.*.lora_A.weight`)."
    )


# ---------------------------------------------------------------------------- OSEDiff

# peft's default lora_alpha, which OSEDiff never overrides: every delta is (8 / rank) * B @ A.
OSEDIFF_LORA_ALPHA = 8


@dataclass
class LoRAWeights:
    """LoRA factors per module name: A is (r, in[, kh, kw]), B is (out, r[, 1, 1]); delta = scale * B @ A."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scale: float


@dataclass
class OSEDiffWeights:
    unet_lora: LoRAWeights
    vae_lora: LoRAWeights
    unet_replacements: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. conv_in.weight


def parse_osediff(state: dict[str, Any], path: str | os.PathLike = "<weights>") -> OSEDiffWeights:
    try:
        rank_unet, rank_vae = int(state["rank_unet"]), int(state["rank_vae"])
        unet_sd, vae_sd = state["state_dict_unet"], state["state_dict_vae"]
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: malformed OSEDiff checkpoint: {err}") from err
    replacements = {}
    for key, value in unet_sd.items():
        if ".base_layer." in key:  # a fully retrained base layer (conv_in in OSEDiff)
            replacements[key.replace(".base_layer.", ".")] = value
    unet_lora = LoRAWeights(_collect_lora_factors(unet_sd, path), OSEDIFF_LORA_ALPHA / rank_unet)
    vae_lora = LoRAWeights(_collect_lora_factors(vae_sd, path), OSEDIFF_LORA_ALPHA / rank_vae)
    for name, lora, rank in (("UNet", unet_lora, rank_unet), ("VAE", vae_lora, rank_vae)):
        ranks = {a.shape[0] for a, _ in lora.factors.values()}
        if ranks and ranks != {rank}:
            raise CheckpointError(f"{path}: the {name} LoRA factors have rank {sorted(ranks)} but the file says {rank}")
    return OSEDiffWeights(unet_lora=unet_lora, vae_lora=vae_lora, unet_replacements=replacements)


# ---------------------------------------------------------------------------- TSD-SR


def parse_tsdsr_lora(state: dict[str, torch.Tensor], path: str | os.PathLike = "<weights>") -> LoRAWeights:
    """TSD-SR LoRA (transformer or VAE file): prefix `transformer.` stripped; lora_alpha = r, so scale 1."""
    stripped = {k[len("transformer."):]: v for k, v in state.items()}
    return LoRAWeights(_collect_lora_factors(stripped, path), 1.0)


def read_tsdsr_embeddings(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled) from a folder with prompt_embeds.pt + pool_embeds.pt, or a safetensors file with both."""
    path = Path(path)
    if path.is_dir():
        pt = (path / "prompt_embeds.pt", path / "pool_embeds.pt")
        if all(p.is_file() for p in pt):
            embeds, pooled = (read_weights(p, allow_tensor=True) for p in pt)
        else:
            files = sorted(path.glob("*.safetensors"))
            found = [f for f in files if {"prompt_embeds", "pool_embeds"} <= set(read_weight_keys(f))]
            if not found:
                raise CheckpointError(
                    f"{path}: no TSD-SR embeddings found; expected prompt_embeds.pt and pool_embeds.pt "
                    "(or a .safetensors file with tensors prompt_embeds and pool_embeds)"
                )
            state = read_weights(found[0])
            embeds, pooled = state["prompt_embeds"], state["pool_embeds"]
    else:
        state = read_weights(path)
        if not {"prompt_embeds", "pool_embeds"} <= state.keys():
            raise CheckpointError(f"{path}: expected tensors 'prompt_embeds' and 'pool_embeds', found {sorted(state)[:6]}")
        embeds, pooled = state["prompt_embeds"], state["pool_embeds"]
    for name, t, ndim in (("prompt_embeds", embeds, 3), ("pool_embeds", pooled, 2)):
        if not isinstance(t, torch.Tensor) or t.ndim not in (ndim - 1, ndim):
            raise CheckpointError(f"{path}: {name} must be a tensor of {ndim - 1} or {ndim} dims, got {getattr(t, 'shape', t)}")
    return embeds, pooled


def _collect_lora_factors(sd: dict[str, torch.Tensor], path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
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
