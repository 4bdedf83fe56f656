"""One D3SR training step (`objective: d3sr`) on the FULL-SIZE SD2.1-base architecture, random weights.

Not part of the test suite. One command:

    python tests/benchmarks/benchmark_d3sr.py               # table on stdout, JSON in bench_out/d3sr.json

The step is the real `Trainer.train_step`: the generator (SD2.1-base UNet with the D3SR LoRA, rank 16 on its
targets, plus the learned 77 x 1024 prompt embedding; frozen VAE) at T_L = 500 on one 256 px crop, batch 1, with
MSE + EA-DISTS (full-size VGG16, random weights) + the generator GAN term through the NAD (a copy of the UNet's
down and middle blocks with its own rank-16 LoRA and the MLP head), its AdamW step; then the discriminator's loss on
the real and generated latents and its step. Rows, each in its own subprocess (its peak resident memory is its own,
measured from the end of the build):
  fp32            the loop's default precision
  bf16            autocast bf16, the frozen weights (UNet, VAE, the NAD's copy) stored in bf16
  fp32 + ckpt     fp32 with gradient checkpointing (the UNet, and the NAD's blocks)
"""

from __future__ import annotations

import sys

from benchmark_training import precision_rows_main, timed_training_step  # (this folder is on sys.path)

ROWS = {"fp32": ("no", False), "bf16": ("bf16", False), "fp32 + ckpt": ("no", True)}


def build_pipeline():
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    from onestep_sr import OneStepSRPipeline
    from onestep_sr.pipelines.loading import SD21_BASE_CONFIG
    from onestep_sr.pipelines.methods import d3sr
    from onestep_sr.pipelines.models.prompt_embedding import PromptEmbedding

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD21_BASE_CONFIG / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD21_BASE_CONFIG / "vae"))
    scheduler = DDPMScheduler.from_pretrained(SD21_BASE_CONFIG, subfolder="scheduler")
    lora = LoraConfig(r=16, lora_alpha=16, init_lora_weights=True, target_modules=list(d3sr.TARGET_MODULES))
    unet.add_adapter(lora, adapter_name=d3sr.ADAPTER)
    embedding = PromptEmbedding.from_tensors(torch.randn(1, 77, unet.config.cross_attention_dim) * 0.1)
    pipe = OneStepSRPipeline(vae=vae, unet=unet, scheduler=scheduler, prompt_embedding=embedding,
                             timestep=d3sr.DEFAULT_TIMESTEP, method="d3sr")  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_row(row: str, steps: int) -> dict:
    import torch

    precision, checkpointing = ROWS[row]
    values = dict(objective="d3sr", crop_size=256, perceptual="ea-dists", perceptual_weight=1.0,
                  gradient_checkpointing=checkpointing, mixed_precision=precision)  # fmt: skip
    batch = {"hq": torch.rand(1, 3, 256, 256), "lq": torch.rand(1, 3, 256, 256), "seed": [0]}
    fields, trainer = timed_training_step(values, build_pipeline, batch, steps)
    return {"row": row, **fields, "trained_params_m": sum(p.numel() for p in trainer.trainable.values()) / 1e6}


def main() -> int:
    return precision_rows_main(__file__, __doc__, ROWS, run_row, "d3sr.json")


if __name__ == "__main__":
    sys.exit(main())
