"""ComfyUI V3 nodes (comfy_api.latest, ComfyUI >= 0.3.48), built from the specs in `specs.py`."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .specs import CATEGORY, NODES, NodeSpec, Param


def _input(p: Param):
    common = dict(tooltip=p.tooltip, optional=p.optional)
    if p.kind == "IMAGE":
        return io.Image.Input(p.name, **common)
    if p.kind == "INT":
        return io.Int.Input(p.name, default=p.default, min=p.min, max=p.max, step=p.step,
                            control_after_generate=p.control_after_generate or None, **common)
    if p.kind == "BOOLEAN":
        return io.Boolean.Input(p.name, default=p.default, **common)
    if p.kind == "STRING":
        return io.String.Input(p.name, default=p.default, multiline=p.multiline, force_input=p.force_input or None,
                               **common)
    if p.kind == "COMBO":
        choices = p.choices()
        default = p.default if p.default in choices else (choices[0] if choices else None)
        return io.Combo.Input(p.name, options=choices, default=default, **common)
    return io.Custom(p.kind).Input(p.name, **common)


def _output(kind: str, name: str, tooltip: str):
    output_type = io.Image if kind == "IMAGE" else io.Custom(kind)
    return output_type.Output(display_name=name, tooltip=tooltip)


def _make_node(spec: NodeSpec) -> type[io.ComfyNode]:
    def define_schema(cls):
        return io.Schema(
            node_id=spec.node_id, display_name=spec.display_name, category=CATEGORY, description=spec.description,
            inputs=[_input(p) for p in spec.inputs], outputs=[_output(*o) for o in spec.outputs],
        )

    def execute(cls, **kwargs):
        return io.NodeOutput(*spec.run(**kwargs))

    return type(spec.node_id, (io.ComfyNode,), {
        "define_schema": classmethod(define_schema), "execute": classmethod(execute), "__doc__": spec.description,
    })


NODE_CLASSES = [_make_node(spec) for spec in NODES]


class OneStepSRExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODE_CLASSES


async def comfy_entrypoint() -> ComfyExtension:
    return OneStepSRExtension()
