"""Workflow files: build both formats from one graph description, and convert UI format to API format.

`build_workflows()` writes workflows/*.json (UI format, loadable by dragging into ComfyUI) and
workflows/api/*.json (API format for POST /prompt). `ui_to_api()` is an independent reading of a
UI file (links + widgets_values), used by the tests to check that each UI file is its API twin.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"

# widget order of the core nodes used here; "upload" is LoadImage's button widget (not a prompt input)
CORE_WIDGETS = {"LoadImage": ["image", "upload"], "SaveImage": ["filename_prefix"], "PreviewImage": []}
CORE_IO = {
    "LoadImage": ([], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "SaveImage": ([("images", "IMAGE")], []),
}
NOT_PROMPT_INPUTS = {"upload"}
# (width, height) on the canvas where the default is too small for the title or the widgets
NODE_SIZES = {
    "LoadImage": (320, 320), "OneStepSRModelLoader": (420, 200), "OneStepSRTaggerLoader": (420, 200),
    "OneStepSRUpscale": (360, 420), "OneStepSRPromptExtractor": (380, 160),
}  # fmt: skip


def _schema(class_type: str):
    """The pack's V3 schema of a node (the stand-in comfy_api must be installed: see comfy_harness)."""
    from comfy_harness import node_classes

    classes = node_classes()
    return classes[class_type].define_schema() if class_type in classes else None


def widget_names(class_type: str) -> list[str]:
    """Inputs shown as widgets, in schema order: what a UI workflow's widgets_values lists by position."""
    schema = _schema(class_type)
    if schema is None:
        return CORE_WIDGETS[class_type]
    return [i.id for i in schema.inputs if i.is_widget]


def seed_widgets(class_type: str) -> set[str]:
    """Widgets followed in widgets_values by their control_after_generate value ("fixed", "randomize")."""
    schema = _schema(class_type)
    return set() if schema is None else {i.id for i in schema.inputs if i.kwargs.get("control_after_generate")}


