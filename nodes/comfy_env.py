"""The few ComfyUI services the nodes use, imported lazily so the package imports without ComfyUI.

- model folders (`folder_paths`): `models/onestep_sr` for SR weights, `diffusers` / `checkpoints` for bases;
- progress and cancellation (`comfy.utils.ProgressBar`, `comfy.model_management`);
- device placement: models live on ComfyUI's offload device between runs and move to its torch
  device only while a node runs, after asking ComfyUI to free that much memory.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

MODEL_FOLDER = "onestep_sr"
WEIGHT_SUFFIXES = {".pkl", ".pth", ".pt", ".ckpt", ".bin", ".safetensors", ".sft"}
TSDSR_MARKER = "transformer.safetensors"


def _folder_paths():
    import folder_paths  # ComfyUI only

    return folder_paths


def register_model_folder() -> None:
    """Add models/onestep_sr, merging with whatever extra_model_paths.yaml declared (never overwriting)."""
    fp = _folder_paths()
    default_dir = os.path.join(fp.models_dir, MODEL_FOLDER)
    paths, exts = fp.folder_names_and_paths.get(MODEL_FOLDER, ([], set()))
    paths = list(paths)
    if default_dir not in paths:
        paths.append(default_dir)
    fp.folder_names_and_paths[MODEL_FOLDER] = (paths, set(exts) | set(fp.supported_pt_extensions) | WEIGHT_SUFFIXES)


def _folders(name: str) -> list[str]:
    fp = _folder_paths()
    try:
        return [p for p in fp.get_folder_paths(name) if os.path.isdir(p)]
    except KeyError:
        return []


def _subdirs_with(name: str, marker: str) -> dict[str, str]:
    """Relative folder name -> path, for folders under the model folder `name` that contain `marker`."""
    found: dict[str, str] = {}
    for root in _folders(name):
        for current, dirs, files in os.walk(root, followlinks=True):
            if marker in files and current != root:
                found.setdefault(os.path.relpath(current, root).replace(os.sep, "/"), current)
                dirs[:] = []
    return found


def list_base_models() -> list[str]:
    """Diffusers folders (models/diffusers/*/model_index.json) and single-file checkpoints (models/checkpoints)."""
    fp = _folder_paths()
    names = sorted(_subdirs_with("diffusers", "model_index.json"))
    try:
        names += [f for f in fp.get_filename_list("checkpoints") if f not in names]
    except KeyError:
        pass
    return names


def resolve_base_model(name: str) -> str:
    folder = _subdirs_with("diffusers", "model_index.json").get(name)
    if folder:
        return folder
    path = _folder_paths().get_full_path("checkpoints", name)
    if path:
        return path
    raise FileNotFoundError(
        f"base model {name!r} not found: put a diffusers folder in models/diffusers/ or a single file in models/checkpoints/"
    )


def list_sr_weights() -> list[str]:
    """Weight files in models/onestep_sr, plus TSD-SR folders (holding transformer.safetensors)."""
    fp = _folder_paths()
    files = [f for f in fp.get_filename_list(MODEL_FOLDER)
             if os.path.splitext(f)[1].lower() in WEIGHT_SUFFIXES and os.path.basename(f) not in
             ("transformer.safetensors", "vae.safetensors", "prompt_embeds.pt", "pool_embeds.pt", "embeddings.safetensors")]
    return sorted(_subdirs_with(MODEL_FOLDER, TSDSR_MARKER)) + sorted(files)


def resolve_sr_weights(name: str) -> str:
    folder = _subdirs_with(MODEL_FOLDER, TSDSR_MARKER).get(name)
    if folder:
        return folder
    path = _folder_paths().get_full_path(MODEL_FOLDER, name)
    if path:
        return path
    raise FileNotFoundError(
        f"SR weights {name!r} not found in models/{MODEL_FOLDER}/: put osediff.pkl there, or a folder with the "
        "TSD-SR files (transformer.safetensors, vae.safetensors, prompt_embeds.pt, pool_embeds.pt)"
    )


# ---------------------------------------------------------------------------- devices, memory, progress


def torch_device() -> torch.device:
    import comfy.model_management as mm

    return mm.get_torch_device()


def offload_device() -> torch.device:
    import comfy.model_management as mm

    return mm.unet_offload_device()


def free_memory_for(modules: list[torch.nn.Module], device: torch.device, extra_bytes: int) -> None:
    """Ask ComfyUI to evict its own models so ours (and their working memory) fit on `device`."""
    import comfy.model_management as mm

    if device.type == "cpu":
        return
    needed = sum(mm.module_size(m) for m in modules if m is not None) + extra_bytes
    mm.free_memory(needed, device)


def progress_reporter(total: int) -> Callable[[int, int], None]:
    """A progress callback that drives ComfyUI's progress bar and raises if the user pressed Cancel."""
    import comfy.model_management as mm
    import comfy.utils

    bar = comfy.utils.ProgressBar(total)

    def report(done: int, new_total: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, new_total)

    return report
