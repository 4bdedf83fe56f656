"""ComfyUI V1 node classes, for ComfyUI builds older than the V3 API; built from the same specs."""

from __future__ import annotations

from .specs import CATEGORY, NODES, NodeSpec, Param


def _input_type(p: Param):
    options: dict = {"tooltip": p.tooltip}
    if p.kind == "COMBO":
        return (p.choices(), options | ({"default": p.default} if p.default is not None else {}))
    if p.kind in ("INT", "FLOAT"):
        options |= {k: v for k, v in (("default", p.default), ("min", p.min), ("max", p.max), ("step", p.step)) if v is not None}
        if p.control_after_generate:
            options["control_after_generate"] = True
    elif p.kind == "BOOLEAN":
        options["default"] = p.default
    elif p.kind == "STRING":
        options |= {"default": p.default or "", "multiline": p.multiline}
        if p.force_input:
            options["forceInput"] = True
    return (p.kind, options)


def _make_node(spec: NodeSpec) -> type:
    def input_types(cls):
        required = {p.name: _input_type(p) for p in spec.inputs if not p.optional}
        optional = {p.name: _input_type(p) for p in spec.inputs if p.optional}
        return {"required": required, "optional": optional}

    def run(self, **kwargs):
        return spec.run(**kwargs)

    return type(spec.node_id, (), {
        "INPUT_TYPES": classmethod(input_types),
        "RETURN_TYPES": tuple(o[0] for o in spec.outputs),
        "RETURN_NAMES": tuple(o[1] for o in spec.outputs),
        "OUTPUT_TOOLTIPS": tuple(o[2] for o in spec.outputs),
        "FUNCTION": "run",
        "CATEGORY": CATEGORY,
        "DESCRIPTION": spec.description,
        "run": run,
    })


NODE_CLASS_MAPPINGS = {spec.node_id: _make_node(spec) for spec in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {spec.node_id: spec.display_name for spec in NODES}
