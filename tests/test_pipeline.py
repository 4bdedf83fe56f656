"""OneStepSRPipeline behaviour: the one-step math, accepted inputs, outputs, precision and conditioning."""

import copy

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from onestep_sr import ImageInputError, OneStepSRPipeline, PromptEmbedding


@pytest.fixture(scope="module")
def pipe(osediff_pipe_fused):
    return osediff_pipe_fused


def copy_in(pipe, dtype):
    """An independent copy in another dtype (from_pipe would cast the shared modules in place)."""
    copied = OneStepSRPipeline(**copy.deepcopy(pipe.components), timestep=pipe.config.timestep).to(dtype=dtype)
    copied.set_progress_bar_config(disable=True)
    return copied


def run(pipe, image, **kw):
    kw.setdefault("output_type", "pt")
    return pipe(image, **kw).images


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("t", [999, 500, 1])
def test_closed_form_matches_ddpm_pred_original_sample(pipe, prediction_type, t):
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(t)
    latents, output = torch.randn(2, 1, 4, 6, 6, generator=g)
    reference = scheduler.step(output, t, latents).pred_original_sample  # diffusers' own formula
    test_pipe = OneStepSRPipeline(vae=pipe.vae, unet=pipe.unet, scheduler=scheduler, timestep=t)
    torch.testing.assert_close(test_pipe.predict_clean_latent(output, latents), reference, atol=1e-5, rtol=1e-6)


def test_sd21_one_step_coefficients_match_published_values(pipe):
    # methods-osediff.md: x0 = 14.6488 z - 14.6147 eps at t = 999 for SD2.1-base's schedule
    z, eps = torch.tensor([[1.0]]), torch.tensor([[0.0]])
    assert pipe.predict_clean_latent(eps, z).item() == pytest.approx(14.6488, abs=1e-3)
    assert pipe.predict_clean_latent(torch.tensor([[1.0]]), torch.tensor([[0.0]])).item() == pytest.approx(
        -14.6147, abs=1e-3
    )


@pytest.mark.parametrize("size,upscale", [((37, 27), 1), ((37, 27), 2), ((1, 1), 4), ((1, 9), 4), ((64, 3), 2)])
def test_output_is_exactly_upscale_times_input(pipe, size, upscale):
    w, h = size
    rgb = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = run(pipe, Image.fromarray(rgb), upscale=upscale, color_fix="none")
    assert out.shape == (1, 3, h * upscale, w * upscale)
    # reference: upsample as the official code (Pillow bicubic), pad to the latent grid ourselves (reflect, or
    # replicate where the image is smaller than the pad), run that at x1 and crop: the same pixels
    up = Image.fromarray(rgb).resize((w * upscale, h * upscale), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(up, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    grid = 2 ** (len(pipe.vae.config.block_out_channels) - 1)  # the VAE's downsampling (2 for the tiny VAE)
    pad_h, pad_w = (-x.shape[-2]) % grid, (-x.shape[-1]) % grid
    mode = "reflect" if pad_h < x.shape[-2] and pad_w < x.shape[-1] else "replicate"
    padded = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), mode=mode)
    expected = run(pipe, padded, upscale=1, color_fix="none")[..., : h * upscale, : w * upscale]
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_adain_output_takes_the_input_colour_statistics(pipe):
    img = Image.fromarray(np.random.default_rng(1).integers(40, 200, (20, 24, 3), dtype=np.uint8))
    out = run(pipe, img, upscale=1, color_fix="adain")
    source = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(out[0].mean(dim=(1, 2)), source.mean(dim=(1, 2)), atol=2e-3, rtol=0)


def test_equivalent_inputs_give_identical_outputs(pipe):
    rng = np.random.default_rng(2)
    rgb8 = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    reference = run(pipe, Image.fromarray(rgb8), upscale=1)
    as_float = rgb8.astype(np.float32) / 255
    assert torch.equal(run(pipe, rgb8, upscale=1), reference)
    assert torch.equal(run(pipe, as_float, upscale=1), reference)
    assert torch.equal(run(pipe, torch.from_numpy(as_float).permute(2, 0, 1), upscale=1), reference)
    assert torch.equal(run(pipe, torch.from_numpy(as_float).permute(2, 0, 1)[None], upscale=1), reference)
    # 16-bit PNG data v*257 is exactly v/255 in [0, 1]
    rgb16 = rgb8.astype(np.uint16) * 257
    assert torch.equal(run(pipe, rgb16, upscale=1), reference)


