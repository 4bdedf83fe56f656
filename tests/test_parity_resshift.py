"""Parity with the official TAD-SR code (and ResShift v3's 4-step sampler) on tiny models
(tests/data/parity/tadsr, produced by LearningHx/TAD-SR 8b0373f and zsyOAOA/ResShift 3ce1d81).

Tolerances (parity README section 7): re-running the official code on 1 instead of 2 threads moved z_y/x_T by 3.8e-6,
pred_x0 by 9.1e-6 and the decoded image by 5.8e-6 and flipped no VQ index. We allow 5e-5 on z_y/x_T (as the README
suggests; this family runs in the default memory format, since channels-last moved z_y by 2e-4), 1e-4 on pred_x0
and the decoder, and compare VQ indices exactly outside the recorded near-ties (gap < 1e-3,
section 6.1: an index flip is not an error, it moves the output by up to 0.13 inside its 4x4 block and ~2e-3 beyond
32 px). End to end: 1e-4 where no code flipped; around a flipped code its +-32 HR px are excluded and the rest
allowed 2e-3 per flip. Every sensitivity row moves the output by >= 0.05 on average (sensitivity.json): far above.
"""

import functools
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from onestep_sr import CheckpointError, OneStepSRResShiftPipeline, load_converted, load_pipeline
from onestep_sr.pipelines.pipeline_onestep_sr_resshift import nearest_codes, sqrt_eta_schedule
from onestep_sr.pipelines.tiling.plan import TilingPlan

from helpers import TADSR_PARITY, tadsr_one_step_cases

VQ = TADSR_PARITY / "models" / "autoencoder_vq_f4_tiny_A.pth"
UNET = TADSR_PARITY / "models" / "tadsr_tiny_A.pth"
ONE_STEP = tadsr_one_step_cases()


class Case:
    def __init__(self, name):
        self.name, self.dir = name, TADSR_PARITY / "cases" / name
        self.record = json.loads((self.dir / "case.json").read_text())
        self.t = load_file(self.dir / ("patches.safetensors" if name.startswith("c") else "tensors.safetensors"))

    def lr(self) -> Image.Image:
        return Image.open(self.dir / "lr.png")

    @property
    def reference(self) -> torch.Tensor:
        return self.t["decoded"].clamp(-1, 1) * 0.5 + 0.5


@pytest.fixture(scope="module")
def pipe():
    pipe = load_pipeline(VQ, UNET)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.cache
def load_case(name: str) -> Case:
    return Case(name)


@pytest.fixture(params=ONE_STEP)
def case(request) -> Case:
    """One TAD-SR one-step parity case per test (its name in the test id)."""
    return load_case(request.param)


@pytest.fixture(scope="module")
def cases():
    found = [load_case(n) for n in ONE_STEP]
    assert all(c.t["eps"].numel() for c in found), "the TAD-SR parity data must be present (tests/data/parity/tadsr)"
    return found


def run(pipe, case, **kw):
    kw.setdefault("noise", case.t["eps"])
    return pipe(case.lr(), upscale=4, output_type="pt", tile_size=None, vae_tile_size=None, **kw).images


def condition(pipe, lq):
    cpu = torch.device("cpu")
    return pipe.condition_on_image(pipe.encode_prompt("", None, None, 0, cpu), lq, cpu)


def code_indices(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    d = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
    return d.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])


def assert_output_matches(out: torch.Tensor, case: Case, flipped: torch.Tensor) -> None:
    """atol 1e-4 where no code flipped; +-32 HR px around flipped codes excluded, 2e-3 per flip elsewhere."""
    diff = (out - case.reference).abs()[0].amax(0)
    keep = torch.ones_like(diff, dtype=torch.bool)
    for r, c in flipped.nonzero().tolist():
        keep[max(0, 4 * r - 32) : 4 * r + 36, max(0, 4 * c - 32) : 4 * c + 36] = False
    limit = 1e-4 if not flipped.any() else 2e-3 * int(flipped.sum())
    assert diff[keep].max().item() <= limit, f"{case.name}: {diff[keep].max().item():.3g} > {limit}"


