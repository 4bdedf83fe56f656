"""D3SR / DFOSD: no official code exists, so the objective is checked against the paper's equations recomputed
independently (float64, by hand), the perceptual term against train-common's EA-DISTS reference, the routing of
every gradient, and a tiny end-to-end run (tiny SD2.1 generator; NAD on the tiny SD2.1 and on a tiny SDXL-shaped
UNet) whose saved file loads through `load_pipeline` and the ComfyUI loader and reproduces the trained generator."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from onestep_sr import load_converted, load_pipeline
from onestep_sr.pipelines.methods import d3sr
from onestep_sr.training.config import ConfigError, TrainConfig
from onestep_sr.training.loop import Trainer

from helpers import parity_dir, write_tiny_d3sr
from training_helpers import TINY_SD21, TRAIN_TEST_DEVICE


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> Path:
    """An SDXL-shaped UNet (DownBlock2D then cross-attention blocks, the text/time added embedding, linear
    projections), tiny and seeded, as a diffusers folder with unet/."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(7)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=48,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16,
    )
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    unet.save_pretrained(folder / "unet")
    return folder


def config(tmp: Path, images: Path, **changes) -> TrainConfig:
    extra = changes.pop("extra", {})
    values = dict(
        objective="d3sr",
        base=str(TINY_SD21),
        train_data=str(images),
        crop_size=64,
        perceptual="none",
        max_steps=2,
        learning_rate=1e-3,
        device=TRAIN_TEST_DEVICE,
        output_dir=str(tmp / "out"),
        export=False,
        extra=extra,
    )
    return TrainConfig.from_dict({**values, **changes})


