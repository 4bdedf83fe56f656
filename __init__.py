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