def test_schedule_matches_the_official_table(pipe):
    table = json.loads((TADSR_PARITY / "eta_schedule.json").read_text())
    ours = sqrt_eta_schedule(15, 0.04, 2.0, 0.99, 0.3, clamp_start=True)
    assert max(abs(a - b) for a, b in zip(ours, table["float64"]["sqrt_etas"])) < 1e-7
    etas32 = torch.tensor(ours**2).float()
    runtime = table["float32_runtime"]
    assert torch.equal(etas32, torch.tensor(runtime["etas"]))
    # The norm factor 1 / sqrt(kappa^2 eta + 1) divides by a float32 sqrt, as upstream. torch's float32 sqrt is
    # correctly rounded on some CPUs and within one ulp on others (AVX512 here: it reproduces the recorded table
    # bit for bit; on an Intel Xeon two entries came out one ulp apart). So: ours and the recorded factors both lie
    # within one ulp of the exact float64 root.
    exact = torch.sqrt(etas32.double() * 4.0 + 1)
    ulp = torch.finfo(torch.float32).eps * exact
    assert pipe.config.kappa == 2.0 and np.array_equal(pipe.sqrt_etas, ours)  # the tiny TAD-SR: the same schedule
    norm = torch.stack([pipe.input_norm(t) for t in range(len(ours))])
    assert ((norm.double() - exact).abs() <= ulp).all()
    assert ((torch.tensor(runtime["norm_factor"]).double() - exact).abs() <= ulp).all()
    for name in multi_step_cases():
        v3 = json.loads((TADSR_PARITY / "cases" / name / "case.json").read_text())["schedule"]
        mine = sqrt_eta_schedule(4, 0.2, 2.0, 0.99, 0.3, clamp_start=False)  # ResShift: no sqrt(0.001) cap
        assert max(abs(a - b) for a, b in zip(mine, v3["sqrt_etas"])) < 1e-7


def test_stages_match_the_official_intermediates(pipe, case):
    from onestep_sr.pipelines.images import load_images

    (lq,) = load_images(case.lr())
    assert torch.equal(lq.rgb * 2 - 1, case.t["lr_m11"])
    x_up, size = pipe.model_input(lq, None)
    if "x_up" in case.t:
        assert torch.equal(x_up, case.t["x_up"])
    cond = pipe.condition_on_image(pipe.encode_prompt("", None, None, 0, torch.device("cpu")), lq, torch.device("cpu"))
    if "lq_padded" in case.t:
        assert torch.equal(cond.image, case.t["lq_padded"])
    z = pipe.encode(x_up, "mode", None)
    assert (z - case.t["z_y"]).abs().max() <= 5e-5, case.name
    x_t = pipe.start_latents(case.t["z_y"], case.t["eps"], None)
    assert torch.equal(x_t, case.t["x_T"]), case.name  # the closed form, bit for bit
    plan = TilingPlan.untiled(tuple(x_t.shape[-2:]))
    pred = pipe.denoise(x_t, cond, plan)
    assert (pred - case.t["pred_x0"]).abs().max() <= 1e-4, case.name
    codebook = pipe.vae.quantize.embedding.weight
    near_tie = case.t["vq_near_tie"].bool()
    assert torch.equal(code_indices(pred, codebook)[~near_tie], case.t["vq_indices"].long()[~near_tie])
    if "z_q" in case.t:  # the decoder alone, from the official quantised latent
        decoded = pipe.vae.decode(case.t["z_q"], force_not_quantize=True).sample[..., : size[0], : size[1]]
        assert (decoded - case.t["decoded"]).abs().max() <= 1e-4, case.name
        assert torch.allclose(nearest_codes(case.t["pred_x0"], codebook), case.t["z_q"], atol=1e-6)
        # row blocks (bounded memory on large images) give the same codes as one block
        from onestep_sr.pipelines import pipeline_onestep_sr_resshift as module

        one_block = nearest_codes(pred, codebook)
        blocked, module.VQ_ROWS_PER_BLOCK = module.VQ_ROWS_PER_BLOCK, 100
        try:
            assert torch.equal(nearest_codes(pred, codebook), one_block)
        finally:
            module.VQ_ROWS_PER_BLOCK = blocked


def test_output_through_the_public_api(pipe, case):
    codebook = pipe.vae.quantize.embedding.weight
    out = run(pipe, case)
    assert out.shape[-2:] == case.reference.shape[-2:]
    ours = code_indices(
        pipe.denoise(
            case.t["x_T"],
            pipe.condition_on_image(
                pipe.encode_prompt("", None, None, 0, torch.device("cpu")), _lq(case), torch.device("cpu")
            ),
        ),
        codebook,
    )
    assert_output_matches(out, case, ours != case.t["vq_indices"].long())


def _lq(case):
    from onestep_sr.pipelines.images import load_images

    return load_images(case.lr())[0]


def test_recorded_seed_reproduces_the_official_noise(pipe, cases):
    for case in cases[:2]:
        seeded = pipe(case.lr(), upscale=4, output_type="pt", tile_size=None, vae_tile_size=None,
                      generator=torch.Generator().manual_seed(case.record["seed"])).images  # fmt: skip
        torch.testing.assert_close(seeded, run(pipe, case), atol=0, rtol=0)