def batch(trainer: Trainer, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    hq = F.interpolate(torch.rand(2, 3, 8, 8, generator=g), size=(64, 64), mode="bicubic").clamp(0, 1)
    lq = F.interpolate(F.interpolate(hq, size=(16, 16), mode="area"), size=(64, 64), mode="bicubic").clamp(0, 1)
    return {"hq": hq.to(trainer.device), "lq": lq.to(trainer.device), "seed": [seed, seed + 1]}


def alphas_cumprod64() -> np.ndarray:
    """SD2.1's scaled_linear schedule, recomputed in float64 from its definition (betas 0.00085 ... 0.012)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1 - betas)


def test_forward_diffusion_is_the_float64_formula(tmp_path, train_images):
    trainer = Trainer(config(tmp_path, train_images))
    o = trainer.objective
    g = torch.Generator().manual_seed(1)
    z, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    got = o.diffuse(z.to(trainer.device), t.to(trainer.device), eps.to(trainer.device)).cpu().double()
    abar = torch.from_numpy(alphas_cumprod64()[t.numpy()]).view(-1, 1, 1, 1)
    want = abar.sqrt() * z.double() + (1 - abar).sqrt() * eps.double()
    assert float((got - want).abs().max()) <= 2e-6


def test_generator_x0_is_the_closed_form_at_T_L(tmp_path):
    """`one_step` (what training differentiates and inference runs) against z^_H = (z_L - sqrt(1 - abar) eps) /
    sqrt(abar) at the checkpoint's T_L, recomputed in float64 from the UNet's own eps."""
    path = write_tiny_d3sr(tmp_path / "d3sr.safetensors")
    pipe = load_pipeline(TINY_SD21, path, dtype="fp32", fuse_lora=False)
    assert pipe.config.timestep == 500 and pipe.text_encoder is None
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    cond = pipe.fixed_conditioning(pipe.device, torch.float32)
    with torch.no_grad():
        step = pipe.one_step(image, cond)
        z_l = pipe.encode(image, "mode", None)
        eps = pipe.unet(z_l, 500, encoder_hidden_states=cond.embeds).sample
    abar = alphas_cumprod64()[500]
    want = (z_l.double() - math.sqrt(1 - abar) * eps.double()) / math.sqrt(abar)
    assert torch.equal(step.lq_latent, z_l)
    assert float((step.clean_latent.double() - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_gan_losses_by_hand(tmp_path, train_images):
    """L_G = -E log sigmoid(D(fake)), L_D = -E log(1 - sigmoid(D(fake))) - E log sigmoid(D(real)), and the hinge
    option, on logits of the tiny NAD, against float64 arithmetic with math.log / math.exp."""
    trainer = Trainer(config(tmp_path, train_images))
    o = trainer.objective
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 8, 8, generator=g).to(trainer.device)
    context = o.pipe.fixed_conditioning(trainer.device, torch.float32).embeds.expand(2, -1, -1)
    with torch.no_grad():
        real = o.discriminator(latents, torch.tensor([10, 900], device=trainer.device), context) * 50
        fake = o.discriminator(latents.flip(0), torch.tensor([10, 900], device=trainer.device), context) * 50
    assert real.shape == (2, 1, 4, 4)  # one logit per patch (the tiny UNet has one downsampler)

    def mean(values):
        return sum(values) / len(values)

    r, f = real.flatten().double().tolist(), fake.flatten().double().tolist()

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    want_g = mean([-math.log(sigmoid(x)) for x in f])
    want_d = mean([-math.log(1 - sigmoid(x)) for x in f]) + mean([-math.log(sigmoid(x)) for x in r])
    assert abs(float(o.generator_gan(fake)) - want_g) <= 1e-5 * max(1, abs(want_g))
    assert abs(float(o.discriminator_gan(real, fake)) - want_d) <= 1e-5 * max(1, abs(want_d))
    hinge = Trainer(config(tmp_path / "h", train_images, extra={"gan_loss": "hinge"})).objective
    assert abs(float(hinge.generator_gan(fake)) + mean(f)) <= 1e-5
    want_hinge = mean([max(0.0, 1 + x) for x in f]) + mean([max(0.0, 1 - x) for x in r])
    assert abs(float(hinge.discriminator_gan(real, fake)) - want_hinge) <= 1e-5 * max(1, want_hinge)


def test_the_perceptual_term_is_train_commons_ea_dists(tmp_path, train_images, backbones):
    """With `perceptual: ea-dists` the objective's term, on train-common's reference pairs given as the generator's
    [-1, 1] images, is the reference EA-DISTS (2e-6, its tolerance there)."""
    from onestep_sr.training.objectives.regression import perceptual_value

    trainer = Trainer(config(tmp_path, train_images, perceptual="ea-dists", perceptual_weights=str(backbones)))
    root = parity_dir("train-common") / "perceptual"
    pairs = sorted(root.glob("*.safetensors"))
    assert pairs
    for path in pairs:
        t = load_file(path)
        x, y = (t[k].to(trainer.device) * 2 - 1 for k in ("x", "y"))
        with torch.no_grad():
            value = perceptual_value(trainer.objective.perceptual, x, y).cpu()
        assert float((value - t["eadists"]).abs().max()) <= 2e-6, path.name


def test_which_parameters_each_loss_trains(tmp_path, train_images):
    """The generator's LoRA and prompt embedding get gradients from L (and keep them through the discriminator
    phase, whose loss sees the generated latent detached); the discriminator's LoRA and head step with exactly
    L_D's gradients (recomputed with torch.autograd.grad from the same inputs and draws); the VAE, the UNet's base
    weights and the discriminator's copied base get none."""
    trainer = Trainer(config(tmp_path, train_images))
    o = trainer.objective
    generator, disc = trainer.phases[0].parameters, trainer.phases[1].parameters
    assert "prompt_embedding.embeds" in generator and any(".lora_B.d3sr." in k for k in generator)
    assert any(k.startswith("discriminator.head.") for k in disc) and any(".lora_A.nad." in k for k in disc)
    seen, recomputed = {}, {}
    real_apply = trainer.apply_gradients
    b = batch(trainer)

    def apply(phase):
        everything = {**generator, **disc}
        seen[phase.name] = {k: None if p.grad is None else p.grad.detach().clone() for k, p in everything.items()}
        if phase.name == "discriminator":  # before its step: L_D alone, from the traced inputs and the same draws
            z_fake, z_real, t, context = (o.trace[k] for k in ("z_fake", "z_real", "discriminator_t", "context"))
            o.draws.start(b["seed"])
            noise = o.draws.normal("discriminator_noise", z_fake)
            real = o.discriminator(o.diffuse(z_real, t, noise), t, context)
            fake = o.discriminator(o.diffuse(z_fake, t, noise), t, context)
            grads = torch.autograd.grad(o.discriminator_gan(real, fake), list(disc.values()))
            recomputed.update(zip(disc, grads))
        return real_apply(phase)

    trainer.apply_gradients = apply
    o.trace = {}
    trainer.train_step([b])
    after_g, after_d = seen["generator"], seen["discriminator"]
    assert after_g["prompt_embedding.embeds"].abs().sum() > 0
    assert all(after_g[k] is not None for k in generator)
    assert sum(float(after_g[k].abs().sum()) for k in generator if ".lora_B." in k) > 0
    for k in generator:  # untouched by the discriminator phase
        assert torch.equal(after_d[k], after_g[k]), k
    for k in disc:
        assert after_d[k] is not None
        tol = 1e-5 * float(recomputed[k].abs().max()) + 1e-9
        assert float((after_d[k] - recomputed[k]).abs().max()) <= tol, k
    assert sum(float(g.abs().sum()) for g in recomputed.values()) > 0
    frozen = [p for m in (trainer.pipe.vae, trainer.pipe.unet) for n, p in m.named_parameters() if "lora_" not in n]
    frozen += [p for n, p in o.discriminator.encoder.named_parameters() if ".nad." not in n]
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)