def test_grayscale_is_processed_as_rgb(pipe):
    gray = Image.fromarray(np.random.default_rng(3).integers(0, 256, (9, 11), dtype=np.uint8), "L")
    assert torch.equal(run(pipe, gray, upscale=2), run(pipe, gray.convert("RGB"), upscale=2))
    gray16 = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)
    assert gray16.mode.startswith("I")
    assert torch.equal(run(pipe, gray16, upscale=1), run(pipe, gray.convert("RGB"), upscale=1))


def test_alpha_is_upscaled_separately_and_reattached(pipe):
    rng = np.random.default_rng(4)
    rgba = np.concatenate([rng.integers(0, 256, (10, 12, 3)), np.full((10, 12, 1), 128)], axis=-1).astype(np.uint8)
    img = Image.fromarray(rgba, "RGBA")
    out = pipe(img, upscale=2).images[0]
    assert out.mode == "RGBA" and out.size == (24, 20)
    assert (np.asarray(out)[..., 3] == 128).all()  # bicubic keeps a constant alpha constant
    rgb_only = run(pipe, img.convert("RGB"), upscale=2)
    assert torch.equal(run(pipe, img, upscale=2)[:, :3], rgb_only)  # alpha never leaks into the colours


def test_batches_of_mixed_sizes_and_output_types(pipe):
    a, b = torch.rand(3, 8, 8), torch.rand(3, 6, 10)
    out = run(pipe, [a, b], upscale=2)
    assert isinstance(out, list) and [o.shape for o in out] == [(3, 16, 16), (3, 12, 20)]
    stacked = run(pipe, torch.stack([a, a]), upscale=2)
    assert stacked.shape == (2, 3, 16, 16) and torch.equal(stacked[0], stacked[1])
    np_out = pipe(a, upscale=2, output_type="np").images
    assert np_out.shape == (1, 16, 16, 3) and np_out.dtype == np.float32
    np.testing.assert_allclose(np_out[0], stacked[0].permute(1, 2, 0).numpy(), atol=0)
    pil = pipe(a, upscale=2).images[0]
    np.testing.assert_array_equal(np.asarray(pil), (np_out[0] * 255).round().astype(np.uint8))
    (tuple_out,) = pipe(a, upscale=2, output_type="pt", return_dict=False)
    assert torch.equal(tuple_out, stacked[:1])


def test_sampling_is_seeded_and_mode_is_deterministic(pipe):
    x = torch.rand(3, 8, 8)
    s1 = run(pipe, x, latent_sampling="sample", generator=torch.Generator().manual_seed(5))
    s2 = run(pipe, x, latent_sampling="sample", generator=torch.Generator().manual_seed(5))
    s3 = run(pipe, x, latent_sampling="sample", generator=torch.Generator().manual_seed(6))
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)
    assert torch.equal(run(pipe, x), run(pipe, x))