def largest(cases):
    return max(cases, key=lambda c: c.lr().size[0] * c.lr().size[1])


def padded(cases):
    """The first case whose LR is not a multiple of the padding (so the padding rows apply)."""
    return next(c for c in cases if any(n % 64 for n in c.lr().size))


def multi_step_cases() -> list[str]:
    """Cases of ResShift's own sampler: folders whose case.json records a schedule (not in cases.json)."""
    folders = sorted(p for p in (TADSR_PARITY / "cases").iterdir() if (p / "case.json").is_file())
    return [p.name for p in folders if "schedule" in json.loads((p / "case.json").read_text())]


def test_streamed_vae_and_tiles_stay_close(pipe, cases):
    """Default settings (streamed VAE beyond 512 px, tiles beyond 256 latents) on the largest case."""
    case = largest(cases)
    out = pipe(case.lr(), upscale=4, noise=case.t["eps"], output_type="pt").images
    assert (out - run(pipe, case)).abs().max() < 2e-3  # the streamed VQ VAE is exact up to float error


@pytest.mark.parametrize("name", multi_step_cases())
def test_resshift_v3_four_steps(name):
    case = Case(name)
    v3 = load_pipeline(VQ, UNET, method="resshift-v3")
    v3.set_progress_bar_config(disable=True)
    assert v3.timesteps == [3, 2, 1, 0] and v3.denoiser_calls == 4
    out = v3(case.lr(), upscale=4, generator=torch.Generator().manual_seed(case.record["seed"]), output_type="pt",
             tile_size=None, vae_tile_size=None).images  # fmt: skip
    assert (out - case.reference).abs().max() <= 1e-4
    calls = []
    v3(case.lr(), upscale=4, generator=torch.Generator().manual_seed(1), progress_callback=lambda d, t: calls.append(t))
    assert calls[-1] == 2 + 4  # encode, four denoiser steps, decode


def test_converted_folder_gives_the_same_images(pipe, cases, tmp_path):
    from onestep_sr import convert_to_diffusers

    out = convert_to_diffusers(VQ, UNET, tmp_path / "tadsr")
    loaded = load_converted(out)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, OneStepSRResShiftPipeline) and loaded.sr_method.id == "tadsr"
    codebook = loaded.vae.quantize.embedding.weight
    for case in cases[:2]:  # the same parity criterion as the loaded pipeline
        ours = code_indices(loaded.denoise(case.t["x_T"], condition(loaded, _lq(case))), codebook)
        assert_output_matches(run(loaded, case), case, ours != case.t["vq_indices"].long())


def test_official_file_names_pick_the_schedule(tmp_path):
    import shutil

    from onestep_sr import detect_method

    for name, method in (("SinSR_v1.pth", "sinsr"), ("resshift_realsrx4_s4_v3.pth", "resshift-v3"),
                         ("resshift_realsrx4_s15_v2.pth", "resshift-v1"), ("mine.pth", "tadsr")):  # fmt: skip
        shutil.copy(UNET, tmp_path / name)
        assert detect_method(tmp_path / name)[0].id == method
    wrapped = tmp_path / "wrapped.pth"  # {'state_dict': ...} with module. prefixes, as DataParallel saves
    sd = torch.load(UNET, weights_only=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, wrapped)
    a = load_pipeline(VQ, wrapped)
    assert torch.equal(a.unet.out[2].weight, sd["out.2.weight"])
    no_buffers = tmp_path / "no_buffers.pth"
    torch.save({k: v for k, v in sd.items() if not k.endswith(("attn_mask", "relative_position_index"))}, no_buffers)
    load_pipeline(VQ, no_buffers)  # buffers are recomputed, not required


def test_wrong_files_are_clear_errors(tmp_path):
    sd = torch.load(UNET, weights_only=True)
    bad = dict(sd)
    bad["input_blocks.1.1.blocks.1.attn_mask"] = torch.zeros_like(bad["input_blocks.1.1.blocks.1.attn_mask"])
    torch.save(bad, tmp_path / "edited.pth")
    with pytest.raises(CheckpointError, match="stored Swin buffer .* does not match"):
        load_pipeline(VQ, tmp_path / "edited.pth")
    with pytest.raises(CheckpointError, match="not a VQGAN autoencoder"):
        load_pipeline(UNET, UNET)  # the UNet given as the autoencoder
    sd21 = TADSR_PARITY.parent / "osediff" / "tiny-sd21"
    with pytest.raises(CheckpointError):
        load_pipeline(sd21, UNET)
    with pytest.raises(ValueError, match="upscales by exactly 4x"):
        load_pipeline(VQ, UNET)(torch.rand(3, 16, 16), upscale=2)
    with pytest.raises(ValueError, match="takes no prompt"):
        load_pipeline(VQ, UNET)(torch.rand(3, 16, 16), prompt="a cat")


