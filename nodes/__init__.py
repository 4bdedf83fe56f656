"""ComfyUI nodes of onestep-sr: thin wrappers over `pipelines/` (registered only inside ComfyUI)."""


def comfy_registration() -> dict:
    """What the pack's __init__ exports to ComfyUI: V3 `comfy_entrypoint`, or V1 mappings on older builds, never both."""
    try:
        from comfy_api.latest import ComfyExtension, io  # noqa: F401  (ComfyUI >= 0.3.48)
    except ImportError:
        try:
            import folder_paths  # noqa: F401  (an older ComfyUI)
        except ImportError:
            return {}  # plain library use: no ComfyUI here
        from . import comfy_env
        from .v1 import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

        comfy_env.register_model_folder()
        return {"NODE_CLASS_MAPPINGS": NODE_CLASS_MAPPINGS, "NODE_DISPLAY_NAME_MAPPINGS": NODE_DISPLAY_NAME_MAPPINGS}
    from . import comfy_env
    from .v3 import comfy_entrypoint

    comfy_env.register_model_folder()
    return {"comfy_entrypoint": comfy_entrypoint}