@pytest.mark.parametrize(
    "bad,message",
    [
        (torch.rand(8, 8, 3), "channels-last"),
        (torch.full((3, 4, 4), float("nan")), "NaN"),
        (np.full((4, 4, 3), 200.0), "looks like 0-255"),
        (torch.rand(3, 4, 4) * 2 - 1, "looks like \\[-1, 1\\]"),
        (torch.rand(0, 3, 4, 4), "empty batch"),
        ([], "empty list"),
        (np.zeros((4, 4, 5)), "1 \\(gray\\), 2 \\(gray\\+alpha\\), 3 \\(RGB\\) or 4 \\(RGBA\\)"),
        (np.zeros((4, 4, 3), dtype=np.int32), "dtype int32"),
        ("image.png", "unsupported image type str"),
    ],
)
def test_bad_inputs_are_clear_errors(pipe, bad, message):
    with pytest.raises(ImageInputError, match=message):
        pipe(bad)


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"upscale": 0}, "upscale must be a positive integer"),
        ({"upscale": 2.5}, "upscale must be a positive integer"),
        ({"upscale": 100000}, "largest side supported"),
        ({"color_fix": "hist"}, "color_fix must be one of"),
        ({"latent_sampling": "argmax"}, "latent_sampling must be one of"),
        ({"prompt": ["a", "b"]}, "got 2 prompts for 1 images"),
    ],
)
def test_bad_arguments_are_clear_errors(pipe, kw, message):
    with pytest.raises((ValueError, ImageInputError), match=message):
        pipe(torch.rand(3, 4, 4), **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_close_to_fp32(osediff_pipe_fused, parity_cases, dtype):
    case = parity_cases[0]
    reference = run(osediff_pipe_fused, case.lq * 0.5 + 0.5, upscale=1, prompt=case.prompt, color_fix="none")
    low = copy_in(osediff_pipe_fused, dtype)
    assert low.unet.dtype == dtype and osediff_pipe_fused.unet.dtype == torch.float32
    out = run(low, case.lq * 0.5 + 0.5, upscale=1, prompt=case.prompt, color_fix="none")
    mse = ((out - reference) ** 2).mean().item()
    psnr = 10 * np.log10(1 / mse)
    assert psnr > 25, f"{dtype}: PSNR vs fp32 {psnr:.1f} dB"


def test_decode_falls_back_to_fp32_on_overflow(osediff_pipe_fused, monkeypatch):
    pipe = copy_in(osediff_pipe_fused, torch.float16)
    latents = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    # the fallback decodes with the fp16 weights upcast, so the reference is exactly that in fp32
    reference = copy_in(osediff_pipe_fused, torch.float16).to(dtype=torch.float32).decode(latents)
    real_decode = type(pipe.vae).decode

    def overflowing_in_fp16(self, z, *args, **kwargs):
        out = real_decode(self, z, *args, **kwargs)
        if z.dtype == torch.float16:
            out.sample.fill_(float("inf"))
        return out

    monkeypatch.setattr(type(pipe.vae), "decode", overflowing_in_fp16)
    out = pipe.decode(latents)
    assert torch.isfinite(out).all() and pipe.vae.dtype == torch.float16
    torch.testing.assert_close(out.float(), reference, atol=1e-6, rtol=0)


def test_learned_prompt_embedding_pipeline_round_trips(osediff_pipe_fused, tmp_path):
    c = osediff_pipe_fused.components
    embeds = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(9))
    pipe = OneStepSRPipeline(
        vae=c["vae"],
        unet=c["unet"],
        scheduler=c["scheduler"],
        prompt_embedding=PromptEmbedding.from_tensors(embeds),
        timestep=999,
    )
    pipe.set_progress_bar_config(disable=True)
    x = torch.rand(3, 8, 8)
    out = run(pipe, x)
    assert torch.equal(out, run(osediff_pipe_fused, x, prompt_embeds=embeds))
    assert not torch.equal(out, run(osediff_pipe_fused, x))  # differs from the empty text prompt
    with pytest.raises(ValueError, match="no text encoder, so a custom prompt"):
        pipe(x, prompt="a cat")
    pipe.save_pretrained(tmp_path / "d3sr-like")
    reloaded = OneStepSRPipeline.from_pretrained(tmp_path / "d3sr-like", local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.text_encoder is None and reloaded.config.timestep == 999
    # from_pretrained gives NCHW weights, load_pipeline channels-last ones: other conv kernels, same math
    # (eps differences are amplified ~14.6x into x0; the parity data saw 1.1e-5 from a thread-count change)
    torch.testing.assert_close(run(reloaded, x), out, atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    ("size", "upscale", "long_side", "expected"),
    [
        ((300, 400), 4, 2048, (384, 512)),  # landscape: the long side becomes 2048 / 4
        ((400, 300), 4, 2048, (512, 384)),  # portrait
        ((300, 400), 4, 2050, (384, 512)),  # 2050 / 4 = 512.5 -> 512: the output long side is a multiple of 4
        ((1000, 10), 4, 100, (25, 1)),  # a thin strip keeps at least one pixel
        ((64, 64), 1, 100, (100, 100)),  # x1: a plain resize
    ],
)
def test_input_size_for_a_target_long_side(size, upscale, long_side, expected):
    from onestep_sr.pipelines.images import input_size_for_long_side

    assert input_size_for_long_side(size, upscale, long_side) == expected


def test_target_long_side_bounds():
    from onestep_sr.pipelines.images import MAX_OUTPUT_SIDE, input_size_for_long_side

    with pytest.raises(ImageInputError, match="exceeds the largest side supported"):
        input_size_for_long_side((10, 10), 4, MAX_OUTPUT_SIDE + 1)
    with pytest.raises(ValueError, match="upscale must be a positive integer"):
        input_size_for_long_side((10, 10), 0, 100)
    with pytest.raises(ValueError, match=r"target long side must be a whole number of pixels >= upscale \(4\)"):
        input_size_for_long_side((10, 10), 4, 3.5)


# ------------------------------------------------------------------ arguments checked before work


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"prompt_embeds": torch.zeros(1, 77, 7)},
            r"prompt_embeds must be a 3-D tensor of width 32 .* got \(1, 77, 7\)",
        ),
        ({"prompt_embeds": torch.full((1, 77, 32), float("nan"))}, "prompt_embeds holds NaN or Inf"),
        ({"prompt_embeds": torch.zeros(77, 32)}, "3-D tensor"),
        ({"generator": 1234}, "generator must be a torch.Generator"),
        ({"generator": [torch.Generator(), "seed"]}, "generator must be a torch.Generator"),
        ({"prompt": "a \ud800 cat"}, "not encodable text"),
    ],
    ids=["embeds-width", "embeds-nan", "embeds-2d", "generator-int", "generator-list", "lone-surrogate"],
)
def test_bad_arguments_are_clear_errors_before_work(osediff_pipe, kwargs, message):
    called = []
    original = osediff_pipe.encode
    osediff_pipe.encode = lambda *a, **k: called.append(1) or original(*a, **k)
    try:
        image = [torch.rand(3, 8, 8)] * (2 if isinstance(kwargs.get("generator"), list) else 1)
        with pytest.raises(ValueError, match=message):
            osediff_pipe(image, upscale=1, output_type="pt", **kwargs)
    finally:
        del osediff_pipe.encode
    assert not called, "the VAE ran before the argument was checked"


