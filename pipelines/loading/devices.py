"""Where and in which precision a pipeline runs: device and dtype names, and the inference set-up."""

from __future__ import annotations

import functools
from typing import Any

import torch
from diffusers import DiffusionPipeline

from ..options import DEVICE_NAMES, DTYPE_NAMES, DTYPES
from .bases import quiet_diffusers

# the modules whose convolution weights go channels-last (measured faster: see README)
CONV_MODULES = ("unet", "transformer", "vae")


def resolve_device(device: Any) -> torch.device:
    """None or "auto" -> CUDA when available, else CPU; any torch device (string) otherwise."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be one of {DEVICE_NAMES}, 'cuda:N' or a torch.device, got {device!r}") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but this torch build sees no CUDA GPU; use 'cpu' or 'auto'")
    return resolved


def resolve_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    """None -> fp32; "auto" -> bf16 where it runs fast (CUDA with bf16, CPUs with AMX/AVX512-BF16), else fp16
    on CUDA, else fp32; "fp32"/"bf16"/"fp16" or a torch dtype as given."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of {DTYPE_NAMES} or a torch.dtype, got {dtype!r}")


def cpu_has_fast_bf16() -> bool:
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def prepare_for_inference(pipe: DiffusionPipeline, device: torch.device, dtype: torch.dtype) -> DiffusionPipeline:
    """Eval mode, device, dtype, and channels-last convolution weights."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.to(device)
    with quiet_diffusers():
        pipe.to(dtype=dtype)  # the text encoders, and anything loaded in another dtype
    for name in CONV_MODULES if getattr(pipe, "channels_last", True) else ():
        module = getattr(pipe, name, None)
        if module is not None:
            module.to(memory_format=torch.channels_last)
    return pipe


def release_freed_memory() -> None:
    """Give the allocator's freed pages back to the system (glibc keeps freed heap memory resident: after a load,
    0.4 GiB of temporaries for a full-size SD2.1 in fp32). A no-op where there is no glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim  # (the process's own symbols: glibc's, where it is the C library)
    except (OSError, TypeError, AttributeError):
        return None
