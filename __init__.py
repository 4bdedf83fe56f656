"""onestep-sr: one-step diffusion super-resolution.

This folder is both the importable package `onestep_sr` (library: see `pipelines/`) and a
ComfyUI custom-node pack (nodes are registered only when ComfyUI is present).
"""

from .pipelines import (
    CheckpointError,
    Conditioning,
    ImageInputError,
    Method,
    OneStepSRBase,
    OneStepSRPipeline,
    OneStepSRSD3Pipeline,
    PromptEmbedding,
    convert_to_diffusers,
    detect_method,
    get_method,
    load_converted,
    load_pipeline,
    prepare_for_inference,
    register,
    registered_methods,
)

__all__ = [
    "CheckpointError",
    "Conditioning",
    "ImageInputError",
    "Method",
    "OneStepSRBase",
    "OneStepSRPipeline",
    "OneStepSRSD3Pipeline",
    "PromptEmbedding",
    "convert_to_diffusers",
    "detect_method",
    "get_method",
    "load_converted",
    "load_pipeline",
    "prepare_for_inference",
    "register",
    "registered_methods",
]
__version__ = "0.1.0"

# Inside ComfyUI this exports the V3 `comfy_entrypoint`; elsewhere nothing.
from .nodes import comfy_registration as _comfy_registration

globals().update(_comfy_registration())