# ------------------------------------------------------------------ the tests above must catch mistakes


def _mean_change(out, case) -> float:
    return (out - case.reference).abs().mean().item()


def test_each_sensitivity_row_breaks_parity(pipe, cases, monkeypatch):
    import torch.nn.functional as F

    case = padded(cases)  # so the padding row applies too
    assert _mean_change(run(pipe, case), case) < 1e-5
    cls = OneStepSRResShiftPipeline
    real_denoise, real_model_input = cls.denoise, cls.model_input
    rows = {}

    def no_normalisation(self, latents, cond, plan=None, on_tile=None, generator=None):
        return self._predict_x0(
            latents.float(), 14, cond.image, plan or TilingPlan.untiled(tuple(latents.shape[-2:])), on_tile
        )

    def t13(self, latents, cond, plan=None, on_tile=None, generator=None):
        return self._predict_x0(
            latents.float() / 2.2181973, 13, cond.image, TilingPlan.untiled(tuple(latents.shape[-2:])), on_tile
        )

    def zero_lq(self, latents, cond, plan=None, on_tile=None, generator=None):
        return real_denoise(
            self, latents, type(cond)(None, image=torch.zeros_like(cond.image)), plan, on_tile, generator
        )

    def bilinear(self, lq, lq_up):
        return F.interpolate(self._padded_lr(lq), scale_factor=4, mode="bilinear"), real_model_input(self, lq, lq_up)[1]

    def replicate(self, lq, lq_up):
        y = lq.rgb * 2 - 1
        h, w = y.shape[-2:]
        padded = F.pad(y, (0, (-w) % 64, 0, (-h) % 64), mode="replicate")
        return F.interpolate(padded, scale_factor=4, mode="bicubic"), (4 * h, 4 * w)

    for name, attr, fake in (("no normalisation", "denoise", no_normalisation), ("t=13", "denoise", t13),
                             ("zero LQ", "denoise", zero_lq), ("bilinear", "model_input", bilinear),
                             ("replicate padding", "model_input", replicate)):  # fmt: skip
        with monkeypatch.context() as m:
            m.setattr(cls, attr, fake)
            rows[name] = _mean_change(run(pipe, case), case)
    with monkeypatch.context() as m:  # no quantisation in decode
        from onestep_sr.pipelines import pipeline_onestep_sr_resshift as module

        m.setattr(module, "nearest_codes", lambda z, codebook: z)
        rows["no quantisation"] = _mean_change(run(pipe, case), case)
    assert all(v > 0.01 for v in rows.values()), rows


def test_cli_runs_the_family_with_the_seed(pipe, cases, tmp_path):
    import numpy as np

    from onestep_sr.cli import main

    case = padded(cases)
    case.lr().save(tmp_path / "lr.png")
    args = ["upscale", str(tmp_path / "lr.png"), "-o", str(tmp_path / "out"), "--base", str(VQ), "--weights", str(UNET),
            "--dtype", "fp32", "--seed", str(case.record["seed"])]  # fmt: skip
    assert main(args) == 0
    written = np.asarray(Image.open(tmp_path / "out" / "lr.png"), dtype=np.float32) / 255
    official = np.asarray(Image.open(case.dir / "official_out.png"), dtype=np.float32) / 255
    assert written.shape == official.shape and np.abs(written - official).max() <= 1 / 255 + 1e-6  # <= 1 level


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precisions_run_close_to_fp32(pipe, cases, dtype):
    """The official script runs fp16; random tiny weights and VQ code flips make half precision drift (measured mean
    0.033 for bf16, 0.008 for fp16 on s2), so this bounds the drift loosely and checks the run is finite."""
    half = load_pipeline(VQ, UNET, dtype=dtype)
    half.set_progress_bar_config(disable=True)
    case = padded(cases)
    out = run(half, case)
    assert torch.isfinite(out).all() and (out - run(pipe, case)).abs().mean() < 0.1


def test_memory_format_follows_the_precision(pipe):
    """fp32 keeps the official summation order (the parity above); bf16/fp16 run channels-last, weights and maps
    (README: which precision is parity-exact)."""
    conv = pipe.vae.encoder.conv_in.weight
    assert not pipe.channels_last and conv.is_contiguous()
    half = load_pipeline(VQ, UNET, dtype="bf16")
    assert half.channels_last and half.maps_channels_last
    for module in (half.vae, half.unet):
        weights = [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
        assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