def train_images_of(tmp: Path) -> Path:
    folder = tmp / "hq"
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(5)
    for i in range(2):
        x = F.interpolate(torch.rand(1, 3, 6, 6, generator=g), size=(64, 64), mode="bicubic").clamp(0, 1)
        Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("discriminator", ["sd21", "sdxl"])
def test_end_to_end_training_saves_a_model_that_loads_everywhere(tmp_path, tiny_sdxl, discriminator):
    """A few steps from the base alone lower the generator's reconstruction MSE on a fixed batch; the exported
    d3sr.safetensors (T_L and the LoRA settings in its header) loads through load_pipeline (LoRA kept: identical
    images; fused: within 1e-5) and through the ComfyUI loader, and reproduces the trained generator."""
    import comfy_harness
    from helpers import make_comfy_models

    images = train_images_of(tmp_path)
    extra = {"timestep": 321, "discriminator": discriminator}
    if discriminator == "sdxl":
        extra["discriminator_base"] = str(tiny_sdxl)
    c = config(tmp_path, images, max_steps=8, degradation="realesrgan", export=True, extra=extra)
    trainer = Trainer(c)
    if discriminator == "sdxl":
        assert trainer.objective.discriminator.sdxl
    probe = {"hq": batch(trainer, 40)["hq"], "lq": batch(trainer, 40)["lq"], "seed": [40, 41]}

    def reconstruction() -> float:
        with torch.no_grad():
            trainer.objective.text = trainer.pipe.fixed_conditioning(trainer.device, torch.float32)
            _, x_hat = trainer.objective.generate(probe)
            return float(F.mse_loss(x_hat, probe["hq"] * 2 - 1))

    before = reconstruction()
    result = trainer.run()
    after = reconstruction()
    assert after < before * 0.95, (before, after)
    weights = result.exported["weights"]
    assert weights.name == "d3sr.safetensors"
    meta = d3sr.read_metadata(weights)
    assert meta["format"] == "onestep-sr/d3sr" and meta["timestep"] == "321" and meta["lora_rank"] == "16"
    assert json.loads(meta["target_modules"]) == sorted(d3sr.TARGET_MODULES)

    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    kwargs = dict(upscale=1, output_type="pt", tile_size=None, vae_tile_size=None, color_fix="none")
    with torch.no_grad():
        live = trainer.pipe(x, **kwargs).images
    assert "the base alone" in (weights.parent / "README.txt").read_text()
    kept = load_pipeline(TINY_SD21, weights, dtype="fp32", fuse_lora=False)
    fused = load_pipeline(TINY_SD21, weights, dtype="fp32")
    assert kept.config.timestep == 321 and kept.sr_method.id == "d3sr"
    reloaded = kept(x, **kwargs).images
    # (loading prepares for inference: channels-last convolutions reorder fp32 sums, ~7e-6 here)
    assert float((reloaded - live.cpu()).abs().max()) <= 5e-5
    assert float((fused(x, **kwargs).images - live.cpu()).abs().max()) <= 5e-5
    converted = load_converted(result.exported["diffusers"])  # the diffusers folder: the fused model
    assert float((converted(x, **kwargs).images - fused(x, **kwargs).images).abs().max()) <= 1e-6
    start = d3sr.build_untrained(TINY_SD21, timestep=321)
    start.set_progress_bar_config(disable=True)
    assert float((start(x, **kwargs).images - live.cpu()).abs().max()) > 1e-3, "the export holds the start"

    models, inputs = make_comfy_models(tmp_path / "comfy")
    (models / "onestep_sr" / "d3sr.safetensors").write_bytes(weights.read_bytes())
    comfy_harness.install(models, inputs)
    try:
        from onestep_sr.nodes import comfy_env
        from onestep_sr.nodes.values import load_sr_model

        comfy_env.register_model_folder()
        loaded = load_sr_model("stable-diffusion-2-1-base", "d3sr.safetensors", "fp32", "cpu", False)
        assert loaded.pipe.sr_method.id == "d3sr"
        assert torch.equal(loaded.pipe(x, **kwargs).images, reloaded)  # the same file, the same model
    finally:
        comfy_harness.uninstall()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"extra": {"discriminator": "sd3"}}, "extra.discriminator"),
        ({"extra": {"discriminator": "sdxl"}}, "extra.discriminator_base"),
        ({"extra": {"gan_loss": "wasserstein"}}, "extra.gan_loss"),
        ({"extra": {"timestep": 1000}}, "extra.timestep"),
        ({"extra": {"lambda1": 0.1}}, "unknown d3sr setting"),
        ({"prompt": "a cat"}, "learns its prompt embedding"),
    ],
)
def test_config_errors(changes, message, tmp_path, train_images):
    with pytest.raises(ConfigError, match=message):
        Trainer(config(tmp_path, train_images, **changes))


