"""Library side of onestep-sr: diffusers pipelines and everything they need (never imports ComfyUI)."""

from .checkpoints import CheckpointError, detect_format, read_weights
from .color_fix import adain_color_fix, apply_color_fix, wavelet_color_fix
from .images import ImageInputError
from .loading import load_pipeline, prepare_for_inference, resolve_dtype
from .pipeline_onestep_sr import OneStepSRPipeline
from .pipeline_onestep_sr_sd3 import OneStepSRSD3Pipeline
from .prompt_embedding import PromptEmbedding

__all__ = [
    "CheckpointError",
    "ImageInputError",
    "OneStepSRPipeline",
    "OneStepSRSD3Pipeline",
    "PromptEmbedding",
    "adain_color_fix",
    "apply_color_fix",
    "detect_format",
    "load_pipeline",
    "prepare_for_inference",
    "read_weights",
    "resolve_dtype",
    "wavelet_color_fix",
]
