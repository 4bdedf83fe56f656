"""Workflow files: build both formats from one graph description, and convert UI format to API format.

`build_workflows()` writes workflows/*.json (UI format, loadable by dragging into ComfyUI) and
workflows/api/*.json (API format for POST /prompt). `ui_to_api()` is an independent reading of a
UI file (links + widgets_values), used by the tests to check that each UI file is its API twin.
"""

from __future__ import annotations

import json
from pathlib import Path

from onestep_sr.nodes.specs import NODES

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"

# widget order of the core nodes used here; "upload" is LoadImage's button widget (not a prompt input)
CORE_WIDGETS = {"LoadImage": ["image", "upload"], "SaveImage": ["filename_prefix"], "PreviewImage": []}
CORE_IO = {
    "LoadImage": ([], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "SaveImage": ([("images", "IMAGE")], []),
}
NOT_PROMPT_INPUTS = {"upload"}


def widget_names(class_type: str) -> list[str]:
    for spec in NODES:
        if spec.node_id == class_type:
            return spec.widget_names()
    return CORE_WIDGETS[class_type]


def seed_widgets(class_type: str) -> set[str]:
    for spec in NODES:
        if spec.node_id == class_type:
            return {p.name for p in spec.inputs if p.control_after_generate}
    return set()


def node_io(class_type: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(socket inputs as (name, type), outputs as (name, type))."""
    for spec in NODES:
        if spec.node_id == class_type:
            sockets = [(p.name, p.kind) for p in spec.inputs if p.kind not in ("INT", "FLOAT", "BOOLEAN", "COMBO")
                       and (p.kind != "STRING" or p.force_input)]
            return sockets, [(name, kind) for kind, name, _ in spec.outputs]
    return CORE_IO[class_type]


def ui_to_api(ui: dict) -> dict:
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        inputs = {}
        values = list(node.get("widgets_values") or [])
        names = widget_names(node["type"])
        seeds = seed_widgets(node["type"])
        i = 0
        for name in names:
            inputs[name] = values[i]
            i += 1
            if name in seeds:
                i += 1  # skip the control_after_generate value ("fixed", "randomize", ...)
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
        nodes.append({
            "id": n["id"], "type": n["type"], "pos": list(n["pos"]), "size": [320, 160], "flags": {}, "order": order,
            "mode": 0, "inputs": ui_inputs,
            "outputs": [{"name": name, "type": kind, "links": [], "slot_index": i} for i, (name, kind) in enumerate(outputs)],
            "properties": {"Node name for S&R": n["type"]}, "widgets_values": values,
        })
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
    ui = {"last_node_id": max(by_id), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
          "config": {}, "extra": {"ds": {"scale": 1, "offset": [0, 0]}}, "version": 0.4}
    return ui, api


def _sr_nodes(base: str, weights: str, upscale_widgets: dict, image_link=(1, 0)) -> list[dict]:
    return [
        {"id": 2, "type": "OneStepSRModelLoader", "pos": (40, 320),
         "widgets": {"base": base, "weights": weights, "dtype": "auto", "device": "auto", "fuse_lora": True}},
        {"id": 3, "type": "OneStepSRPrompt", "pos": (40, 560), "widgets": {"mode": "model default", "text": ""}},
        {"id": 4, "type": "OneStepSRUpscale", "pos": (420, 100),
         "widgets": {"upscale": 4, "color_fix": "auto", "tile_size": 0, "tile_overlap": -1, "vae_tile_size": 0,
                     "seed": 0, "latent_sampling": "mode", "tile_batch_size": 1, "blend": "gaussian"} | upscale_widgets,
         "links": {"sr_model": (2, 0), "image": image_link, "prompt": (3, 0)}},
    ]


SD21 = "stable-diffusion-2-1-base"
SD3 = "stable-diffusion-3-medium-diffusers"


def workflow_graphs() -> dict[str, list[dict]]:
    load = {"id": 1, "type": "LoadImage", "pos": (40, 40), "widgets": {"image": "example.png", "upload": "image"}}

    def save(prefix, source=(4, 0), node_id=5):
        return {"id": node_id, "type": "SaveImage", "pos": (820, 100), "widgets": {"filename_prefix": prefix},
                "links": {"images": source}}

    return {
        "osediff_upscale": [load, *_sr_nodes(SD21, "osediff.pkl", {}), save("onestep_sr/osediff")],
        "large_image_tiled": [load, *_sr_nodes(SD21, "osediff.pkl", {"tile_size": 64, "tile_overlap": 16,
                                                                     "vae_tile_size": 512}), save("onestep_sr/large")],
        "split_process_stitch": [
            load,
            {"id": 6, "type": "OneStepSRTileSplit", "pos": (40, 760), "widgets": {"tile_size": 256, "overlap": 32},
             "links": {"image": (1, 0)}},
            *_sr_nodes(SD21, "osediff.pkl", {}, image_link=(6, 0)),
            {"id": 7, "type": "OneStepSRTileStitch", "pos": (820, 300), "widgets": {},
             "links": {"tiles": (4, 0), "layout": (6, 1)}},
            save("onestep_sr/stitched", source=(7, 0)),
        ],
        "tsdsr_upscale": [load, *_sr_nodes(SD3, "tsdsr", {}), save("onestep_sr/tsdsr")],
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


if __name__ == "__main__":
    for p in build_workflows():
        print(p)
