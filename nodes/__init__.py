"""ComfyUI nodes of onestep-sr: thin V3 nodes over `pipelines/` (registered only inside ComfyUI).

Requires a ComfyUI with the V3 node API (`comfy_api.latest`, ComfyUI >= 0.3.48). On an older
ComfyUI the pack logs one line and registers nothing; outside ComfyUI it registers nothing.
"""

import logging

MIN_COMFYUI = "0.3.48"
# The frontend extension (served by ComfyUI from this folder, relative to the pack): new-node defaults and the
# reading of values older workflows stored (nodes/web/onestep_sr.js).
WEB_DIRECTORY = "./nodes/web"
logger = logging.getLogger("onestep_sr")


def comfy_registration() -> dict:
    """What the pack's __init__ exports to ComfyUI: the V3 `comfy_entrypoint`, or nothing."""
    try:
        from comfy_api.latest import ComfyExtension, io  # noqa: F401
    except ImportError:
        try:
            import folder_paths  # noqa: F401  (a ComfyUI without the V3 API)
        except ImportError:
            return {}  # plain library use: no ComfyUI here
        logger.warning(
            "onestep-sr: this ComfyUI has no V3 node API (comfy_api.latest); update ComfyUI to >= %s "
            "to use the one-step SR nodes. No nodes registered.",
            MIN_COMFYUI,
        )
        return {}
    from . import comfy_env
    from .sr_nodes import comfy_entrypoint

    comfy_env.register_model_folder()
    return {"comfy_entrypoint": comfy_entrypoint, "WEB_DIRECTORY": WEB_DIRECTORY}