def node_io(class_type: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(socket inputs as (name, type), outputs as (name, type))."""
    schema = _schema(class_type)
    if schema is None:
        return CORE_IO[class_type]
    sockets = [(i.id, i.io_type) for i in schema.inputs if not i.is_widget]
    return sockets, [(o.kwargs["display_name"], o.io_type) for o in schema.outputs]


def optional_widgets(class_type: str) -> set[str]:
    schema = _schema(class_type)
    return set() if schema is None else {i.id for i in schema.inputs if i.is_widget and i.kwargs.get("optional")}


def widget_values_by_name(node: dict) -> dict:
    """A UI node's widgets_values read by position into {input name: value} (control values skipped).

    Workflows saved before an optional widget was added end early; as in the frontend, those widgets keep
    their defaults (they are left out here)."""
    values = list(node.get("widgets_values") or [])
    names, seeds = widget_names(node["type"]), seed_widgets(node["type"])
    optional = optional_widgets(node["type"])
    found, i = {}, 0
    for name in names:
        if i >= len(values) and name in optional:
            continue
        found[name] = values[i]
        i += 2 if name in seeds else 1
    if i != len(values):
        raise ValueError(f"{node['type']} has {len(values)} widget values; its schema reads {i}")
    return found


def ui_to_api(ui: dict) -> dict:
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        inputs = widget_values_by_name(node)
        for name in NOT_PROMPT_INPUTS:
            inputs.pop(name, None)
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                _, origin, slot, _, _, _ = links[socket["link"]]
                inputs[socket["name"]] = [str(origin), slot]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def build(graph: list[dict]) -> tuple[dict, dict]:
    """graph: [{id, type, widgets: {name: value}, links: {input: (source id, output slot)}, pos}] -> (ui, api)."""
    api, nodes, links = {}, [], []
    by_id = {n["id"]: n for n in graph}
    for order, n in enumerate(graph):
        sockets, outputs = node_io(n["type"])
        values = []
        for name in widget_names(n["type"]):
            values.append(n["widgets"].get(name, "image" if name == "upload" else None))
            if name in seed_widgets(n["type"]):
                values.append("fixed")
        ui_inputs = []
        for name, kind in sockets:
            link_id = None
            if name in n.get("links", {}):
                link_id = len(links) + 1
                source, slot = n["links"][name]
                links.append([link_id, source, slot, n["id"], len(ui_inputs), kind])
            ui_inputs.append({"name": name, "type": kind, "link": link_id})
        nodes.append(
            {
                "id": n["id"],
                "type": n["type"],
                "pos": list(n["pos"]),
                "size": list(NODE_SIZES.get(n["type"], (320, 160))),
                "flags": {},
                "order": order,
                "mode": 0,
                "inputs": ui_inputs,
                "outputs": [
                    {"name": name, "type": kind, "links": [], "slot_index": i} for i, (name, kind) in enumerate(outputs)
                ],
                "properties": {"Node name for S&R": n["type"]},
                "widgets_values": values,
            }
        )
        api[str(n["id"])] = {
            "class_type": n["type"],
            "inputs": {k: v for k, v in n["widgets"].items() if k not in NOT_PROMPT_INPUTS}
            | {k: [str(s), slot] for k, (s, slot) in n.get("links", {}).items()},
            "_meta": {"title": n["type"]},
        }
    for link in links:
        source = next(node for node in nodes if node["id"] == link[1])
        source["outputs"][link[2]]["links"].append(link[0])
    assert all(n["id"] in by_id for n in graph)
    ui = {
        "last_node_id": max(by_id),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 1, "offset": [0, 0]}},
        "version": 0.4,
    }
    return ui, api


def _dape_nodes() -> list[dict]:
    """Tagger Loader (8) -> Prompt Extractor (9), tagging LoadImage's image at the Upscale node's factor."""
    return [
        {"id": 8, "type": "OneStepSRTaggerLoader", "pos": (40, 660),
         "widgets": {"tagger": "ram_swin_large_14m.pth", "lora": "DAPE.pth", "dtype": "auto", "device": "auto",
                     "antialias": False}},
        {"id": 9, "type": "OneStepSRPromptExtractor", "pos": (500, 660),
         "widgets": {"upscale": 4, "user_prompt": ""}, "links": {"tagger": (8, 0), "image": (1, 0)}},
    ]  # fmt: skip


def _sr_nodes(base: str, weights: str, upscale_widgets: dict, image_link=(1, 0), prompt_link=(3, 0)) -> list[dict]:
    return [
        {
            "id": 2,
            "type": "OneStepSRModelLoader",
            "pos": (40, 400),
            "widgets": {"base": base, "weights": weights, "dtype": "auto", "device": "auto", "fuse_lora": True},
        },
        {"id": 3, "type": "OneStepSRPrompt", "pos": (40, 660), "widgets": {"mode": "model default", "text": ""}},
        {
            "id": 4,
            "type": "OneStepSRUpscale",
            "pos": (500, 40),
            "widgets": {
                "upscale": 4,
                "color_fix": "auto",
                "tile_size": "auto",
                "tile_overlap": "auto",
                "vae_tile_size": "auto",
                "seed": 0,
                "latent_sampling": "mode",
                "tile_batch_size": 1,
                "blend": "gaussian",
                "size_mode": "upscale factor",
                "target_long_side": 2048,
            }
            | upscale_widgets,
            "links": {"sr_model": (2, 0), "image": image_link, "prompt": prompt_link},
        },
    ]


SD21 = "stable-diffusion-2-1-base"
SD3 = "stable-diffusion-3-medium-diffusers"


def workflow_graphs() -> dict[str, list[dict]]:
    load = {"id": 1, "type": "LoadImage", "pos": (40, 40), "widgets": {"image": "example.png", "upload": "image"}}

    def save(prefix, source=(4, 0), node_id=5):
        return {
            "id": node_id,
            "type": "SaveImage",
            "pos": (900, 40),
            "widgets": {"filename_prefix": prefix},
            "links": {"images": source},
        }

    # file names are the template titles ComfyUI's template browser shows
    return {
        "OSEDiff 4x upscale": [load, *_sr_nodes(SD21, "osediff.pkl", {}), save("onestep_sr/osediff")],
        "OSEDiff large image (tiled)": [
            load,
            *_sr_nodes(SD21, "osediff.pkl", {"tile_size": "64", "tile_overlap": "16", "vae_tile_size": "512"}),
            save("onestep_sr/large"),
        ],
        "OSEDiff tile split and stitch": [
            load,
            {
                "id": 6,
                "type": "OneStepSRTileSplit",
                "pos": (40, 900),
                "widgets": {"tile_size": 256, "overlap": 32},
                "links": {"image": (1, 0)},
            },
            *_sr_nodes(SD21, "osediff.pkl", {}, image_link=(6, 0)),
            {
                "id": 7,
                "type": "OneStepSRTileStitch",
                "pos": (900, 420),
                "widgets": {},
                "links": {"tiles": (4, 0), "layout": (6, 1)},
            },
            save("onestep_sr/stitched", source=(7, 0)),
        ],
        "TSD-SR 4x upscale": [load, *_sr_nodes(SD3, "tsdsr", {}), save("onestep_sr/tsdsr")],
        "TAD-SR 4x upscale": [load, *_sr_nodes("autoencoder_vq_f4.pth", "TAD-SR.pth", {}), save("onestep_sr/tadsr")],
        "D3SR 4x upscale": [load, *_sr_nodes(SD21, "d3sr.safetensors", {}), save("onestep_sr/d3sr")],
        "OSEDiff 4x upscale with DAPE prompts": [
            load,
            *_dape_nodes(),
            *[n for n in _sr_nodes(SD21, "osediff.pkl", {}, prompt_link=(9, 0)) if n["type"] != "OneStepSRPrompt"],
            save("onestep_sr/osediff_dape"),
        ],
    }


def build_workflows(folder: Path = WORKFLOWS) -> list[Path]:
    written = []
    for name, graph in workflow_graphs().items():
        ui, api = build(graph)
        for path, data in ((folder / f"{name}.json", ui), (folder / "api" / f"{name}.json", api)):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=1) + "\n")
            written.append(path)
    return written


THUMBNAIL_INPUT_SIZE = (64, 44)  # (width, height): x4 gives the 256x176 template thumbnails
THUMBNAIL_QUALITY = 88


def thumbnail_input() -> Image.Image:
    """The picture the thumbnails show upscaled: the DAPE parity case of coloured shapes, made small."""
    from helpers import DAPE_PARITY

    source = Image.open(DAPE_PARITY / "cases" / "s2_shapes_200x136" / "lr.png").convert("RGB")
    return source.resize(THUMBNAIL_INPUT_SIZE, Image.BICUBIC)


def thumbnail_of(api: dict, input_dir: Path, real_weights: bool = False) -> Image.Image:
    """Run an API workflow (stand-in ComfyUI, installed models) on thumbnail_input(). The picture shows the input
    (nearest-neighbour enlarged) on the left half; on the right half the workflow's output when it ran with real
    weights (`real_weights`), else an honest panel saying the output needs them: the demo models' random weights
    produce noise, which must never pass for a method's result. The run happens either way (the workflow must work
    and produce an output of the thumbnail's size)."""
    import comfy_harness

    thumbnail_input().save(input_dir / "thumbnail_input.png")
    api = json.loads(json.dumps(api))
    for node in api.values():
        if node["class_type"] == "LoadImage":
            node["inputs"]["image"] = "thumbnail_input.png"
    (images,) = comfy_harness.run_workflow(api, input_dir).values()
    out = (images[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    after = Image.fromarray(out)
    before = thumbnail_input().resize(after.size, Image.NEAREST)
    half = after.width // 2
    if real_weights:
        before.paste(after.crop((half, 0, after.width, after.height)), (half, 0))
    else:
        before.paste(no_output_panel((after.width - half, after.height)), (half, 0))
    before.paste((255, 255, 255), (half - 1, 0, half + 1, after.height))  # the dividing line
    return before


def no_output_panel(size: tuple[int, int]) -> Image.Image:
    """A plain panel saying where the output goes (Pillow's built-in bitmap font: the same pixels everywhere)."""
    from PIL import ImageDraw, ImageFont

    panel = Image.new("RGB", size, (40, 40, 46))
    draw = ImageDraw.Draw(panel)
    font = ImageFont.load_default_imagefont()
    for i, line in enumerate(("output appears", "here with the", "model's weights")):
        draw.text((8, size[1] // 2 - 22 + 14 * i), line, fill=(220, 220, 220), font=font)
    return panel


def write_thumbnails(input_dir: Path, folder: Path = WORKFLOWS, real_weights: bool = False) -> list[Path]:
    """workflows/<name>.jpg, the template thumbnail ComfyUI shows beside <name>.json (models must be installed)."""
    written = []
    for name in workflow_graphs():
        api = json.loads((folder / "api" / f"{name}.json").read_text())
        path = folder / f"{name}.jpg"
        thumbnail_of(api, input_dir, real_weights).save(path, quality=THUMBNAIL_QUALITY)
        written.append(path)
    return written


if __name__ == "__main__":
    # Writes the workflow files, then runs each for its thumbnail: with the demo (tiny, random-weight) models (the
    # thumbnail then shows the input and an honest "needs the weights" panel), or with --models, a ComfyUI models
    # folder holding the real weights under the workflows' file names (the thumbnail shows the real output).
    import argparse
    import tempfile

    import comfy_harness
    from helpers import make_comfy_models

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=Path, help="ComfyUI models folder with the real weights (default: demo)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:  # the stand-in ComfyUI the schemas are read from
        models, inputs = make_comfy_models(Path(tmp))
        comfy_harness.install(args.models or models, inputs)
        comfy_harness.install_v3()
        from onestep_sr.nodes import comfy_env

        comfy_env.register_model_folder()
        for p in WORKFLOWS.glob("*.json"):  # renamed templates must not linger
            p.unlink()
        for p in WORKFLOWS.glob("api/*.json"):
            p.unlink()
        for p in WORKFLOWS.glob("*.jpg"):
            p.unlink()
        for p in [*build_workflows(), *write_thumbnails(inputs, real_weights=args.models is not None)]:
            print(p)