def test_weights_are_optional_only_for_objectives_that_start_from_the_base(tmp_path, train_images):
    values = dict(base=str(TINY_SD21), train_data=str(train_images), output_dir=str(tmp_path))
    TrainConfig.from_dict({**values, "objective": "d3sr"})
    with pytest.raises(ConfigError, match="weights"):
        TrainConfig.from_dict({**values, "objective": "regression"})


def test_a_d3sr_file_is_detected_and_a_corrupt_header_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    from onestep_sr.pipelines.loading.files import CheckpointError

    path = write_tiny_d3sr(tmp_path / "mine.safetensors")
    assert load_pipeline(TINY_SD21, path).sr_method.id == "d3sr"
    tensors = load_file(path)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"format": "onestep-sr/d3sr", "version": "1", "timestep": "x"})
    with pytest.raises(CheckpointError, match="malformed D3SR header"):
        load_pipeline(TINY_SD21, bad)
    wrong_width = tmp_path / "wide.safetensors"
    save_file(
        {**tensors, "prompt_embeds": torch.zeros(1, 77, 1024)}, str(wrong_width), metadata=d3sr.read_metadata(path)
    )
    with pytest.raises(CheckpointError, match="cross-attention"):
        load_pipeline(TINY_SD21, wrong_width)


def test_training_continues_from_a_d3sr_file(tmp_path, train_images):
    """`weights: d3sr.safetensors` continues that generator: its T_L and LoRA, not the settings for a new one."""
    path = write_tiny_d3sr(tmp_path / "d3sr.safetensors")
    trainer = Trainer(config(tmp_path, train_images, weights=str(path), extra={"timestep": 900}))
    assert trainer.pipe.config.timestep == 500
    start = load_file(path)
    lora = {k.replace(".lora_A.d3sr.", ".lora_A.").replace(".lora_B.d3sr.", ".lora_B."): p
            for k, p in trainer.phases[0].parameters.items()}  # fmt: skip
    assert torch.equal(lora["prompt_embedding.embeds"].detach().cpu(), start["prompt_embeds"])
    assert all(torch.equal(lora[k].detach().cpu(), v) for k, v in start.items() if k.startswith("unet."))


def test_the_sdxl_discriminator_base_is_checked(tmp_path):
    from safetensors.torch import save_file

    from onestep_sr.pipelines.loading.files import CheckpointError
    from onestep_sr.training.discriminators.nad import load_discriminator_unet

    not_sdxl = tmp_path / "sd21.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(not_sdxl))
    with pytest.raises(CheckpointError, match="not an SDXL checkpoint"):
        load_discriminator_unet(not_sdxl)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_discriminator_unet(tmp_path)
    with pytest.raises(CheckpointError, match="not an SDXL-style UNet"):
        load_discriminator_unet(TINY_SD21)


def test_the_sdxl_discriminator_reads_an_original_single_file(tmp_path, tiny_sdxl):
    """The SDXL base as one original-layout .safetensors (as `sd_xl_base_1.0.safetensors` ships), read with a
    config folder (the bundled SDXL-base one by default; the tiny one here): the same weights as the folder."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from onestep_sr.training.discriminators.nad import SDXL_CONFIG, load_discriminator_unet

    from ldm_checkpoint import unet_to_ldm

    folder = UNet2DConditionModel.from_pretrained(tiny_sdxl / "unet")
    single = tmp_path / "sd_xl_tiny.safetensors"
    save_file(unet_to_ldm(folder), str(single))
    unet = load_discriminator_unet(single, config=tiny_sdxl)
    want = folder.state_dict()
    assert unet.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in unet.state_dict().items())
    bundled = json.loads((SDXL_CONFIG / "unet" / "config.json").read_text())
    assert bundled["addition_embed_type"] == "text_time" and bundled["cross_attention_dim"] == 2048
    with torch.device("meta"):  # the bundled config builds SDXL-base's UNet: its 2,567,463,684 parameters
        full = UNet2DConditionModel.from_config(bundled)
    assert sum(p.numel() for p in full.parameters()) == 2_567_463_684
