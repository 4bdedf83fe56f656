"""Library side of onestep-sr: diffusers pipelines and everything they need (never imports ComfyUI).

- `methods/`: one module per SR method (detector, expected files, builder) and the registry.
- `loading/`: safe weight readers, LoRA injection, base models (single files with bundled configs).
- `models/`: model classes of our own (prompt embedding, SD3 text conditioning).
- `tiling/`: denoiser tiles, the exact streamed VAE, per-image tile plans, split/stitch.
- `pipeline_*.py`: the pipelines; `images.py`, `color_fix.py`: input/output and colour helpers.
"""

from .color_fix import adain_color_fix, apply_color_fix, wavelet_color_fix
from .images import ImageInputError
from .loading import CheckpointError, prepare_for_inference, read_weights, resolve_device, resolve_dtype
from .methods import (
    Method,
    convert_to_diffusers,
    detect_method,
    get_method,
    load_converted,
    load_pipeline,
    register,
    registered_methods,
)
from .methods.dape import convert_tagger, load_tagger
from .models import PromptEmbedding, RAMTagger, ResShiftUNet
from .pipeline_base import Conditioning, OneStepResult, OneStepSRBase, PromptConditionedSRBase
from .pipeline_onestep_sr import OneStepSRPipeline
from .pipeline_onestep_sr_resshift import OneStepSRResShiftPipeline
from .pipeline_onestep_sr_sd3 import OneStepSRSD3Pipeline

__all__ = [
    "CheckpointError",
    "Conditioning",
    "ImageInputError",
    "Method",
    "OneStepResult",
    "OneStepSRBase",
    "OneStepSRPipeline",
    "OneStepSRResShiftPipeline",
    "OneStepSRSD3Pipeline",
    "PromptConditionedSRBase",
    "PromptEmbedding",
    "RAMTagger",
    "ResShiftUNet",
    "adain_color_fix",
    "apply_color_fix",
    "convert_tagger",
    "convert_to_diffusers",
    "detect_method",
    "get_method",
    "load_converted",
    "load_pipeline",
    "load_tagger",
    "prepare_for_inference",
    "read_weights",
    "register",
    "registered_methods",
    "resolve_device",
    "resolve_dtype",
    "wavelet_color_fix",
]
