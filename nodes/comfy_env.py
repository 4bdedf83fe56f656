"""The few ComfyUI services the nodes use, imported lazily so the package imports without ComfyUI.

- model folders (`folder_paths`): `models/onestep_sr` for SR weights (listed as the method registry says),
  `diffusers` / `checkpoints` for bases;
- progress and cancellation (`comfy.utils.ProgressBar`, `comfy.model_management`);
- device placement: models live on ComfyUI's offload device between runs and move to its torch
  device only while a node runs, after asking ComfyUI to free that much memory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch

from ..pipelines.methods import component_files, folder_markers, registered_methods
from ..pipelines.options import WEIGHT_SUFFIXES

MODEL_FOLDER = "onestep_sr"
TAGGER_FOLDER = "RAM"  # where RAM weights usually live in ComfyUI installs


def _folder_paths():
    import folder_paths  # ComfyUI only

    return folder_paths


def register_model_folder() -> None:
    """Add models/onestep_sr (and RAM's usual models/RAM), merging with whatever extra_model_paths.yaml declared
    (never overwriting)."""
    fp = _folder_paths()
    for name in (MODEL_FOLDER, TAGGER_FOLDER):
        default_dir = os.path.join(fp.models_dir, name)
        paths, exts = fp.folder_names_and_paths.get(name, ([], set()))
        paths = list(paths)
        if default_dir not in paths:
            paths.append(default_dir)
        fp.folder_names_and_paths[name] = (paths, set(exts) | set(fp.supported_pt_extensions) | set(WEIGHT_SUFFIXES))


def _folders(name: str) -> list[str]:
    fp = _folder_paths()
    try:
        return [p for p in fp.get_folder_paths(name) if os.path.isdir(p)]
    except KeyError:
        return []


def _subdirs_with(name: str, *markers: str) -> dict[str, str]:
    """Relative folder name -> path, for folders under the model folder `name` that contain one of `markers`."""
    found: dict[str, str] = {}
    for root in _folders(name):
        for current, dirs, files in os.walk(root, followlinks=True):
            if current != root and any(m in files for m in markers):
                found.setdefault(os.path.relpath(current, root).replace(os.sep, "/"), current)
                dirs[:] = []
    return found


def _base_files_in_model_folder() -> list[str]:
    """Files in models/onestep_sr named as some method's base (e.g. ResShift's autoencoder_vq_f4.pth beside its
    UNet): bases that are not Stable Diffusion checkpoints live with the SR weights."""
    names = {n for m in registered_methods() for n in m.base.single_files}
    with contextlib.suppress(KeyError):
        return [f for f in _folder_paths().get_filename_list(MODEL_FOLDER) if os.path.basename(f) in names]
    return []


def list_base_models() -> list[str]:
    """Diffusers folders (models/diffusers/*/model_index.json), single-file checkpoints (models/checkpoints), and
    base files kept in models/onestep_sr."""
    fp = _folder_paths()
    names = sorted(_subdirs_with("diffusers", "model_index.json"))
    with contextlib.suppress(KeyError):  # a ComfyUI without a checkpoints folder
        names += [f for f in fp.get_filename_list("checkpoints") if f not in names]
    return names + [f for f in _base_files_in_model_folder() if f not in names]


def resolve_base_model(name: str) -> str:
    folder = _subdirs_with("diffusers", "model_index.json").get(name)
    if folder:
        return folder
    fp = _folder_paths()
    for folder_name in ("checkpoints", MODEL_FOLDER):
        with contextlib.suppress(KeyError):
            path = fp.get_full_path(folder_name, name)
            if path:
                return path
    raise FileNotFoundError(
        f"base model {name!r} not found: put a diffusers folder in models/diffusers/, a single file in "
        f"models/checkpoints/, or a method's own base file (such as autoencoder_vq_f4.pth) in models/{MODEL_FOLDER}/"
    )


def _weight_folders() -> dict[str, str]:
    """Weights folders of folder-layout methods (e.g. a TSD-SR folder), found by each method's marker file."""
    return _subdirs_with(MODEL_FOLDER, *folder_markers())


def list_sr_weights() -> list[str]:
    """Weight files in models/onestep_sr, plus the weights folders of folder-layout methods.

    Files that are parts of such a folder (each method lists its own) are not offered on their own.
    """
    from ..pipelines.methods.dape import TAGGER_FILES

    fp = _folder_paths()
    parts = component_files() | {f.name for f in TAGGER_FILES}  # tagger files go to the Tagger Loader
    parts |= {n for m in registered_methods() for n in m.base.single_files if m.weights_layout == "file"}
    files = [
        f
        for f in fp.get_filename_list(MODEL_FOLDER)
        if os.path.splitext(f)[1].lower() in WEIGHT_SUFFIXES and os.path.basename(f) not in parts
    ]
    return sorted(_weight_folders()) + sorted(files)


def resolve_sr_weights(name: str) -> str:
    folder = _weight_folders().get(name)
    if folder:
        return folder
    path = _folder_paths().get_full_path(MODEL_FOLDER, name)
    if path:
        return path
    expected = "; ".join(f"{m.display_name}: {m.default_weights}" for m in registered_methods())
    raise FileNotFoundError(f"SR weights {name!r} not found in models/{MODEL_FOLDER}/: put them there ({expected})")


def _tagger_folders() -> dict[str, str]:
    """Converted tagger folders (config.json naming RAMTagger) under models/onestep_sr and models/RAM."""
    found: dict[str, str] = {}
    for name in (MODEL_FOLDER, TAGGER_FOLDER):
        for rel, path in _subdirs_with(name, "config.json").items():
            try:
                with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
                    is_tagger = '"RAMTagger"' in f.read()
            except OSError:
                continue
            if is_tagger:
                found.setdefault(rel, path)
    return found


def list_tagger_files() -> list[str]:
    """Tagger weights: files in models/RAM and models/onestep_sr (SR methods' own files left out), converted folders."""
    fp = _folder_paths()
    taken = {m.default_weights for m in registered_methods()} | component_files()
    taken |= {n for m in registered_methods() for n in m.base.single_files}
    files: list[str] = []
    for name in (TAGGER_FOLDER, MODEL_FOLDER):
        with contextlib.suppress(KeyError):
            for f in fp.get_filename_list(name):
                if os.path.splitext(f)[1].lower() in WEIGHT_SUFFIXES and os.path.basename(f) not in taken:
                    files.append(f)
    folders = sorted(_tagger_folders())
    inside_a_folder = {f for f in files for d in folders if f.startswith(d + "/")}
    inside_sr_folders = {f for f in files for d in _weight_folders() if f.startswith(d + "/")}
    return folders + sorted(set(files) - inside_a_folder - inside_sr_folders)


def resolve_tagger_file(name: str) -> str:
    folder = _tagger_folders().get(name)
    if folder:
        return folder
    fp = _folder_paths()
    for folder_name in (TAGGER_FOLDER, MODEL_FOLDER):
        with contextlib.suppress(KeyError):
            path = fp.get_full_path(folder_name, name)
            if path:
                return path
    raise FileNotFoundError(
        f"tagger file {name!r} not found in models/{TAGGER_FOLDER}/ or models/{MODEL_FOLDER}/: put "
        "ram_swin_large_14m.pth and DAPE.pth there (or a folder from `onestep_sr convert-tagger`)"
    )


def check_interrupted() -> None:
    import comfy.model_management as mm

    mm.throw_exception_if_processing_interrupted()


def preferred_pair(bases: list[str], weights: list[str]) -> tuple[str | None, str | None]:
    """Default loader choices: the first weights whose method's usual base is also present, and that base."""
    for method in registered_methods():
        base_names = (method.base.folder, *method.base.single_files)
        base = next((b for b in bases if os.path.basename(b.rstrip("/")) in base_names), None)
        found = next((w for w in weights if os.path.basename(w.rstrip("/")) == method.default_weights), None)
        if base and found:
            return base, found
    return (bases[0] if bases else None), (weights[0] if weights else None)


# ---------------------------------------------------------------------------- devices, memory, progress


def torch_device() -> torch.device:
    import comfy.model_management as mm

    return mm.get_torch_device()


def offload_device() -> torch.device:
    import comfy.model_management as mm

    return mm.unet_offload_device()


def load_models(loaded, memory_required: int) -> None:
    """Put a loaded pipeline's (or tagger's) modules under ComfyUI's model management and load them for a run.

    Each module gets a `comfy.model_patcher.ModelPatcher` (made once); `load_models_gpu` then evicts other models
    to make room for the weights plus `memory_required` (the run's own estimate), applies ComfyUI's low-VRAM
    offloading where needed, and records them, so "Unload models" and POST /free move them back to the offload
    device like any core model. Between runs they stay loaded until ComfyUI needs the memory (its usual policy).
    """
    import comfy.model_management as mm
    import comfy.model_patcher

    if loaded.patchers is None:
        modules = [m for m in _modules_of(loaded) if isinstance(m, torch.nn.Module)]
        loaded.patchers = [
            comfy.model_patcher.ModelPatcher(Managed(m, loaded.rest_device), load_device=loaded.device,
                                             offload_device=loaded.rest_device, size=mm.module_size(m))
            for m in modules
        ]  # fmt: skip
    mm.load_models_gpu(loaded.patchers, memory_required=memory_required, force_full_load=True)


class Managed(torch.nn.Module):
    """What a ModelPatcher holds: our module, plus the plain `device` attribute ComfyUI's patcher writes to
    (diffusers models expose `device` as a read-only property)."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        super().__init__()
        self.module = module
        self.device = device


def _modules_of(loaded) -> list:
    if hasattr(loaded, "pipe"):
        return list(loaded.pipe.components.values())
    return [loaded.tagger]


def progress_reporter(total: int) -> Callable[[int, int], None]:
    """A progress callback that drives ComfyUI's progress bar and raises if the user pressed Cancel."""
    import comfy.model_management as mm
    import comfy.utils

    bar = comfy.utils.ProgressBar(total)

    def report(done: int, new_total: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, new_total)

    return report
