"""The differentiable one-step forward (`one_step`) is what an untiled `__call__` computes, on the inference
parity cases of every family (OSEDiff, TSD-SR, TAD-SR), and it matches the official outputs and carries gradients."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from onestep_sr import load_pipeline
from onestep_sr.pipelines.images import load_images

from helpers import (
    OSEDIFF_RAW_ATOL,
    TADSR_PARITY,
    TSDSR_PARITY,
    TSDSR_RAW_ATOL,
    run_osediff_case,
    run_tsdsr_case,
    tadsr_one_step_cases,
    tsdsr_cases,
)

CPU = torch.device("cpu")


def condition(pipe, lq, prompt=""):
    cond = pipe.text_conditioning(prompt) if prompt else pipe.encode_prompt("", None, None, 0, CPU)
    return pipe.condition_on_image(cond, lq, CPU)


# Where autograd records, the VAE's attention is PyTorch SDPA; inference on the CPU runs it as chunked matrix
# products (pipelines/models/vae_attention.py): the same softmax(qk^T)v in another summation order (measured 7e-6)
ATTENTION_KERNELS_ATOL = 2e-5


def assert_call_equals_one_step(call_images, one_step):
    """`one_step()` without gradients is bit for bit what `__call__` computed; with gradients (the step returned,
    for the gradient checks) it differs only by the attention kernel."""
    height, width = call_images.shape[-2:]  # (the ResShift family's step keeps the padded LR's size)
    with torch.no_grad():
        plain = (one_step().image[..., :height, :width].float() * 0.5 + 0.5).clamp(0, 1)
    assert torch.equal(call_images, plain), f"max |__call__ - one_step| = {(call_images - plain).abs().max():.3g}"
    step = one_step()
    recorded = (step.image[..., :height, :width].detach().float() * 0.5 + 0.5).clamp(0, 1)
    assert (recorded - plain).abs().max() <= ATTENTION_KERNELS_ATOL
    return step


def assert_gradients_reach(step, params):
    """The forward ran with `params` trainable: the loss's gradient reaches every one of them."""
    step.image.float().square().mean().backward()
    grads = [p.grad for p in params]
    assert all(g is not None and g.abs().sum() > 0 for g in grads), "no gradient reached the trainable weights"


def lora_params(module):
    return [p for n, p in module.named_parameters() if "lora_" in n]


def test_osediff(osediff_pipe, parity_cases):
    params = lora_params(osediff_pipe.unet)
    for p in params:
        p.requires_grad_(True)
    try:
        check_osediff(osediff_pipe, parity_cases, params)
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None


def check_osediff(osediff_pipe, parity_cases, params):
    for case in parity_cases:
        images = run_osediff_case(osediff_pipe, case)
        lq = load_images(case.lq * 0.5 + 0.5)[0]
        image, _ = osediff_pipe.prepare_batch(lq.rgb)
        cond = condition(osediff_pipe, lq, case.prompt)
        step = assert_call_equals_one_step(
            images,
            lambda image=image, cond=cond, case=case: osediff_pipe.one_step(image, cond, "sample", case.generator()),
        )
        assert (step.image.detach().clamp(-1, 1) - case.out).abs().max() <= OSEDIFF_RAW_ATOL
    assert_gradients_reach(step, params)


def test_tsdsr():
    pipe = load_pipeline(
        TSDSR_PARITY / "tiny-sd3", TSDSR_PARITY / "lora", embeddings=TSDSR_PARITY / "embeddings", fuse_lora=False
    )
    pipe.set_progress_bar_config(disable=True)
    # SD3's last block discards its context stream, so the context queries there rightly get no gradient
    last = len(pipe.transformer.transformer_blocks) - 1
    params = [
        p
        for n, p in pipe.transformer.named_parameters()
        if "lora_" in n and not n.startswith(f"transformer_blocks.{last}.attn.add_q_proj")
    ]
    for p in params:
        p.requires_grad_(True)
    for case in tsdsr_cases():
        if case.lora_dir.name != "lora":
            continue
        images = run_tsdsr_case(pipe, case)
        lq = load_images(case.input["pixel_values"] * 0.5 + 0.5)[0]
        image, _ = pipe.prepare_batch(lq.rgb)
        cond = condition(pipe, lq)
        step = assert_call_equals_one_step(
            images, lambda image=image, cond=cond, case=case: pipe.one_step(image, cond, "sample", case.generator())
        )
        assert (step.image.detach()[0].clamp(-1, 1) - case.raw).abs().max() <= TSDSR_RAW_ATOL
    assert_gradients_reach(step, params)


@pytest.mark.parametrize("case_dir", tadsr_one_step_cases())
def test_tadsr(case_dir):
    from PIL import Image

    pipe = load_pipeline(
        TADSR_PARITY / "models" / "autoencoder_vq_f4_tiny_A.pth", TADSR_PARITY / "models" / "tadsr_tiny_A.pth"
    )
    pipe.set_progress_bar_config(disable=True)
    params = [p for n, p in pipe.unet.named_parameters() if n.startswith("out.")]
    for p in params:
        p.requires_grad_(True)
    folder = TADSR_PARITY / "cases" / case_dir
    t = load_file(folder / "tensors.safetensors")
    lr = Image.open(folder / "lr.png")
    images = pipe(lr, upscale=4, output_type="pt", tile_size=None, vae_tile_size=None, noise=t["eps"]).images
    lq = load_images(lr)[0]
    image, low = pipe.prepare_batch(lq.rgb)
    cond = condition(pipe, low)
    step = assert_call_equals_one_step(images, lambda: pipe.one_step(image, cond, noise=t["eps"]))
    assert (step.clean_latent.detach() - t["pred_x0"]).abs().max() <= 1e-4
    assert_gradients_reach(step, params)


def test_one_step_refuses_multi_step_samplers():
    from onestep_sr import OneStepSRResShiftPipeline

    pipe = load_pipeline(
        TADSR_PARITY / "models" / "autoencoder_vq_f4_tiny_A.pth", TADSR_PARITY / "models" / "tadsr_tiny_A.pth"
    )
    multi = OneStepSRResShiftPipeline(pipe.vae, pipe.unet, num_inference_steps=15)
    with pytest.raises(ValueError, match="15 denoiser steps"):
        multi.one_step(torch.zeros(1, 3, 256, 256), None)
