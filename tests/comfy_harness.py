"""A small stand-in for the ComfyUI modules the nodes import, and a runner for API-format workflows.

Lets the node layer be tested without ComfyUI: `install(models_dir, input_dir)` puts fake
`folder_paths`, `comfy.utils` and `comfy.model_management` into sys.modules; `run_workflow` executes
an API graph in topological order with the real node classes (plus LoadImage/SaveImage stand-ins).
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SUPPORTED = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}


class Interrupted(Exception):
    pass


class State:
    def __init__(self):
        self.progress: list[tuple[int, int]] = []
        self.interrupt_after: int | None = None
        self.freed: list[int] = []
        self.loads: list[tuple[list, int]] = []  # (patchers, memory_required) of each load_models_gpu call


def install(models_dir: Path, input_dir: Path) -> State:
    state = State()
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(models_dir)
    fp.supported_pt_extensions = set(SUPPORTED)
    fp.folder_names_and_paths = {
        "checkpoints": ([str(models_dir / "checkpoints")], set(SUPPORTED)),
        "diffusers": ([str(models_dir / "diffusers")], {"folder"}),
    }

    def get_folder_paths(name):
        return list(fp.folder_names_and_paths[name][0])

    def get_filename_list(name):
        paths, exts = fp.folder_names_and_paths[name]
        found = []
        for root in paths:
            for current, _, files in os.walk(root):
                for f in files:
                    if not exts or os.path.splitext(f)[1].lower() in exts:
                        found.append(os.path.relpath(os.path.join(current, f), root).replace(os.sep, "/"))
        return sorted(found)

    def get_full_path(name, filename):
        for root in fp.folder_names_and_paths[name][0]:
            path = os.path.join(root, filename)
            if os.path.isfile(path):
                return path
        return None

    fp.get_folder_paths, fp.get_filename_list, fp.get_full_path = get_folder_paths, get_filename_list, get_full_path
    fp.get_input_directory = lambda: str(input_dir)

    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    mm = types.ModuleType("comfy.model_management")

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None):
            state.progress.append((value, total or self.total))

    def throw_exception_if_processing_interrupted():
        if state.interrupt_after is not None and len(state.progress) >= state.interrupt_after:
            raise Interrupted("Processing interrupted")

    utils.ProgressBar = ProgressBar
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.unet_offload_device = lambda: torch.device("cpu")
    mm.module_size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())
    mm.free_memory = lambda n, device: state.freed.append(n)
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted

    patcher = types.ModuleType("comfy.model_patcher")

    class ModelPatcher:  # what the pack uses of ComfyUI's: construction, then load_models_gpu moves the model
        def __init__(self, model, load_device, offload_device, size=0):
            self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size

    def load_models_gpu(models, memory_required=0, force_full_load=False):
        state.loads.append((list(models), memory_required))
        for m in models:
            m.model.to(m.load_device)

    patcher.ModelPatcher = ModelPatcher
    mm.load_models_gpu = load_models_gpu
    comfy.utils, comfy.model_management, comfy.model_patcher = utils, mm, patcher
    sys.modules.update(
        {"folder_paths": fp, "comfy": comfy, "comfy.utils": utils, "comfy.model_management": mm,
         "comfy.model_patcher": patcher}
    )  # fmt: skip
    return state


def uninstall() -> None:
    for name in ("folder_paths", "comfy", "comfy.utils", "comfy.model_management", "comfy.model_patcher"):
        sys.modules.pop(name, None)


def load_image_node(image: str, input_dir: Path):
    """Like ComfyUI's LoadImage: RGB IMAGE (1, H, W, 3) and MASK = 1 - alpha."""
    img = Image.open(input_dir / image)
    rgb = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255)[None]
    if "A" in img.getbands():
        mask = 1 - torch.from_numpy(np.asarray(img.getchannel("A"), dtype=np.float32) / 255)[None]
    else:
        mask = torch.zeros(1, 64, 64)
    return rgb, mask


def node_classes() -> dict:
    """node id -> V3 node class (needs install() and install_v3() first)."""
    from onestep_sr.nodes.sr_nodes import NODE_CLASSES

    return {cls.define_schema().node_id: cls for cls in NODE_CLASSES}


def run_workflow(api: dict, input_dir: Path) -> dict[str, list[torch.Tensor]]:
    """Execute an API-format graph with the real V3 node classes; returns SaveImage/PreviewImage inputs by node id."""
    classes = node_classes()
    results: dict[str, tuple] = {}
    saved: dict[str, list[torch.Tensor]] = {}

    def evaluate(node_id: str):
        if node_id in results:
            return results[node_id]
        node = api[node_id]
        kwargs = {}
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                kwargs[name] = evaluate(value[0])[value[1]]
            else:
                kwargs[name] = value
        kind = node["class_type"]
        if kind == "LoadImage":
            out = load_image_node(kwargs["image"], input_dir)
        elif kind in ("SaveImage", "PreviewImage"):
            saved[node_id] = list(kwargs["images"])
            out = ()
        else:
            out = classes[kind].execute(**kwargs).args
        results[node_id] = out
        return out

    for node_id in api:
        evaluate(node_id)
    return saved


WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def install_v3() -> types.ModuleType:
    """A minimal `comfy_api.latest` (io, ComfyExtension) recording what the V3 nodes declare.

    Inputs keep their id, io_type and keyword arguments; `Schema` keeps its fields. The real API is
    exercised by tests/test_comfyui_server.py against a real ComfyUI.
    """

    class _IO:
        io_type = ""

        def __init__(self, id=None, **kwargs):
            self.id, self.kwargs = id, kwargs

        @property
        def is_widget(self) -> bool:
            return self.io_type in WIDGET_TYPES and not self.kwargs.get("force_input")

    def comfy_type(io_type):
        return type(
            io_type,
            (),
            {
                "io_type": io_type,
                "Input": type("Input", (_IO,), {"io_type": io_type}),
                "Output": type("Output", (_IO,), {"io_type": io_type}),
            },
        )

    class NodeOutput:
        def __init__(self, *args):
            self.args = args

    io = types.SimpleNamespace(
        Image=comfy_type("IMAGE"),
        Mask=comfy_type("MASK"),
        Int=comfy_type("INT"),
        Float=comfy_type("FLOAT"),
        Boolean=comfy_type("BOOLEAN"),
        String=comfy_type("STRING"),
        Combo=comfy_type("COMBO"),
        Custom=comfy_type,
        Schema=lambda **kwargs: types.SimpleNamespace(**kwargs),
        ComfyNode=type("ComfyNode", (), {}),
        NodeOutput=NodeOutput,
    )
    latest = types.ModuleType("comfy_api.latest")
    latest.io = io
    latest.ComfyExtension = type("ComfyExtension", (), {})
    package = types.ModuleType("comfy_api")
    package.latest = latest
    sys.modules.update({"comfy_api": package, "comfy_api.latest": latest})
    return latest


def uninstall_v3() -> None:
    for name in ("comfy_api", "comfy_api.latest", "onestep_sr.nodes.sr_nodes"):
        sys.modules.pop(name, None)
