"""The generic objective (one-step generator, MSE + perceptual) and the loop it runs in: overfitting, exact
resume, two processes == one, validation, Ctrl-C, export into every family's own format."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from onestep_sr import load_converted, load_pipeline
from onestep_sr.training.config import TrainConfig
from onestep_sr.training.loop import Trainer, lr_factor, train

from helpers import accelerate_launch
from training_helpers import (
    OSEDIFF_WEIGHTS,
    TADSR_WEIGHTS,
    TINY_SD3,
    TINY_SD21,
    TINY_VQ,
    TSDSR_EMBEDDINGS,
    TSDSR_WEIGHTS,
)

REPO = Path(__file__).resolve().parents[2]


def osediff_config(tmp_path, train_images, backbones, **overrides) -> TrainConfig:
    values = dict(
        base=str(TINY_SD21),
        weights=str(OSEDIFF_WEIGHTS),
        train_data=str(train_images),
        crop_size=64,
        perceptual_weights=str(backbones),
        output_dir=str(tmp_path / "run"),
        learning_rate=1e-3,
        log_every=1,
        checkpoint_every=0,
        export=False,
    )
    values.update(overrides)
    return TrainConfig.from_dict(values)


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    latest = sorted((output_dir / "checkpoints").glob("step-*"))[-1]
    return load_file(latest / "trainable.safetensors")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_overfits_one_batch(tmp_path, train_images, backbones):
    """40 steps on one fixed batch at least halve MSE + 2 LPIPS, and each term (measured 2.3-2.4x here: the tiny
    random model trains only its LoRA and conv_in), so the gradient of the whole one-step forward reaches the
    trained weights and points downhill."""
    trainer = Trainer(osediff_config(tmp_path, train_images, backbones, max_grad_norm=0.0))
    batch = trainer._prepare(next(trainer._loader(0)))
    logs = [trainer.train_step([batch]) for _ in range(40)]
    for term in ("loss", "mse", "lpips-vgg"):
        assert logs[0][term] / logs[-1][term] >= 2, f"{term}: {logs[0][term]:.4f} -> {logs[-1][term]:.4f}"
    assert "generator/unet.conv_in.base_layer.weight" in trainer.trainable


def test_resume_is_exact(tmp_path, train_images, backbones):
    """6 steps == 3 steps + checkpoint + resume + 3 steps, with warm-up + cosine LR, EMA, accumulation, clipping
    and on-the-fly degradation (every draw depends on the sample position, the rest is in the checkpoint)."""
    common = dict(
        ema_decay=0.9,
        lr_schedule="cosine",
        lr_warmup_steps=2,
        gradient_accumulation_steps=2,
        max_grad_norm=0.5,
        checkpoint_every=0,
        max_steps=6,
    )
    straight = train(osediff_config(tmp_path / "a", train_images, backbones, **common))
    first = Trainer(osediff_config(tmp_path / "b", train_images, backbones, **common)).run(stop_at=3)
    assert first.interrupted and first.step == 3 and first.last_checkpoint.name == "step-00000003"
    start = final_weights(first.output_dir)
    resumed = train(osediff_config(tmp_path / "b", train_images, backbones, resume="latest", **common))
    assert resumed.step == 6
    a, b = final_weights(straight.output_dir), final_weights(resumed.output_dir)
    assert max_diff(a, b) <= 1e-6
    ema_a = load_file(straight.last_checkpoint / "ema.safetensors")
    ema_b = load_file(resumed.last_checkpoint / "ema.safetensors")
    assert max_diff(ema_a, ema_b) <= 1e-6
    # and the run really moved after the resume: a resume that restarted from scratch or stood still would differ
    assert max_diff(a, start) > 1e-4
    state = json.loads((resumed.last_checkpoint / "state.json").read_text())
    assert state["schedulers"]["generator"]["last_epoch"] == 6


def test_lr_schedules():
    c = TrainConfig.__new__(TrainConfig)
    for name, value in (("lr_warmup_steps", 10), ("max_steps", 110), ("lr_cycles", 2)):
        setattr(c, name, value)
    c.lr_schedule = "linear"
    assert [lr_factor(c, s) for s in (0, 5, 10, 60, 110)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    c.lr_schedule = "cosine"
    assert lr_factor(c, 60) == pytest.approx(0.5) and lr_factor(c, 110) == pytest.approx(0.0)
    c.lr_schedule = "cosine_with_restarts"
    assert lr_factor(c, 35) == pytest.approx(0.5) and lr_factor(c, 61) == pytest.approx(1.0, abs=1e-3)


def test_checkpoints_are_safetensors_and_json_and_pruned(tmp_path, train_images, backbones):
    result = train(
        osediff_config(
            tmp_path, train_images, backbones, max_steps=4, checkpoint_every=1, keep_checkpoints=2, perceptual="none"
        )
    )
    kept = sorted(p.name for p in (result.output_dir / "checkpoints").iterdir())
    assert kept == ["step-00000003", "step-00000004"]
    suffixes = {p.suffix for p in result.last_checkpoint.iterdir()}
    assert suffixes == {".json", ".safetensors"}
    lines = [json.loads(x) for x in (result.output_dir / "logs" / "train.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == [1, 2, 3, 4]


def run_cli(args: list[str], launcher: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [*launcher, "-m", "onestep_sr", "train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_config(path: Path, config: dict) -> Path:
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in config.items()))
    return path


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, train_images, backbones):
    """`accelerate launch --multi_gpu --num_processes 2` (two CPU processes on gloo) with batch 1 each trains
    like one process with the same global batch of 2:
    - as 1 process x batch 1 x 2 accumulation steps: the same per-sample arithmetic, gradients (g1 + g2) / 2 either
      way (scaling by 1/2 is exact in float), so the weights agree to 1e-7;
    - as 1 process x batch 2: the first step's loss (same weights, only the batching differs) agrees to 1e-6
      relative, later ones to 1e-3: batched convolutions sum in another order, and Adam turns that float noise in
      near-zero gradients into +-lr steps (measured 7e-5 relative by step 3), so weights are not compared there."""
    base = dict(
        base=str(TINY_SD21),
        weights=str(OSEDIFF_WEIGHTS),
        train_data=str(train_images),
        crop_size=64,
        perceptual_weights=str(backbones),
        learning_rate=1e-3,
        max_steps=3,
        export=False,
        device="cpu",
        log_every=1,
    )
    cfg = write_config(tmp_path / "c.yaml", base)
    launch = accelerate_launch(2)
    runs = {
        "two": ([f"output_dir={tmp_path / 'two'}", "batch_size=1"], launch),
        "accumulated": (
            [f"output_dir={tmp_path / 'accumulated'}", "batch_size=1", "gradient_accumulation_steps=2"],
            [sys.executable],
        ),
        "batched": ([f"output_dir={tmp_path / 'batched'}", "batch_size=2"], [sys.executable]),
    }
    for name, (args, launcher) in runs.items():
        done = run_cli([str(cfg), *args], launcher, tmp_path)
        assert done.returncode == 0, f"{name}: {done.stderr[-3000:]}"
    assert (tmp_path / "two" / "checkpoints" / "step-00000003" / "rng-1.json").is_file(), "not two processes"
    two, accumulated = final_weights(tmp_path / "two"), final_weights(tmp_path / "accumulated")
    assert max_diff(two, accumulated) <= 1e-7
    assert max_diff(two, final_weights(tmp_path / "batched")) > 0  # (a different run, not a copy)

    def losses(name):
        lines = (tmp_path / name / "logs" / "train.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines]

    assert losses("two")[0] == pytest.approx(losses("batched")[0], rel=1e-6)
    assert losses("two") == pytest.approx(losses("batched"), rel=1e-3)
    assert losses("two") == pytest.approx(losses("accumulated"), rel=1e-7)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_continues(tmp_path, train_images, backbones):
    cfg = write_config(
        tmp_path / "c.yaml",
        dict(
            base=str(TINY_SD21),
            weights=str(OSEDIFF_WEIGHTS),
            train_data=str(train_images),
            crop_size=64,
            perceptual="none",
            max_steps=100000,
            export=False,
            output_dir=str(tmp_path / "run"),
            log_every=1,
        ),
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "onestep_sr", "train", str(cfg)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log = tmp_path / "run" / "logs" / "train.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:]
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and "resume with: resume=latest" in out
    step = json.loads((checkpoints[0] / "state.json").read_text())["step"]
    assert step >= 2
    done = run_cli([str(cfg), f"max_steps={step + 1}", "resume=latest"], [sys.executable], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from {checkpoints[0]} at step {step}" in done.stdout


def test_validation_metrics_and_samples(tmp_path, train_images, backbones, val_folder):
    result = train(
        osediff_config(
            tmp_path,
            train_images,
            backbones,
            max_steps=1,
            val_data=str(val_folder),
            val_samples=1,
            perceptual="lpips-vgg",
        )
    )
    lines = [json.loads(x) for x in (result.output_dir / "logs" / "train.jsonl").read_text().splitlines()]
    val = [x for x in lines if x["kind"] == "validation"]
    assert len(val) == 1 and {"psnr_y", "ssim_y", "lpips-vgg"} <= val[0].keys()
    assert 0 < val[0]["psnr_y"] < 100 and -1 <= val[0]["ssim_y"] <= 1
    samples = list((result.output_dir / "validation" / "step-00000001").glob("*.png"))
    assert len(samples) == 1 and Image.open(samples[0]).size == (64, 64)


def test_missing_perceptual_weights_is_a_clear_error(tmp_path, train_images, monkeypatch):
    """Reported before the model is loaded (the load would take minutes at full size)."""
    import onestep_sr.pipelines.methods as methods

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the missing backbone was reported")

    monkeypatch.setattr(methods, "load_pipeline", no_load)
    config = TrainConfig.from_dict(
        dict(base=str(TINY_SD21), weights=str(OSEDIFF_WEIGHTS), train_data=str(train_images), crop_size=64,
             output_dir=str(tmp_path))
    )  # fmt: skip
    with pytest.raises(FileNotFoundError, match=r"vgg16-397923af\.pth .*perceptual_weights"):
        Trainer(config)


FAMILIES = {
    "osediff": dict(base=TINY_SD21, weights=OSEDIFF_WEIGHTS),
    "tsdsr": dict(base=TINY_SD3, weights=TSDSR_WEIGHTS, embeddings=TSDSR_EMBEDDINGS),
    "tadsr": dict(base=TINY_VQ, weights=TADSR_WEIGHTS),
}


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_loads_and_reproduces_the_trained_model(tmp_path, train_images, backbones, family, precision):
    """What the trainer writes (the method's own format, and a diffusers folder) loads through load_pipeline /
    load_converted: both give identical images (1e-6), differ from the start, and equal the trained pipeline's own
    output: in fp32 within the LoRA fusion's float error (1e-4; the ResShift family trains full weights: 1e-6);
    after bf16 training (frozen weights stored in bf16, trained ones fp32) the live bf16 forward is within bf16's
    error of the fp32 export (max 0.1, mean 0.05; the ResShift family's VQ codes flip, so only its mean)."""
    paths = {k: str(v) for k, v in FAMILIES[family].items()}
    config = TrainConfig.from_dict(
        dict(
            paths,
            train_data=str(train_images),
            crop_size=64,
            perceptual="dists",
            perceptual_weights=str(backbones),
            output_dir=str(tmp_path / "run"),
            max_steps=2,
            learning_rate=1e-3,
            export=True,
            mixed_precision=precision,
            gradient_checkpointing=True,
        )
    )
    trainer = Trainer(config)
    result = trainer.run()
    assert {p.dtype for p in trainer.trainable.values()} == {torch.float32}
    frozen = {p.dtype for m in (trainer.pipe.vae,) for p in m.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16 if precision == "bf16" else torch.float32}
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    kwargs = dict(upscale=4, output_type="pt", tile_size=None, vae_tile_size=None, color_fix="none")
    if family == "tadsr":
        kwargs["noise"] = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    else:
        x = torch.nn.functional.interpolate(x, scale_factor=4, mode="bicubic").clamp(0, 1)
        kwargs["upscale"] = 1
    with torch.no_grad(), trainer.autocast():
        live = trainer.pipe(x, **kwargs).images
    options = {"embeddings": paths["embeddings"]} if "embeddings" in paths else {}
    own = load_pipeline(paths["base"], result.exported["weights"])
    converted = load_converted(result.exported["diffusers"])
    start = load_pipeline(paths["base"], paths["weights"], **options)
    for p in (own, converted, start):
        p.set_progress_bar_config(disable=True)
    a, b, s = own(x, **kwargs).images, converted(x, **kwargs).images, start(x, **kwargs).images
    assert (a - b).abs().max() <= 1e-6
    if precision == "bf16":  # (VQ codes flip in bf16: the ResShift family is bounded on the mean, as its tests do)
        assert (a - live).abs().mean() <= 0.05 and (family == "tadsr" or (a - live).abs().max() <= 0.1)
    else:
        assert (a - live).abs().max() <= (1e-6 if family == "tadsr" else 1e-4)
    assert (a - s).abs().max() > 1e-3, "the export holds the starting weights"


def test_phases_run_in_order_with_their_own_optimizers(tmp_path, train_images, backbones):
    """An objective with two phases (as the GAN objectives have: generator, then discriminator): each step runs
    them in the objective's order, each with its own optimizer, LR and gradients."""
    from onestep_sr.training.objectives import Phase, RegressionObjective

    calls = []

    class TwoPhases(RegressionObjective):
        name = "two-phases-test"

        def __init__(self, pipe, config, perceptual=None):
            super().__init__(pipe, config, perceptual)
            self.critic = torch.nn.Parameter(torch.zeros(3))

        @property
        def phases(self):
            return [Phase("generator", self.trainable, 1e-3), Phase("critic", {"w": self.critic}, 0.5)]

        def losses(self, phase, batch):
            calls.append(phase)
            if phase == "critic":
                return {"loss": ((self.critic - 1) ** 2).sum()}
            return super().losses(phase, batch)

    trainer = Trainer(osediff_config(tmp_path, train_images, backbones, perceptual="none"))
    objective = TwoPhases(trainer.pipe, trainer.config)
    trainer.objective, trainer.phases = objective, objective.phases
    trainer.trainable = {f"{ph.name}/{k}": p for ph in trainer.phases for k, p in ph.parameters.items()}
    trainer._build_optimizers()
    before = {k: p.detach().clone() for k, p in objective.trainable.items()}
    batch = trainer._prepare(next(trainer._loader(0)))
    logged = trainer.train_step([batch, batch])
    assert calls == ["generator", "generator", "critic", "critic"]
    # AdamW's first step moves each weight by lr (times sign) minus the decay: 0.5 for the critic
    assert torch.allclose(objective.critic.detach(), torch.full((3,), 0.5), atol=1e-6)
    assert any(not torch.equal(before[k], p) for k, p in objective.trainable.items())
    assert {"generator/lr", "critic/lr", "critic/loss", "generator/mse"} <= logged.keys()
    assert trainer.optimizers["critic"].param_groups[0]["params"] == [objective.critic]


def test_fp16_loss_scaling_step(tmp_path, train_images, backbones):
    """fp16 autocast with loss scaling: the step unscales before clipping, so the clipped update equals fp32's
    closely; a finite loss, and the weights move."""
    trainer = Trainer(osediff_config(tmp_path, train_images, backbones, mixed_precision="fp16", perceptual="none"))
    assert trainer.scaler is not None
    before = {k: p.detach().clone() for k, p in trainer.trainable.items()}
    batch = trainer._prepare(next(trainer._loader(0)))
    logged = trainer.train_step([batch])
    assert torch.isfinite(torch.tensor(logged["loss"]))
    assert 0 < logged["generator/grad_norm"] < 1e4  # unscaled before clipping (a scaled norm would be ~65536x)
    assert max((before[k] - p).abs().max().item() for k, p in trainer.trainable.items()) > 0


def test_workers_give_the_same_batches(tmp_path, train_images, backbones):
    a = Trainer(osediff_config(tmp_path / "a", train_images, backbones, perceptual="none", batch_size=2))
    b = Trainer(osediff_config(tmp_path / "b", train_images, backbones, perceptual="none", batch_size=2, num_workers=2))
    for x, y in zip([next(a._loader(5)) for _ in range(1)], [next(b._loader(5)) for _ in range(1)]):
        assert torch.equal(x["hq"], y["hq"]) and x["degradation"] == y["degradation"] and x["seed"] == y["seed"]


@pytest.mark.parametrize("family", ["osediff", "tadsr"])
def test_paired_lr_data(tmp_path, train_images, family):
    """Paired LR images (HQ / 4): the SD methods see them upsampled to the HQ size (torch bicubic), the ResShift
    family takes them as they are; a wrongly sized LQ folder is a clear error."""
    lq_dir = tmp_path / "lq"
    lq_dir.mkdir()
    for p in train_images.iterdir():
        Image.open(p).resize((22, 18), Image.BICUBIC).save(lq_dir / p.name)
    paths = {k: str(v) for k, v in FAMILIES[family].items()}
    config = TrainConfig.from_dict(
        dict(
            paths,
            train_data=str(train_images),
            train_lq_data=str(lq_dir),
            crop_size=64,
            degradation="none",
            perceptual="none",
            output_dir=str(tmp_path / "run"),
        )
    )
    trainer = Trainer(config)
    batch = trainer._prepare(next(trainer._loader(0)))
    assert batch["lq"].shape[-2:] == (16, 16) and batch["hq"].shape[-2:] == (64, 64)
    losses = trainer.objective.losses("generator", batch)
    assert torch.isfinite(losses["loss"])
    if family == "tadsr":
        batch["lq"] = torch.nn.functional.interpolate(batch["lq"], size=(32, 32))
        with pytest.raises(ValueError, match=r"LR images at 1/4 of the HQ size"):
            trainer.objective.losses("generator", batch)
