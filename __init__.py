"""onestep-sr: one-step diffusion super-resolution.

This folder is both the importable package `onestep_sr` (library: see `pipelines/`) and a
ComfyUI custom-node pack (nodes are registered only when ComfyUI is present).
"""

from .pipelines import *  # noqa: F403  (the library's public API, listed in pipelines/__init__.py)
from .pipelines import __all__  # noqa: F401

__version__ = "0.1.0"

# Inside ComfyUI this exports the V3 `comfy_entrypoint`; elsewhere nothing.
from .nodes import comfy_registration as _comfy_registration

globals().update(_comfy_registration())
