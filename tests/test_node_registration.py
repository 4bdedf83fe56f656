"""Which registration the pack exports (V3 or V1, never both, nothing outside ComfyUI) and the V3 schemas."""

import asyncio
import sys
from pathlib import Path

import pytest
import torch

import onestep_sr
from onestep_sr.nodes import comfy_registration

import comfy_harness
from helpers import NODE_IDS


@pytest.fixture
def clean_modules():
    saved = {k: sys.modules.get(k) for k in ("folder_paths", "comfy", "comfy.utils", "comfy.model_management")}
    yield
    comfy_harness.uninstall_v3()
    comfy_harness.uninstall()
    for k, v in saved.items():
        if v is not None:
            sys.modules[k] = v


def test_library_use_registers_nothing(clean_modules):
    comfy_harness.uninstall()
    comfy_harness.uninstall_v3()
    assert comfy_registration() == {}
    import onestep_sr

    assert not hasattr(onestep_sr, "NODE_CLASS_MAPPINGS") and not hasattr(onestep_sr, "comfy_entrypoint")


def test_old_comfyui_without_v3_logs_one_line_and_registers_nothing(clean_modules, tmp_path, caplog):
    comfy_harness.uninstall_v3()
    comfy_harness.install(tmp_path, tmp_path)
    with caplog.at_level("WARNING", logger="onestep_sr"):
        exported = comfy_registration()
    assert exported == {}
    lines = [r for r in caplog.records if r.name == "onestep_sr"]
    assert len(lines) == 1 and "0.3.48" in lines[0].getMessage() and "No nodes registered" in lines[0].getMessage()


def test_v3_comfyui_gets_the_entrypoint_only(clean_modules, tmp_path):
    comfy_harness.install(tmp_path, tmp_path)
    comfy_harness.install_v3()
    exported = comfy_registration()
    assert set(exported) == {"comfy_entrypoint", "WEB_DIRECTORY"}
    # the frontend extension ComfyUI serves (relative to the pack folder, as ComfyUI resolves it)
    web = Path(onestep_sr.__file__).parent / exported["WEB_DIRECTORY"]
    assert (web / "onestep_sr.js").is_file()
    extension = asyncio.run(exported["comfy_entrypoint"]())
    node_classes = asyncio.run(extension.get_node_list())
    from onestep_sr.nodes.sr_nodes import CATEGORY, LOADERS_CATEGORY

    assert [c.__name__ for c in node_classes] == NODE_IDS
    for cls in node_classes:
        schema = cls.define_schema()
        category = LOADERS_CATEGORY if schema.node_id.endswith("Loader") else CATEGORY
        assert schema.node_id == cls.__name__ and schema.category == category and schema.description
        for i in schema.inputs:
            assert i.kwargs["tooltip"], f"{schema.node_id}.{i.id} has no tooltip"
        assert all(o.kwargs["tooltip"] for o in schema.outputs)
    upscale = next(c for c in node_classes if c.__name__ == "OneStepSRUpscale").define_schema()
    seed = next(i for i in upscale.inputs if i.id == "seed")
    assert seed.io_type == "INT" and seed.kwargs["control_after_generate"] is True
    prompt = next(i for i in upscale.inputs if i.id == "prompt")
    assert prompt.io_type == "ONESTEP_SR_PROMPT" and prompt.kwargs["optional"] is True
    split = next(c for c in node_classes if c.__name__ == "OneStepSRTileSplit")
    image = torch.rand(1, 20, 30, 3)
    out = split.execute(image=image, tile_size=16, overlap=4)
    assert out.args[0].shape == (6, 16, 16, 3) and out.args[1].tiles_per_image == 6
