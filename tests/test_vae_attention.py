"""The autoencoders' mid-block attention as chunked matrix products (pipelines/models/vae_attention.py): equal to a
float64 recomputation within the dtype's rounding, to diffusers' own SDPA processor on whole VAEs, installed by
`prepare_for_inference`, chosen only where it is measured faster, and out of the way where autograd records."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, VQModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from onestep_sr.pipelines.models import vae_attention as module
from onestep_sr.pipelines.models.vae_attention import (
    VAEAttnProcessor,
    chunked_attention,
    query_block_size,
    use_vae_attention,
    vae_attention,
)


def float64_attention(q, k, v, scale):
    """softmax(q k^T scale) v, written out in float64 (the LDM AttnBlock's order)."""
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


def qkv(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # peaked scores (std ~2 after scaling), as trained attention has: the case where rounding matters
    return [(torch.randn(shape, generator=generator, dtype=torch.float64) * s).to(dtype) for s in (1.5, 1.5, 1.0)]


@pytest.mark.parametrize("block", [None, 64, 100, 1000])
@pytest.mark.parametrize("shape", [(1, 1, 700, 64), (2, 3, 333, 32)])
def test_float32_matches_float64_for_any_block_size(shape, block):
    q, k, v = qkv(shape, torch.float32)
    scale = shape[-1] ** -0.5
    ours = chunked_attention(q, k, v, scale=scale, query_block=block)
    assert ours.shape == shape and ours.dtype == torch.float32
    reference = float64_attention(q, k, v, scale)
    sdpa_error = (F.scaled_dot_product_attention(q, k, v, scale=scale).double() - reference).abs().max()
    assert (ours.double() - reference).abs().max() <= max(2 * sdpa_error, 1e-6)  # no worse than PyTorch's kernel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_stays_within_a_few_roundings(dtype):
    """The scores are rounded to the compute dtype by the matrix product (no float32 output on the CPU); the
    softmax sum and the normalisation are float32. Bound: 8 roundings of the output's magnitude."""
    q, k, v = qkv((1, 1, 1500, 128), dtype)
    reference = float64_attention(q, k, v, 128**-0.5)
    ours = chunked_attention(q, k, v, query_block=256)
    eps = torch.finfo(dtype).eps
    assert ours.dtype == dtype
    assert (ours.double() - reference).abs().max() <= 8 * eps * reference.abs().max()
    # the softmax weights sum to one in float32: a constant value matrix comes back (to the dtype's rounding)
    ones = chunked_attention(q, k, torch.ones_like(v), query_block=256)
    assert (ones.double() - 1).abs().max() <= eps


def test_query_blocks_bound_the_scores_workspace():
    assert query_block_size(65536, 65536, 4) == 512  # 128 MiB of float32 scores: 512 queries of 65,536 keys
    assert query_block_size(65536, 65536, 2) == 1024
    assert query_block_size(100, 4096, 4) == 100  # never more than there are queries
    assert query_block_size(10**6, 10**7, 4) == 64  # at least one useful block


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_the_kernel_is_chosen_by_dtype_machine_and_autograd(fast_bf16, monkeypatch):
    """Chunked only for bf16 inference on CPUs with fast bf16 matrix products (AMX, AMD with AVX512-BF16); SDPA for
    fp32/fp16 (measured as fast or faster), elsewhere, and wherever autograd records."""
    monkeypatch.setattr(module, "cpu_has_fast_bf16", lambda: fast_bf16)
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        q, k, v = qkv((1, 1, 200, 32), dtype)
        calls.clear()
        with torch.no_grad():
            vae_attention(q, k, v)
        assert bool(calls) == (dtype != torch.bfloat16 or not fast_bf16), dtype
    q.requires_grad_(True)
    calls.clear()
    vae_attention(q, k, v).float().sum().backward()  # differentiable
    assert calls and q.grad is not None


def tiny_vq():
    torch.manual_seed(0)
    return VQModel(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=3, norm_num_groups=16, num_vq_embeddings=64,
        vq_embed_dim=3, layers_per_block=1,
    ).eval()  # fmt: skip


def tiny_kl():
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=16, layers_per_block=1,
    ).eval()  # fmt: skip


def encode(vae, image):
    out = vae.encode(image)
    return out.latents if hasattr(out, "latents") else out.latent_dist.mode()


def attention_layers(vae):
    return [m for m in vae.modules() if isinstance(m, Attention)]


@pytest.mark.parametrize("make", [tiny_vq, tiny_kl])
def test_whole_vae_equals_diffusers_sdpa_processor(make, monkeypatch):
    vae = make()
    monkeypatch.setattr(module, "uses_chunked_kernel", lambda q, k, v: True)  # the chunked kernel, on any machine
    runs = []
    monkeypatch.setattr(module, "chunked_attention", lambda *a, **kw: runs.append(1) or chunked_attention(*a, **kw))
    image = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        for layer in attention_layers(vae):
            layer.set_processor(AttnProcessor2_0())
        reference_latent = encode(vae, image)
        reference = vae.decode(reference_latent).sample
        use_vae_attention(vae, query_block=50)  # several blocks of the 24x20 latent's 480 tokens
        assert all(isinstance(layer.processor, VAEAttnProcessor) for layer in attention_layers(vae))
        latent = encode(vae, image)
        decoded = vae.decode(latent).sample
    assert len(runs) == 2  # encoder and decoder mid-blocks
    assert (latent - reference_latent).abs().max() <= 1e-5
    assert (decoded - reference).abs().max() <= 1e-5


def test_prepare_for_inference_installs_it_on_the_vae(osediff_pipe_fused):
    assert all(isinstance(layer.processor, VAEAttnProcessor) for layer in attention_layers(osediff_pipe_fused.vae))
    assert attention_layers(osediff_pipe_fused.vae)


def test_cross_attention_and_masks_go_to_diffusers_processor():
    torch.manual_seed(0)
    layer = Attention(query_dim=32, heads=2, dim_head=16, cross_attention_dim=24).eval()
    x, context = torch.randn(1, 10, 32), torch.randn(1, 7, 24)
    with torch.no_grad():
        reference = layer(x, encoder_hidden_states=context)
        layer.set_processor(VAEAttnProcessor())
        assert torch.equal(layer(x, encoder_hidden_states=context), reference)
