"""The autoencoders' global self-attention as chunked matrix products, where that is faster than PyTorch SDPA.

A VAE's mid-block attends over every latent position with one head of 512 channels: at 1024 px output the ResShift
VQGAN-f4 attends over 65,536 tokens, twice (encoder and decoder), 17.6 of the 34.4 TFLOP of a TAD-SR/SinSR run.
`chunked_attention` computes `softmax(q k^T * scale) v` one block of queries at a time: the scores of one block (at
most `SCORES_BUDGET` bytes) are the only large workspace, reused for every block; the maximum, `exp` and sum of the
softmax run in place on it, the sum accumulated in float32 and the normalisation applied to the block's float32
result, so a bf16 run loses no more than its output dtype does (the scores themselves are rounded to the compute
dtype: there is no float32-output matrix product on the CPU). The order of operations is the official LDM
`AttnBlock`'s (scores, scale, softmax, weighted sum).

Which kernel runs (`vae_attention`) is measured, not assumed (`python tests/benchmarks/benchmark_vae_attention.py`):
- fp32 and fp16, and any GPU: PyTorch SDPA. Its CPU flash kernel ran one 512-channel head at 288-296 GFLOP/s in
  fp32 on this project's 2-core Intel machine, the chunked products at 262-280 (0.91-0.94x).
- bf16 on a CPU whose bf16 matrix products are fast (AMX, or AMD Zen 4+ with AVX512-BF16): the chunked products.
  On the AMD EPYC this project first ran on, SDPA ran these heads at ~200 GFLOP/s in bf16 and plain bf16 matrix
  products at 430-470. On an Intel CPU with AVX512-BF16 but no AMX, bf16 matrix products are slow (143-154 GFLOP/s
  chunked vs 166 SDPA here): SDPA.
- Where autograd records (training): SDPA (the in-place softmax could not be differentiated).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cpu import cpu_has_fast_bf16

SCORES_BUDGET = 128 * 2**20  # bytes of attention scores per block of queries
MIN_QUERY_BLOCK = 64


def query_block_size(queries: int, keys: int, itemsize: int, budget: int = SCORES_BUDGET) -> int:
    """How many queries one block takes so that its scores fit `budget` bytes (at least MIN_QUERY_BLOCK)."""
    return max(MIN_QUERY_BLOCK, min(queries, budget // max(keys * itemsize, 1)))


def chunked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, query_block: int | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale) v for (..., tokens, channels) tensors (leading dimensions: batch, heads), equal to
    `F.scaled_dot_product_attention(q, k, v, scale=scale)` within the dtype's rounding. Not differentiable."""
    lead, queries, keys = q.shape[:-2], q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (t.reshape(-1, *t.shape[-2:]) for t in (q, k, v))
    block = query_block or query_block_size(queries, keys, q.element_size())
    out = q.new_empty(q.shape[0], queries, v.shape[-1])
    scores = q.new_empty(min(block, queries), keys)
    for item in range(q.shape[0]):
        keys_t, values = k[item].transpose(0, 1), v[item]
        for start in range(0, queries, block):
            stop = min(start + block, queries)
            weights = scores[: stop - start]
            torch.mm(q[item, start:stop], keys_t, out=weights)
            weights.mul_(scale)
            weights.sub_(weights.amax(dim=-1, keepdim=True)).exp_()
            total = weights.sum(dim=-1, keepdim=True, dtype=torch.float32)
            mixed = torch.mm(weights, values)
            out[item, start:stop] = mixed.float().div_(total)  # (.float() is the tensor itself in fp32)
    return out.reshape(*lead, queries, v.shape[-1])


def uses_chunked_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    recording = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return not recording and q.device.type == "cpu" and q.dtype == torch.bfloat16 and cpu_has_fast_bf16()


def vae_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, query_block: int | None = None
) -> torch.Tensor:
    """The faster of the two kernels for this device, dtype and mode (module docstring)."""
    if uses_chunked_kernel(q, k, v):
        return chunked_attention(q, k, v, scale=scale, query_block=query_block)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


class VAEAttnProcessor:
    """A diffusers attention processor for the autoencoders' mid-block self-attention (group norm, one or more
    heads, residual, output rescale), computed with `vae_attention`. Anything else (cross-attention, masks, spatial
    or q/k norms) is handed to diffusers' own SDPA processor unchanged."""

    def __init__(self, query_block: int | None = None):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.query_block = query_block
        self.fallback = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        plain = (
            encoder_hidden_states is None
            and attention_mask is None
            and attn.spatial_norm is None
            and attn.norm_q is None
            and attn.norm_k is None
            and not kwargs
        )
        if not plain:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        residual = hidden_states
        spatial = hidden_states.ndim == 4
        if spatial:
            n, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        batch, tokens, inner = q.shape
        head_dim = inner // attn.heads
        q, k, v = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))
        mixed = vae_attention(q, k, v, scale=attn.scale, query_block=self.query_block)
        hidden_states = attn.to_out[1](attn.to_out[0](mixed.transpose(1, 2).reshape(batch, tokens, inner)))
        if spatial:
            hidden_states = hidden_states.transpose(1, 2).reshape(n, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def use_vae_attention(vae: torch.nn.Module, query_block: int | None = None) -> None:
    """Route every attention layer of an autoencoder through `VAEAttnProcessor` (a no-op for a model without
    diffusers attention layers)."""
    from diffusers.models.attention_processor import Attention

    processor = VAEAttnProcessor(query_block)
    for module in vae.modules():
        if isinstance(module, Attention):
            module.set_processor(processor)
