"""Supported SR methods (one module each) and the two entry points that walk them.

To add a method: write `methods/<name>.py` defining `detect`, `build` and one registered `Method`
(see osediff.py), and import it below. Nothing else in the package names a method.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..loading.devices import prepare_for_inference, release_freed_memory, resolve_device, resolve_dtype
from ..loading.files import CheckpointError
from ..loading.validation import check_pipeline_weights, checkpoint_errors

if TYPE_CHECKING:
    from ..pipeline_base import OneStepSRBase

# The built-in methods, in the order they are tried and listed.
from . import osediff, tsdsr  # noqa: I001, F401  (registers them, in this order)
from . import resshift  # noqa: F401
from . import d3sr  # noqa: F401  (metadata-tagged files of our own; after the official formats)
from .registry import (
    BaseModel,
    BuildOptions,
    Method,
    WeightFile,
    component_files,
    detect_method,
    folder_markers,
    get_method,
    method_of,
    register,
    registered_methods,
    unregister,
)

__all__ = [
    "BaseModel",
    "BuildOptions",
    "Method",
    "WeightFile",
    "component_files",
    "convert_to_diffusers",
    "detect_method",
    "folder_markers",
    "get_method",
    "load_converted",
    "load_pipeline",
    "method_of",
    "register",
    "registered_methods",
    "resolve_tagger",
    "unregister",
]


def load_pipeline(
    base: str | os.PathLike,
    weights: str | os.PathLike,
    dtype: Any = None,
    device: Any = None,
    fuse_lora: bool = True,
    base_config: str | os.PathLike | None = None,
    method: str | None = None,
    tagger: Any = None,
    **method_options: Any,
) -> OneStepSRBase:
    """A ready pipeline from a base model and official SR weights; the method is detected from the files.

    Args:
        base: the base model the method needs, as a diffusers folder or a single-file checkpoint
            (e.g. SD2.1-base for OSEDiff, SD3-medium for TSD-SR; see `registered_methods()`).
        weights: the official SR weights (a file, or a folder for methods whose weights are several files).
        dtype: None (fp32), "auto", "fp32", "bf16", "fp16" or a torch dtype.
        device: None (stay on CPU), "auto", or any torch device string.
        fuse_lora: merge the LoRA into the base weights (default: faster, no peft layers remain);
            False keeps peft LoRA layers (inspectable, can be disabled or unfused).
        base_config: configs for a single-file base (default: the configs bundled for the method's base).
        method: a registered method id, to skip detection.
        tagger: an image tagger that writes each image's prompt (OSEDiff's DAPE): a loaded `RAMTagger`, a converted
            tagger folder, the RAM base file alone, or the pair (RAM base, DAPE LoRA) of official files. Only
            pipelines that take a tagger accept one.
        **method_options: files only some methods take, e.g. TSD-SR's `embeddings=` (a folder with
            prompt_embeds.pt + pool_embeds.pt, or one safetensors file with both).
    """
    device = resolve_device(device) if device is not None else torch.device("cpu")
    dtype = resolve_dtype(dtype, device)
    with checkpoint_errors(weights, "SR weights"):
        found, probe = detect_method(weights, method)
    unknown = {k for k, v in method_options.items() if v is not None} - set(found.extra_options)
    if unknown:
        raise ValueError(
            f"{found.display_name} takes no option(s) {sorted(unknown)}"
            + (f"; it takes {list(found.extra_options)}" if found.extra_options else "")
        )
    options = BuildOptions(dtype=dtype, fuse_lora=fuse_lora, base_config=base_config, extra=method_options)
    with checkpoint_errors(f"{base} + {weights}", f"{found.display_name} (base + weights)"):
        pipe = found.build(base, probe, options)
    if tagger is not None:
        if not pipe.accepts_tagger:
            raise ValueError(f"{found.display_name} takes no tagger (its prompts do not come from image tags)")
        pipe.register_modules(tagger=resolve_tagger(tagger))
    # the built pipeline as a whole (LoRA fused, embeddings attached): finite weights, config in range
    check_pipeline_weights(pipe, f"{base} + {weights}")
    pipe.check_config(weights)
    pipe = prepare_for_inference(pipe, device, dtype)
    release_freed_memory()  # (a load's temporaries: LoRA deltas, casts, the channels-last copies)
    return pipe


def resolve_tagger(tagger: Any):
    """A `RAMTagger` from what load_pipeline accepts (see its `tagger` argument)."""
    from ..models.ram_tagger import RAMTagger
    from .dape import load_tagger

    if isinstance(tagger, RAMTagger):
        return tagger
    if isinstance(tagger, (tuple, list)):
        if len(tagger) != 2:
            raise ValueError(f"tagger=(base, lora) takes two paths, got {len(tagger)}")
        return load_tagger(*tagger)
    if isinstance(tagger, (str, os.PathLike)):
        return load_tagger(tagger)
    raise ValueError(f"tagger must be a RAMTagger, a path or a (base, lora) pair, got {type(tagger).__name__}")


def convert_to_diffusers(
    base: str | os.PathLike,
    weights: str | os.PathLike,
    out_dir: str | os.PathLike,
    base_config: str | os.PathLike | None = None,
    **method_options: Any,
) -> Path:
    """Write a self-contained diffusers folder (safetensors, LoRA fused) that `load_converted` (or the method's
    pipeline class's `from_pretrained`) reads offline and that produces the same images.

    The LoRA is fused first: saving a model that still holds peft layers writes wrapped keys that
    reload as random weights, and a separate LoRA file without metadata reloads at the wrong scale.
    """
    pipe = load_pipeline(base, weights, fuse_lora=True, base_config=base_config, **method_options)
    # the tagger (if any) is saved as its own component of the pipeline folder
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def load_converted(folder: str | os.PathLike, dtype: Any = None, device: Any = None) -> OneStepSRBase:
    """A folder written by `convert_to_diffusers`, loaded with the pipeline class its model_index.json names."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        raise CheckpointError(f"{folder}: not a converted pipeline folder (no model_index.json)")
    class_name = json.loads(index.read_text()).get("_class_name")
    classes = {m.pipeline_class.__name__: m.pipeline_class for m in registered_methods()}
    if class_name not in classes:
        raise CheckpointError(f"{folder}: model_index.json names {class_name!r}; expected one of {sorted(classes)}")
    device = resolve_device(device) if device is not None else torch.device("cpu")
    dtype = resolve_dtype(dtype, device)
    pipe = classes[class_name].from_pretrained(folder, local_files_only=True)
    return prepare_for_inference(pipe, device, dtype)