def test_progress_and_cancel_belong_to_their_own_call(osediff_pipe, monkeypatch):
    """Two threads run one pipeline: call A pauses inside its denoiser while call B runs whole. B's forward passes
    the hooks A registered, yet A's callback is never called from B's thread, and A's cancel ends A alone."""
    import threading

    from onestep_sr.pipelines.pipeline_base import Progress

    monkeypatch.setattr(Progress, "TICK_SECONDS", 0.0)  # every denoiser block reports
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    solo = osediff_pipe(image, upscale=1, output_type="pt").images
    a_threads, b_threads, b_result = [], [], []

    class Cancelled(Exception):
        pass

    def run_b():
        b_result.append(
            osediff_pipe(image, upscale=1, output_type="pt", progress_callback=lambda d, t: b_threads.append(
                threading.get_ident())).images
        )  # fmt: skip

    def a_callback(done, total):
        a_threads.append(threading.get_ident())
        # calls 1-2 close A's encode; from the 3rd on A's denoiser blocks report, with A's hooks on the shared UNet
        if len(a_threads) == 5 and any(block._forward_hooks for block in osediff_pipe.unet.down_blocks):
            b = threading.Thread(target=run_b)
            b.start()
            b.join(timeout=60)
            raise Cancelled

    def run_a():
        with pytest.raises(Cancelled):
            osediff_pipe(image, upscale=1, output_type="pt", progress_callback=a_callback)

    a = threading.Thread(target=run_a)
    a.start()
    a.join(timeout=60)
    assert len(set(a_threads)) == 1 and a_threads[0] != b_threads[0], "A's callback ran in B's thread"
    assert len(a_threads) == 5, "A did not reach its denoiser"
    assert b_result and torch.equal(b_result[0], solo), "B was disturbed by A"
    assert len(set(b_threads)) == 1
