"""Where and in which precision a pipeline runs: device and dtype names, and the inference set-up."""

from __future__ import annotations

import functools
from typing import Any

import torch
from diffusers import DiffusionPipeline

from ..cpu import cpu_has_fast_bf16
from ..models.vae_attention import use_vae_attention
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
    """None -> fp32; "auto" -> bf16 where it runs fast (CUDA with bf16; CPUs with AMX, or AMD with AVX512-BF16: see
    `cpu_has_fast_bf16`), else fp16 on CUDA, else fp32; "fp32"/"bf16"/"fp16" or a torch dtype as given."""
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


def prepare_for_inference(pipe: DiffusionPipeline, device: torch.device, dtype: torch.dtype) -> DiffusionPipeline:
    """Eval mode, device, dtype, channels-last convolution weights and the VAE's attention kernel choice."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.to(device)
    with quiet_diffusers():
        pipe.to(dtype=dtype)  # the text encoders, and anything loaded in another dtype
    for name in CONV_MODULES if getattr(pipe, "channels_last", True) else ():
        module = getattr(pipe, name, None)
        if module is not None:
            to_channels_last_in_place(module)
    if isinstance(getattr(pipe, "vae", None), torch.nn.Module):
        use_vae_attention(pipe.vae)  # SDPA or chunked matrix products, whichever is measured faster here
    return pipe


CHANNELS_LAST_BLOCK_BYTES = 4 * 2**20  # scratch for the rows being rewritten (channels-last conversion)


def to_channels_last_in_place(module: torch.nn.Module) -> None:
    """Every 4-D weight (and buffer) of `module` rewritten channels-last inside its own storage.
    `module.to(memory_format=...)` allocates a new copy of each weight instead, and the freed ones stay resident on
    the heap (+0.45 GiB at the end of a bf16 SD2.1 load). Each output channel's values stay inside its own slice of
    the storage in either layout, so a few output channels at a time go through one small scratch buffer (a whole
    1280x2560x3x3 weight as scratch was the peak of a bf16 SD2.1 load)."""
    scratch = None
    for sub in module.modules():
        for tensors in (sub._parameters, sub._buffers):
            for tensor in tensors.values():
                if tensor is None or tensor.ndim != 4 or tensor.is_contiguous(memory_format=torch.channels_last):
                    continue
                data = tensor.data
                if not data.is_contiguous():  # an unusual layout: a plain copy
                    tensor.data = data.contiguous(memory_format=torch.channels_last)
                    continue
                n, c, h, w = data.shape
                rows = max(1, CHANNELS_LAST_BLOCK_BYTES // max(1, c * h * w * data.element_size()))
                if scratch is None or scratch.numel() < rows * c * h * w or scratch.dtype != data.dtype:
                    scratch = torch.empty(min(n, rows) * c * h * w, dtype=data.dtype, device=data.device)
                permuted = data.as_strided(data.shape, (c * h * w, 1, w * c, c), data.storage_offset())
                for first in range(0, n, rows):
                    block = data[first : first + rows]
                    saved = scratch[: block.numel()].view(block.shape)
                    saved.copy_(block)
                    permuted[first : first + rows].copy_(saved)
                tensor.data = permuted


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
