"""Reading local model files safely: weight files, LoRA factors, base models, device and dtype set-up."""

from .bases import SD3_MEDIUM_CONFIG, SD21_BASE_CONFIG, load_sd3_base, load_sd_base, quiet_diffusers
from .devices import prepare_for_inference, resolve_device, resolve_dtype
from .files import CheckpointError, WeightsProbe, read_weight_keys, read_weights
from .lora import LoRAWeights, apply_lora, collect_lora_factors, fuse_lora_delta, replace_weights

__all__ = [
    "SD3_MEDIUM_CONFIG",
    "SD21_BASE_CONFIG",
    "CheckpointError",
    "LoRAWeights",
    "WeightsProbe",
    "apply_lora",
    "collect_lora_factors",
    "fuse_lora_delta",
    "load_sd3_base",
    "load_sd_base",
    "prepare_for_inference",
    "quiet_diffusers",
    "read_weight_keys",
    "read_weights",
    "replace_weights",
    "resolve_device",
    "resolve_dtype",
]
