"""ComfyUI nodes without ComfyUI: V3 schemas, execute functions, workflows, bad inputs (tests/comfy_harness.py)."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import comfy_harness
from helpers import DAPE_PARITY, NODE_IDS, OSEDIFF_PARITY, TADSR_PARITY, make_comfy_models
from workflow_tools import WORKFLOWS, build, ui_to_api, widget_values_by_name, workflow_graphs


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """Models under the file names the workflows expect, an input image, and the stub ComfyUI modules."""
    models, inputs = make_comfy_models(tmp_path_factory.mktemp("comfy"))
    state = comfy_harness.install(models, inputs)
    comfy_harness.install_v3()
    from onestep_sr.nodes import comfy_env

    comfy_env.register_model_folder()
    yield {"models": models, "input": inputs, "state": state}
    comfy_harness.uninstall_v3()
    comfy_harness.uninstall()


class Node:
    """A V3 node class called as ComfyUI calls it: execute(**inputs) -> NodeOutput."""

    def __init__(self, cls):
        self.cls = cls

    def run(self, **kwargs) -> tuple:
        return self.cls.execute(**kwargs).args


@pytest.fixture(scope="module")
def nodes(comfy):
    return {name: Node(cls) for name, cls in comfy_harness.node_classes().items()}


@pytest.fixture
def state(comfy):
    return comfy["state"]


@pytest.fixture(scope="module")
def osediff_node_pipe(nodes):
    (sr,) = nodes["OneStepSRModelLoader"].run(
        base="stable-diffusion-2-1-base", weights="osediff.pkl", dtype="fp32", device="cpu", fuse_lora=True
    )
    return sr


# the Upscale node's widgets as a new node has them
UPSCALE_DEFAULTS = dict(
    upscale=4, color_fix="auto", tile_size="auto", tile_overlap="auto", vae_tile_size="auto", seed=0,
    latent_sampling="mode",
)  # fmt: skip


def upscale_inputs(**kw) -> dict:
    return UPSCALE_DEFAULTS | kw


def image_batch(n=1, h=12, w=10, c=3, seed=0):
    return torch.rand(n, h, w, c, generator=torch.Generator().manual_seed(seed))


def schema_inputs(node_id: str) -> dict:
    return {i.id: i for i in comfy_harness.node_classes()[node_id].define_schema().inputs}


def test_schemas_have_ids_categories_and_tooltips(comfy):
    from onestep_sr.nodes.sr_nodes import CATEGORY, LOADERS_CATEGORY

    classes = comfy_harness.node_classes()
    assert list(classes) == NODE_IDS
    for name, cls in classes.items():
        schema = cls.define_schema()
        # loaders where core ComfyUI lists its model loaders, the rest beside its upscalers
        expected = LOADERS_CATEGORY if name.endswith("Loader") else CATEGORY
        assert schema.category == expected and schema.display_name and schema.description
        for i in schema.inputs:
            assert i.kwargs.get("tooltip"), f"{name}.{i.id} has no tooltip"
        assert all(o.kwargs.get("tooltip") and o.kwargs.get("display_name") for o in schema.outputs)
    loader = schema_inputs("OneStepSRModelLoader")
    assert loader["base"].kwargs["options"] == [
        "stable-diffusion-2-1-base",
        "stable-diffusion-3-medium-diffusers",
        "autoencoder_vq_f4.pth",  # ResShift's VQGAN, kept beside its UNet in models/onestep_sr
    ]
    # folder methods first (found by their marker file), then files; a folder's parts are not offered alone
    assert loader["weights"].kwargs["options"] == ["tsdsr", "TAD-SR.pth", "d3sr.safetensors", "osediff.pkl"]
    # the defaults are a pair of the same method (the first registered whose files are both present)
    assert (loader["base"].kwargs["default"], loader["weights"].kwargs["default"]) == (
        "stable-diffusion-2-1-base",
        "osediff.pkl",
    )
    assert loader["dtype"].kwargs["options"] == ["auto", "fp32", "bf16", "fp16"]
    # D3SR has no official weights: the loader says so, and how a checkpoint is made
    description = classes["OneStepSRModelLoader"].define_schema().description
    assert "D3SR (unofficial)" in description and "trained with this package" in description
    assert "objective: d3sr" in description


def test_preferred_pair_matches_base_and_weights_by_method(comfy):
    from onestep_sr.nodes.comfy_env import preferred_pair

    assert preferred_pair(["stable-diffusion-3-medium-diffusers"], ["osediff.pkl", "tsdsr"]) == (
        "stable-diffusion-3-medium-diffusers",
        "tsdsr",
    )
    assert preferred_pair(["other-base"], ["mine.pkl"]) == ("other-base", "mine.pkl")
    assert preferred_pair([], []) == (None, None)


def test_model_folder_is_merged_not_overwritten(comfy):
    import folder_paths

    from onestep_sr.nodes import comfy_env

    folder_paths.folder_names_and_paths["onestep_sr"] = (["/from/extra_model_paths"], {".custom"})
    comfy_env.register_model_folder()
    paths, exts = folder_paths.folder_names_and_paths["onestep_sr"]
    assert paths[0] == "/from/extra_model_paths" and paths[1].endswith("onestep_sr")
    assert {".custom", ".pkl", ".safetensors"} <= exts
    comfy_env.register_model_folder()  # idempotent
    assert folder_paths.folder_names_and_paths["onestep_sr"][0] == paths


def test_upscale_node_gives_the_library_result(nodes, osediff_node_pipe):
    from onestep_sr import load_pipeline

    image = image_batch(2, 12, 10)
    out, *_ = nodes["OneStepSRUpscale"].run(
        **upscale_inputs(sr_model=osediff_node_pipe, image=image, upscale=2, seed=3, latent_sampling="sample")
    )
    assert out.shape == (2, 24, 20, 3)
    pipe = load_pipeline(OSEDIFF_PARITY / "tiny-sd21", OSEDIFF_PARITY / "osediff_tiny.pkl")
    pipe.set_progress_bar_config(disable=True)
    for i in range(2):
        expected = pipe(
            image[i].permute(2, 0, 1),
            upscale=2,
            latent_sampling="sample",
            generator=torch.Generator().manual_seed(3 + i),
            output_type="pt",
        ).images[0]
        torch.testing.assert_close(out[i], expected.permute(1, 2, 0), atol=1e-6, rtol=0)


def test_progress_and_cancel(comfy, nodes, osediff_node_pipe):
    state = comfy["state"]
    state.progress.clear()
    kwargs = upscale_inputs(sr_model=osediff_node_pipe, upscale=2, color_fix="none", tile_size=16, tile_overlap=8)
    nodes["OneStepSRUpscale"].run(image=image_batch(2, 24, 24), **kwargs)
    values = [v for v, _ in state.progress]
    assert values == sorted(values) and state.progress[-1][0] == state.progress[-1][1]
    from onestep_sr.pipelines.tiling import tile_regions

    # encode + latent tiles (24x24 image x2 -> 48x48 -> 24x24 latent on the tiny VAE; tile 16, overlap 8) + decode
    per_image = 2 + len(list(tile_regions(24, 24, 16, 8)))
    assert state.progress[-1][1] == 2 * per_image
    state.progress.clear()
    state.interrupt_after = 3
    try:
        with pytest.raises(comfy_harness.Interrupted):
            nodes["OneStepSRUpscale"].run(image=image_batch(2, 24, 24), **kwargs)
    finally:
        state.interrupt_after = None
    assert len(state.progress) == 3  # stopped between tiles


def test_rgba_grayscale_and_tiny_images(nodes, osediff_node_pipe):
    kwargs = upscale_inputs(sr_model=osediff_node_pipe)
    rgba = image_batch(1, 8, 6, 4)
    rgba[..., 3] = 0.25
    out, *_ = nodes["OneStepSRUpscale"].run(image=rgba, **kwargs)
    assert out.shape == (1, 32, 24, 4) and torch.allclose(out[..., 3], torch.tensor(0.25))
    rgb_out, *_ = nodes["OneStepSRUpscale"].run(image=rgba[..., :3].contiguous(), **kwargs)
    assert torch.equal(out[..., :3], rgb_out)
    gray = image_batch(1, 8, 6, 1)
    gray_out, *_ = nodes["OneStepSRUpscale"].run(image=gray, **kwargs)
    as_rgb, *_ = nodes["OneStepSRUpscale"].run(image=gray.expand(-1, -1, -1, 3).contiguous(), **kwargs)
    assert gray_out.shape == (1, 32, 24, 3) and torch.equal(gray_out, as_rgb)
    one, *_ = nodes["OneStepSRUpscale"].run(image=image_batch(1, 1, 1), **kwargs)
    assert one.shape == (1, 4, 4, 3)


def test_transparency_flows_as_masks(nodes, osediff_node_pipe, state):
    """MASK in/out as core nodes expect (1 = transparent): the mask is the alpha channel, upscaled the same way."""
    kwargs = upscale_inputs(sr_model=osediff_node_pipe)
    rgba = image_batch(1, 8, 6, 4)
    rgba[..., 3] = torch.linspace(0, 1, 6)  # a horizontal alpha ramp
    out, out_mask = nodes["OneStepSRUpscale"].run(image=rgba, **kwargs)
    assert out.shape == (1, 32, 24, 4) and torch.equal(out_mask, 1 - out[..., 3])
    # the same transparency given as a MASK next to the RGB image: same pixels, same mask, RGB stays RGB
    rgb_out, rgb_mask = nodes["OneStepSRUpscale"].run(image=rgba[..., :3].contiguous(), mask=1 - rgba[..., 3], **kwargs)
    assert rgb_out.shape == (1, 32, 24, 3)
    assert torch.equal(rgb_out, out[..., :3]) and torch.allclose(rgb_mask, out_mask, atol=1e-6)
    _, opaque_mask = nodes["OneStepSRUpscale"].run(image=rgba[..., :3].contiguous(), **kwargs)
    assert torch.equal(opaque_mask, torch.zeros(1, 32, 24))
    with pytest.raises(ValueError, match=r"MASK of the image's size \(batch, 8, 6\)"):
        nodes["OneStepSRUpscale"].run(image=rgba[..., :3].contiguous(), mask=torch.zeros(1, 5, 5), **kwargs)
    # the models are loaded through ComfyUI's model management, with the run's own memory estimate
    patchers, needed = state.loads[-1]
    modules = {id(m) for m in osediff_node_pipe.pipe.components.values() if isinstance(m, torch.nn.Module)}
    assert {id(p.model.module) for p in patchers} == modules
    pipe = osediff_node_pipe.pipe
    plan = pipe.plan_tiling(pipe.latent_size((8, 6), 4))
    assert needed == pipe.estimate_memory(plan).peak > 0


def test_a_failed_run_keeps_no_tensors_alive(nodes, osediff_node_pipe, state):
    """The server keeps a failed node's exception: it must not reference the run's tensors."""
    import gc
    import weakref

    kwargs = upscale_inputs(sr_model=osediff_node_pipe)
    alive = []
    original = osediff_node_pipe.pipe._vae_decode  # the VAE decode of the tiled and the one-step path alike

    def failing_decode(latents, *args, **kw):
        big = torch.ones(256, 256)
        alive.append(weakref.ref(big))
        raise RuntimeError("decode failed")

    osediff_node_pipe.pipe._vae_decode = failing_decode
    try:
        with pytest.raises(RuntimeError, match="decode failed") as caught:
            nodes["OneStepSRUpscale"].run(image=image_batch(1, 8, 8), **kwargs)
    finally:
        del osediff_node_pipe.pipe._vae_decode
    assert osediff_node_pipe.pipe._vae_decode == original
    gc.collect()
    assert alive and all(r() is None for r in alive)
    del caught


@pytest.mark.parametrize(
    "bad,message",
    [
        (torch.zeros(0, 8, 8, 3), "batch is empty"),
        (torch.zeros(1, 8, 8), "looks like a MASK"),
        (torch.zeros(1, 3, 8, 8), "expected an IMAGE"),
        ("not an image", "expected an IMAGE tensor"),
    ],
)
def test_bad_images_are_clear_node_errors(nodes, osediff_node_pipe, bad, message):
    with pytest.raises(ValueError, match=message):
        nodes["OneStepSRUpscale"].run(**upscale_inputs(sr_model=osediff_node_pipe, image=bad))


def test_missing_or_incompatible_weights_are_clear_errors(comfy, nodes):
    from onestep_sr import CheckpointError

    loader = nodes["OneStepSRModelLoader"]
    with pytest.raises(FileNotFoundError, match="SR weights 'nope.pkl' not found in models/onestep_sr"):
        loader.run(base="stable-diffusion-2-1-base", weights="nope.pkl", dtype="fp32", device="cpu", fuse_lora=True)
    with pytest.raises(CheckpointError, match="not an SD3 diffusers folder"):
        loader.run(base="stable-diffusion-2-1-base", weights="tsdsr", dtype="fp32", device="cpu", fuse_lora=True)
    with pytest.raises(CheckpointError, match="an SD3 folder .* need an SD2.1-base diffusers folder"):
        loader.run(
            base="stable-diffusion-3-medium-diffusers",
            weights="osediff.pkl",
            dtype="fp32",
            device="cpu",
            fuse_lora=True,
        )


def test_prompt_node(nodes, osediff_node_pipe):
    from onestep_sr.nodes.values import PromptSpec

    prompt = nodes["OneStepSRPrompt"]
    assert prompt.run(mode="text", text="a cat") == (PromptSpec("text", "a cat"),)
    assert prompt.run(mode="model default", text="", text_input="from a captioner") == (
        PromptSpec("text", "from a captioner"),
    )
    image = image_batch(1, 8, 8)
    kwargs = upscale_inputs(sr_model=osediff_node_pipe, image=image, upscale=1, color_fix="none")
    with_text, *_ = nodes["OneStepSRUpscale"].run(prompt=PromptSpec("text", "a photo of a cat, "), **kwargs)
    expected = (
        osediff_node_pipe.pipe(
            image[0].permute(2, 0, 1), prompt="a photo of a cat, ", upscale=1, color_fix="none", output_type="pt"
        )
        .images[0]
        .permute(1, 2, 0)
    )
    torch.testing.assert_close(with_text[0], expected, atol=1e-6, rtol=0)


def test_tsdsr_through_the_nodes(nodes):
    from onestep_sr.nodes.values import PromptSpec

    (sr,) = nodes["OneStepSRModelLoader"].run(
        base="stable-diffusion-3-medium-diffusers", weights="tsdsr", dtype="fp32", device="cpu", fuse_lora=True
    )
    assert sr.method == "TSD-SR"
    kwargs = upscale_inputs(sr_model=sr, image=image_batch(1, 8, 8), upscale=2)
    out, *_ = nodes["OneStepSRUpscale"].run(**kwargs)
    expected = sr.pipe(kwargs["image"][0].movedim(-1, 0), upscale=2, output_type="pt").images[0].movedim(0, -1)
    assert out.shape == (1, 16, 16, 3)
    torch.testing.assert_close(out[0], expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="no text encoder"):
        nodes["OneStepSRUpscale"].run(prompt=PromptSpec("text", "a cat"), **kwargs)
    with pytest.raises(ValueError, match="use the prompt mode 'model default'"):
        nodes["OneStepSRUpscale"].run(prompt=PromptSpec("none"), **kwargs)


@pytest.mark.parametrize("size,tile,overlap", [((37, 53), 16, 6), ((8, 8), 16, 4), ((100, 31), 32, 31)])
def test_stitch_of_split_is_exact(nodes, size, tile, overlap):
    image = image_batch(2, *size)
    tiles, layout = nodes["OneStepSRTileSplit"].run(image=image, tile_size=tile, overlap=overlap)
    assert tiles.shape[1:3] == (min(tile, size[0]), min(tile, size[1]))
    (back,) = nodes["OneStepSRTileStitch"].run(tiles=tiles, layout=layout)
    assert torch.equal(back, image)
    # tiles scaled by an integer factor in between: a nearest x3 of each tile stitches to the nearest x3 image
    scaled = tiles.repeat_interleave(3, dim=1).repeat_interleave(3, dim=2)
    (big,) = nodes["OneStepSRTileStitch"].run(tiles=scaled, layout=layout)
    assert torch.equal(big, image.repeat_interleave(3, dim=1).repeat_interleave(3, dim=2))


def test_stitch_rejects_mismatched_tiles(nodes):
    tiles, layout = nodes["OneStepSRTileSplit"].run(image=image_batch(1, 40, 40), tile_size=16, overlap=4)
    with pytest.raises(ValueError, match="expected 9 tiles"):
        nodes["OneStepSRTileStitch"].run(tiles=tiles[:5], layout=layout)
    with pytest.raises(ValueError, match="same integer factor"):
        nodes["OneStepSRTileStitch"].run(
            tiles=torch.nn.functional.interpolate(tiles.movedim(-1, 1), size=(24, 24)).movedim(1, -1), layout=layout
        )


# ---------------------------------------------------------------------------- workflows


@pytest.mark.parametrize("name", sorted(workflow_graphs()))
def test_ui_workflow_is_its_api_twin(comfy, name):
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    assert ui_to_api(ui) == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert ui["version"] == 0.4 and all("pos" in n and "widgets_values" in n for n in ui["nodes"])
    # the committed files are what the generator writes (no hand edits drifting from the node specs)
    assert (ui, api) == build(workflow_graphs()[name])


def _size(value):
    """A size widget's value as the pipelines take it (the independent reading of the widget's meaning)."""
    return "auto" if value == "auto" else int(value)


def _fits(spec, value) -> bool:
    kw = spec.kwargs
    if spec.io_type == "COMBO":
        return value in kw["options"]
    if spec.io_type == "INT":
        return isinstance(value, int) and not isinstance(value, bool) and kw["min"] <= value <= kw["max"]
    if spec.io_type == "BOOLEAN":
        return isinstance(value, bool)
    return isinstance(value, str)


@pytest.mark.parametrize("name", sorted(workflow_graphs()))
def test_every_widget_value_of_a_shared_workflow_lands_on_its_input(comfy, name):
    """The compatibility contract: widgets_values are stored by position, so the node schemas must keep the
    names, order and accepted values that the committed (already shared) workflow files were written with."""
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    expected = {n["id"]: n["widgets"] for n in workflow_graphs()[name]}
    for node in ui["nodes"]:
        if not node["type"].startswith("OneStepSR"):
            continue
        by_name = widget_values_by_name(node)
        assert by_name == expected[node["id"]], node["type"]
        inputs = schema_inputs(node["type"])
        for input_name, value in by_name.items():
            assert _fits(inputs[input_name], value), f"{node['type']}.{input_name} = {value!r} does not fit"
        for socket in node["inputs"]:
            assert inputs[socket["name"]].io_type == socket["type"], f"{node['type']}.{socket['name']}"


@pytest.mark.parametrize("name", sorted(workflow_graphs()))
def test_api_workflows_run_end_to_end(comfy, name):
    api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    if name == "OSEDiff tile split and stitch":  # the 32x24 test image needs smaller tiles to really be split
        split = next(n for n in api.values() if n["class_type"] == "OneStepSRTileSplit")
        split["inputs"].update(tile_size=16, overlap=8)
    saved = comfy_harness.run_workflow(api, comfy["input"])
    (images,) = saved.values()
    lr = np.asarray(Image.open(comfy["input"] / "example.png"))
    assert images[0].shape == (lr.shape[0] * 4, lr.shape[1] * 4, 3)
    assert torch.isfinite(images[0]).all() and images[0].min() >= 0 and images[0].max() <= 1
    # values: the graph gives what the library gives for the same settings (auto dtype, official colour fix)
    from onestep_sr import load_pipeline

    if "TSD-SR" not in name and "split" not in name:
        upscale = next(n for n in api.values() if n["class_type"] == "OneStepSRUpscale")["inputs"]
        # the DAPE workflow: the library pipeline with the tagger as a component gives the same image
        tagger = (DAPE_PARITY / "model" / "ram_tiny_base.pth", DAPE_PARITY / "model" / "dape_tiny.pth")
        if name.startswith("TAD-SR"):  # the seed widget drives the noise: seed S is a CPU generator seeded S
            files = (
                TADSR_PARITY / "models" / "autoencoder_vq_f4_tiny_A.pth",
                TADSR_PARITY / "models" / "tadsr_tiny_A.pth",
            )
        elif name.startswith("D3SR"):
            files = (OSEDIFF_PARITY / "tiny-sd21", comfy["models"] / "onestep_sr" / "d3sr.safetensors")
        else:
            files = (OSEDIFF_PARITY / "tiny-sd21", OSEDIFF_PARITY / "osediff_tiny.pkl")
        pipe = load_pipeline(*files, dtype="auto", tagger=tagger if "DAPE" in name else None)
        pipe.set_progress_bar_config(disable=True)
        expected = pipe(
            Image.open(comfy["input"] / "example.png"),
            generator=torch.Generator().manual_seed(upscale["seed"]),
            output_type="pt",
            tile_size=_size(upscale["tile_size"]),
            tile_overlap=_size(upscale["tile_overlap"]),
            vae_tile_size=_size(upscale["vae_tile_size"]),
        ).images[0]
        torch.testing.assert_close(images[0], expected.permute(1, 2, 0), atol=1e-6, rtol=0)


def test_prompt_mode_none_is_the_empty_prompt_not_the_models_default(nodes, osediff_node_pipe):
    """A pipeline with both a text encoder and a learned prompt embedding (D3SR style): "model default" uses the
    embedding, "none" the empty prompt through the text encoder."""
    from onestep_sr import Conditioning, OneStepSRPipeline, PromptEmbedding
    from onestep_sr.nodes.values import LoadedSR, PromptSpec

    base = osediff_node_pipe.pipe
    learned = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(4))
    pipe = OneStepSRPipeline(**base.components | {"prompt_embedding": PromptEmbedding.from_tensors(learned)})
    pipe.set_progress_bar_config(disable=True)
    sr = LoadedSR(pipe, torch.device("cpu"), torch.device("cpu"))
    image = image_batch(1, 8, 8)
    kwargs = upscale_inputs(sr_model=sr, image=image, upscale=1, color_fix="none")
    default, *_ = nodes["OneStepSRUpscale"].run(prompt=PromptSpec("model default"), **kwargs)
    empty, *_ = nodes["OneStepSRUpscale"].run(prompt=PromptSpec("none"), **kwargs)
    chw = image[0].movedim(-1, 0)
    with_learned = pipe(chw, upscale=1, color_fix="none", prompt_embeds=learned, output_type="pt").images[0]
    ids = pipe.tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    empty_text = pipe.text_encoder(ids)[0]
    with_empty_text = pipe(chw, upscale=1, color_fix="none", prompt_embeds=empty_text, output_type="pt").images[0]
    torch.testing.assert_close(default[0], with_learned.movedim(0, -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(empty[0], with_empty_text.movedim(0, -1), atol=1e-6, rtol=0)
    assert (default - empty).abs().max() > 1e-3
    assert isinstance(pipe.text_conditioning(""), Conditioning)


# ---------------------------------------------------------------------------- the DAPE tagger nodes


@pytest.fixture(scope="module")
def loaded_tagger(nodes):
    (tagger,) = nodes["OneStepSRTaggerLoader"].run(
        tagger="ram_swin_large_14m.pth", lora="DAPE.pth", dtype="fp32", device="cpu", antialias=False
    )
    return tagger


def test_tagger_loader_lists_tagger_files_only(comfy, loaded_tagger, tmp_path):
    inputs = schema_inputs("OneStepSRTaggerLoader")
    assert inputs["tagger"].kwargs["options"] == ["DAPE.pth", "ram_swin_large_14m.pth"]  # not osediff.pkl, tsdsr/*
    assert inputs["tagger"].kwargs["default"] == "ram_swin_large_14m.pth"
    assert inputs["lora"].kwargs["options"][0] == "none" and inputs["lora"].kwargs["default"] == "DAPE.pth"
    from onestep_sr import load_tagger

    reference = load_tagger(DAPE_PARITY / "model" / "ram_tiny_base.pth", DAPE_PARITY / "model" / "dape_tiny.pth")
    pixel_values = torch.rand(1, 3, 384, 384, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded_tagger.tagger.logits(pixel_values), reference.logits(pixel_values))
    # RAM's usual models/RAM folder and converted folders are found too
    import folder_paths

    from onestep_sr.pipelines.methods.dape import convert_tagger

    ram_dir = comfy["models"] / "RAM"
    convert_tagger(DAPE_PARITY / "model" / "ram_tiny_base.pth", None, ram_dir / "ram-plain", dtype="fp32")
    assert ram_dir in [Path(p) for p in folder_paths.get_folder_paths("RAM")]
    assert schema_inputs("OneStepSRTaggerLoader")["tagger"].kwargs["options"][0] == "ram-plain"


def test_prompt_extractor_tags_what_the_upscale_node_encodes(nodes, loaded_tagger, osediff_node_pipe):
    from onestep_sr.pipelines.models.ram_tagger import official_prompt

    image = (image_batch(2, 12, 10) * 255).round() / 255  # 8-bit data, as LoadImage gives
    spec, tags = nodes["OneStepSRPromptExtractor"].run(tagger=loaded_tagger, image=image, upscale=2, user_prompt="x")
    expected_tags = []
    for i in range(2):  # independently: the 8-bit image, Pillow bicubic x2 (OSEDiff's upsampling), tagged
        pil = Image.fromarray((image[i].numpy() * 255).round().astype(np.uint8)).resize((20, 24), Image.BICUBIC)
        expected_tags.append(loaded_tagger.tagger.tags(pil)[0])
    assert tags == "\n".join(expected_tags)
    assert spec.per_image == tuple(official_prompt(t, "x") for t in expected_tags)
    out, *_ = nodes["OneStepSRUpscale"].run(
        **upscale_inputs(sr_model=osediff_node_pipe, image=image, upscale=2, color_fix="none", prompt=spec)
    )
    for i in range(2):
        expected = osediff_node_pipe.pipe(image[i].movedim(-1, 0), prompt=spec.per_image[i], upscale=2,
                                          color_fix="none", output_type="pt").images[0]  # fmt: skip
        torch.testing.assert_close(out[i], expected.movedim(0, -1), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="2 per-image prompts but the image batch has 3"):
        nodes["OneStepSRUpscale"].run(**upscale_inputs(sr_model=osediff_node_pipe, image=image_batch(3), prompt=spec))


def test_whole_image_tags_apply_to_every_tile(nodes, loaded_tagger, osediff_node_pipe):
    image = image_batch(1, 24, 24)
    spec, _ = nodes["OneStepSRPromptExtractor"].run(tagger=loaded_tagger, image=image, upscale=2, user_prompt="")
    tiles, _ = nodes["OneStepSRTileSplit"].run(image=image, tile_size=16, overlap=8)
    out, *_ = nodes["OneStepSRUpscale"].run(
        **upscale_inputs(sr_model=osediff_node_pipe, image=tiles, upscale=2, color_fix="none", prompt=spec)
    )
    first = osediff_node_pipe.pipe(tiles[0].movedim(-1, 0), prompt=spec.per_image[0], upscale=2, color_fix="none",
                                   output_type="pt").images[0]  # fmt: skip
    torch.testing.assert_close(out[0], first.movedim(0, -1), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- workflows saved by earlier versions

LEGACY = Path(__file__).parent / "data" / "legacy_workflows"  # as shipped before "auto" became a list choice
LEGACY_NAMES = {
    "osediff_upscale": "OSEDiff 4x upscale",
    "large_image_tiled": "OSEDiff large image (tiled)",
    "split_process_stitch": "OSEDiff tile split and stitch",
    "tsdsr_upscale": "TSD-SR 4x upscale",
    "tadsr_upscale": "TAD-SR 4x upscale",
    "osediff_dape_upscale": "OSEDiff 4x upscale with DAPE prompts",
}


@pytest.mark.parametrize("legacy", sorted(LEGACY_NAMES))
def test_workflows_saved_with_numbers_for_auto_still_load_and_run(comfy, legacy):
    """Old files store the size widgets as numbers (0 / -1 for auto) and lack the size_mode widgets: every value
    still lands on its input and is accepted (the Upscale node's own validation replaces the list check), and
    the old API file gives the same image as today's twin."""
    from onestep_sr.nodes.sr_nodes import OneStepSRUpscale

    ui = json.loads((LEGACY / f"{legacy}.json").read_text())
    upscale = next(n for n in ui["nodes"] if n["type"] == "OneStepSRUpscale")
    by_name = widget_values_by_name(upscale)
    assert "size_mode" not in by_name and isinstance(by_name["tile_size"], int)
    assert OneStepSRUpscale.validate_inputs(
        by_name["tile_size"], by_name["tile_overlap"], by_name["vae_tile_size"]
    ) is True  # fmt: skip
    inputs = schema_inputs("OneStepSRUpscale")
    for name, value in by_name.items():
        if name not in ("tile_size", "tile_overlap", "vae_tile_size"):
            assert _fits(inputs[name], value), name
    old_api = json.loads((LEGACY / "api" / f"{legacy}.json").read_text())
    new_api = json.loads((WORKFLOWS / "api" / f"{LEGACY_NAMES[legacy]}.json").read_text())
    (old,) = comfy_harness.run_workflow(old_api, comfy["input"]).values()
    (new,) = comfy_harness.run_workflow(new_api, comfy["input"]).values()
    torch.testing.assert_close(old[0], new[0], atol=0, rtol=0)


@pytest.mark.parametrize(
    ("choice", "value", "parsed"),
    [
        ("TILE_SIZE", "auto", "auto"), ("TILE_SIZE", 0, "auto"), ("TILE_SIZE", "64", 64), ("TILE_SIZE", 200, 200),
        ("TILE_SIZE", " 96 ", 96), ("TILE_OVERLAP", -1, "auto"), ("TILE_OVERLAP", 0, 0), ("TILE_OVERLAP", "0", 0),
        ("VAE_TILE_SIZE", 0, "auto"), ("VAE_TILE_SIZE", "1024", 1024),
    ],
)  # fmt: skip
def test_size_widgets_read_auto_sizes_and_legacy_numbers(comfy, choice, value, parsed):
    from onestep_sr.nodes import values

    assert getattr(values, choice).parse(value) == parsed


@pytest.mark.parametrize(
    ("tile_size", "tile_overlap", "vae_tile_size", "message"),
    [
        ("big", "auto", "auto", "tile_size: expected 'auto' or a whole number from 8 to 512, got 'big'"),
        (1024, "auto", "auto", "tile_size: 1024 is outside 8..512"),
        ("auto", 300, "auto", "tile_overlap: 300 is outside 0..256"),
        ("auto", "auto", True, "vae_tile_size: expected 'auto' or a whole number"),
        ("auto", "auto", 32, "vae_tile_size: 32 is outside 64..4096"),
    ],
)
def test_bad_size_widgets_are_validation_messages(comfy, nodes, osediff_node_pipe, tile_size, tile_overlap,
                                                  vae_tile_size, message):  # fmt: skip
    from onestep_sr.nodes.sr_nodes import OneStepSRUpscale

    assert message in OneStepSRUpscale.validate_inputs(tile_size, tile_overlap, vae_tile_size)
    sizes = dict(tile_size=tile_size, tile_overlap=tile_overlap, vae_tile_size=vae_tile_size)
    with pytest.raises(ValueError, match=message.split(":")[0]):
        nodes["OneStepSRUpscale"].run(**upscale_inputs(sr_model=osediff_node_pipe, image=image_batch(), **sizes))


def _pillow_bicubic(chw: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Independent reference: each plane through Pillow's float ("F") bicubic resize."""
    planes = [
        np.asarray(
            Image.fromarray(p.double().numpy().astype(np.float32), mode="F").resize(size_hw[::-1], Image.BICUBIC)
        )
        for p in chw
    ]
    return torch.from_numpy(np.stack(planes)).clamp(0, 1)


def test_target_long_side_resizes_the_input_first(nodes, osediff_node_pipe):
    """size_mode 'target long side': a 12x10 input, x2, long side 40 -> the input becomes 20x17 (aspect kept, long
    side 40 / 2) and the model upscales that by exactly 2; the mask follows the image."""
    image = image_batch(1, 12, 10, seed=3)
    mask = torch.rand(1, 12, 10, generator=torch.Generator().manual_seed(4))
    kwargs = upscale_inputs(sr_model=osediff_node_pipe, image=image, upscale=2, color_fix="none", mask=mask)
    out, out_mask = nodes["OneStepSRUpscale"].run(**kwargs, size_mode="target long side", target_long_side=40)
    assert out.shape == (1, 40, 34, 4 - 1) and out_mask.shape == (1, 40, 34)
    small = _pillow_bicubic(image[0].movedim(-1, 0), (20, 17))
    small_mask = _pillow_bicubic(mask, (20, 17))[0]
    expected, expected_mask = nodes["OneStepSRUpscale"].run(
        **upscale_inputs(sr_model=osediff_node_pipe, image=small.movedim(0, -1)[None], upscale=2, color_fix="none",
                         mask=small_mask[None])
    )  # fmt: skip
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out_mask, expected_mask, atol=1e-6, rtol=0)
    # the factor mode ignores target_long_side
    (same, _) = nodes["OneStepSRUpscale"].run(**kwargs, size_mode="upscale factor", target_long_side=40)
    assert same.shape == (1, 24, 20, 3)
    with pytest.raises(ValueError, match="target long side must be a whole number of pixels >= upscale"):
        nodes["OneStepSRUpscale"].run(**kwargs, size_mode="target long side", target_long_side=1)
    with pytest.raises(ValueError, match="size_mode must be one of upscale factor, target long side"):
        nodes["OneStepSRUpscale"].run(**kwargs, size_mode="fit")


@pytest.mark.parametrize("name", sorted(workflow_graphs()))
def test_template_thumbnails_are_the_workflows_results(comfy, name):
    """workflows/<name>.jpg (what ComfyUI's template browser shows) is made by running that workflow on the
    thumbnail input (demo models): the input left, and on the right an honest panel (random demo weights give noise,
    which must not pass for the method's output); a stale or hand-made picture fails."""
    from workflow_tools import THUMBNAIL_INPUT_SIZE, THUMBNAIL_QUALITY, thumbnail_of

    api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    fresh_image = thumbnail_of(api, comfy["input"])
    fresh = np.asarray(fresh_image, dtype=np.float32)
    committed = np.asarray(Image.open(WORKFLOWS / f"{name}.jpg").convert("RGB"), dtype=np.float32)
    assert committed.shape == fresh.shape == (4 * THUMBNAIL_INPUT_SIZE[1], 4 * THUMBNAIL_INPUT_SIZE[0], 3)
    # as close as the JPEG codec allows: the error of encoding this very run (the demo outputs are noisy)
    buffer = io.BytesIO()
    fresh_image.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
    codec_error = np.abs(np.asarray(Image.open(buffer), dtype=np.float32) - fresh).mean()
    error = np.abs(committed - fresh).mean()
    assert error <= 1.1 * codec_error + 0.5, (
        f"{error:.2f} vs JPEG's {codec_error:.2f}: run python tests/workflow_tools.py"
    )
