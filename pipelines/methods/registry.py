"""The method registry: one `Method` object per supported SR method, walked by every loader.

A method module (osediff.py, tsdsr.py, ...) builds one `Method` and registers it. Everything
outside those modules — `load_pipeline`, `convert`, the CLI, the ComfyUI nodes, error messages —
asks the registry instead of naming a method (spandrel's "one detector per architecture" design).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..loading.files import CheckpointError, WeightsProbe
from ..options import GENERIC_DEFAULTS, TileDefaults

if TYPE_CHECKING:
    import torch

    from ..pipeline_base import OneStepSRBase


@dataclass(frozen=True)
class WeightFile:
    """One file the method expects, and where a user gets it."""

    name: str
    source: str
    optional: bool = False


@dataclass(frozen=True)
class BaseModel:
    """The base model a method's weights fit on, as users find it."""

    name: str  # e.g. "SD2.1-base"
    folder: str  # the usual diffusers folder name (CLI default under the models dir, ComfyUI models/diffusers/)
    single_files: tuple[str, ...] = ()  # usual single-file names (ComfyUI models/checkpoints/)
    hint: str = ""  # what to put where, for "not found" messages


@dataclass(frozen=True)
class BuildOptions:
    """What `load_pipeline` passes to a method's builder."""

    dtype: torch.dtype
    fuse_lora: bool = True
    base_config: str | os.PathLike | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific files (e.g. TSD-SR embeddings=)


@dataclass(frozen=True)
class Method:
    """Everything one SR method knows about itself.

    detect(probe): True if the weights the user pointed at are this method's (file names, keys, shapes).
    build(base, probe, options): a ready pipeline (LoRA injected, not yet moved to a device).
    weights_layout: "file" (users pass one file) or "folder" (users pass a folder; `folder_marker`
        is the file that identifies such a folder in model lists).
    extra_options: method-specific keyword arguments that load_pipeline forwards (e.g. "embeddings").
    trainable(pipe): the weights a fine-tune of this method trains, by name (a pipeline built with
        fuse_lora=False, so its LoRA factors are still separate tensors).
    write_weights(pipe, path): the pipeline's current trainable weights in the method's own format at `path`
        (what `detect` accepts and `build` reads back), so what training writes loads through `load_pipeline`.
    notice: a sentence the loaders show (e.g. that no official weights exist).
    """

    id: str
    display_name: str
    pipeline_class: type
    detect: Callable[[WeightsProbe], bool]
    build: Callable[[str | os.PathLike, WeightsProbe, BuildOptions], OneStepSRBase]
    weight_files: tuple[WeightFile, ...]
    base: BaseModel
    defaults: TileDefaults = GENERIC_DEFAULTS
    weights_layout: Literal["file", "folder"] = "file"
    folder_marker: str | None = None
    licence: str = ""
    extra_options: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    trainable: Callable[[OneStepSRBase], dict[str, torch.nn.Parameter]] | None = None
    write_weights: Callable[[OneStepSRBase, str | os.PathLike], os.PathLike] | None = None
    notice: str = ""  # what a user must know before choosing it (shown by the loaders, e.g. "unofficial weights")

    @property
    def default_weights(self) -> str:
        """What the user passes by default: the folder name for folder methods, else the main file's name."""
        return self.id if self.weights_layout == "folder" else self.weight_files[0].name

    def describe_files(self) -> str:
        """Lines naming each expected file and where it comes from (for "missing weights" messages)."""
        lines = [f"{self.display_name}:"]
        if self.weights_layout == "folder":
            lines.append(f"  a folder (e.g. {self.default_weights}/) holding:")
        for f in self.weight_files:
            lines.append(f"    {f.name}  <- {f.source}" + ("  (optional)" if f.optional else ""))
        lines.append(f"  base model: {self.base.name} ({self.base.hint or self.base.folder})")
        return "\n".join(lines)

    def component_files(self) -> set[str]:
        """File names that are parts of a weights folder (not weights to choose on their own)."""
        return {f.name for f in self.weight_files} if self.weights_layout == "folder" else set()


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method (its id must be new). Returns it, so a module can write `METHOD = register(Method(...))`."""
    if method.id in _REGISTRY:
        raise ValueError(f"a method with id {method.id!r} is already registered")
    _REGISTRY[method.id] = method
    return method


def unregister(method_id: str) -> None:
    _REGISTRY.pop(method_id, None)


def registered_methods() -> list[Method]:
    """All methods, in registration order (built-ins first)."""
    return list(_REGISTRY.values())


def get_method(method_id: str) -> Method:
    try:
        return _REGISTRY[method_id]
    except KeyError:
        known = ", ".join(_REGISTRY)
        raise ValueError(f"unknown method {method_id!r}; registered methods: {known}") from None


def detect_method(weights: str | os.PathLike | WeightsProbe, method: str | None = None) -> tuple[Method, WeightsProbe]:
    """The method whose detector accepts these weights (or the one named by `method`), and the probe it read."""
    probe = weights if isinstance(weights, WeightsProbe) else WeightsProbe(weights)
    if method is not None:
        return get_method(method), probe
    if not probe.path.exists():
        raise CheckpointError(f"weight file not found: {probe.path}")
    for candidate in _REGISTRY.values():
        if candidate.detect(probe):
            return candidate, probe
    raise CheckpointError(_unknown_weights_message(probe))


def method_of(pipe: Any) -> Method | None:
    """The method a pipeline was built by (its config's `method`), else the first one using its class."""
    method_id = getattr(getattr(pipe, "config", None), "method", None)
    if method_id in _REGISTRY:
        return _REGISTRY[method_id]
    return next((m for m in _REGISTRY.values() if isinstance(pipe, m.pipeline_class)), None)


def folder_markers() -> dict[str, Method]:
    """Marker file name -> method, for methods whose weights are a folder."""
    return {m.folder_marker: m for m in _REGISTRY.values() if m.weights_layout == "folder" and m.folder_marker}


def component_files() -> set[str]:
    return set().union(*(m.component_files() for m in _REGISTRY.values())) if _REGISTRY else set()


def _unknown_weights_message(probe: WeightsProbe) -> str:
    path = probe.path
    supported = "\n".join(m.describe_files() for m in _REGISTRY.values())
    if path.is_dir():
        return (
            f"{path}: this folder is not the weights of any supported method "
            f"(folder methods need: {', '.join(sorted(folder_markers()))}). Supported:\n{supported}"
        )
    keys = ", ".join(list(probe.keys(path))[:8])
    return f"{path}: unknown SR weight format (first keys: {keys}). Supported:\n{supported}"
