"""onestep-sr: one-step diffusion super-resolution.

This folder is both the importable package `onestep_sr` (library: see `pipelines/`) and a
ComfyUI custom-node pack (nodes are registered only when ComfyUI is present).
"""

from .pipelines import (
    CheckpointError,
    ImageInputError,
    OneStepSRPipeline,
    OneStepSRSD3Pipeline,
    PromptEmbedding,
    load_pipeline,
    prepare_for_inference,
)

__all__ = ["CheckpointError", "ImageInputError", "OneStepSRPipeline", "OneStepSRSD3Pipeline", "PromptEmbedding", "load_pipeline", "prepare_for_inference"]
__version__ = "0.1.0"

# Inside ComfyUI this exports the nodes (V3 `comfy_entrypoint`, or V1 mappings on old builds); elsewhere nothing.
from .nodes import comfy_registration as _comfy_registration  # noqa: E402

globals().update(_comfy_registration())
