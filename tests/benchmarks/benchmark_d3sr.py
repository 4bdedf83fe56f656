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

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from benchmark_tiling import peak_rss_gib  # (this folder is on sys.path when the script runs)
from benchmark_training import median_step_seconds, row_in_subprocess, scratch_training_files
from benchmark_tsdsr_tsd import reset_peak_rss

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

    from onestep_sr.training.config import TrainConfig
    from onestep_sr.training.loop import Trainer

    torch.set_num_threads(os.cpu_count() or 1)
    precision, checkpointing = ROWS[row]
    tmp = scratch_training_files()
    t0 = time.perf_counter()
    config = TrainConfig.from_dict(
        dict(objective="d3sr", train_data=str(tmp / "hq"), crop_size=256, perceptual="ea-dists", perceptual_weight=1.0,
             perceptual_weights=str(tmp), output_dir=str(tmp / "out"), gradient_checkpointing=checkpointing,
             mixed_precision=precision, device="cpu"),
        check_paths=False,
    )  # fmt: skip
    trainer = Trainer(config, pipe=build_pipeline())
    build_s = time.perf_counter() - t0
    rss_model = peak_rss_gib()
    reset_peak_rss()
    batch = {"hq": torch.rand(1, 3, 256, 256), "lq": torch.rand(1, 3, 256, 256), "seed": [0]}
    seconds = median_step_seconds(trainer, batch, steps)
    count = sum(p.numel() for p in trainer.trainable.values())
    return {
        "row": row,
        "s_per_step": seconds,
        "peak_gib": peak_rss_gib(),
        "model_rss_gib": rss_model,
        "build_s": build_s,
        "trained_params_m": count / 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per row (after one warm-up step)")
    parser.add_argument("--rows", default=";".join(ROWS), help=f"';'-separated, of {list(ROWS)}")
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--_row", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._row:
        print(json.dumps(run_row(args._row[0], int(args._row[1]))))
        return 0
    rows = []
    for row in args.rows.split(";"):
        r = row_in_subprocess(__file__, row, str(args.steps))
        if r is None:
            return 1
        rows.append(r)
        print(f"{row:12s} {r['s_per_step']:7.1f} s/step  peak {r['peak_gib']:5.2f} GiB", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    info = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "rows": rows}
    (args.out / "d3sr.json").write_text(json.dumps(info, indent=1))
    base = rows[0]
    print(f"\n| precision | s / step | peak RSS (GiB) | time vs {base['row']} |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        ratio = r["s_per_step"] / base["s_per_step"]
        print(f"| {r['row']} | {r['s_per_step']:.1f} | {r['peak_gib']:.2f} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
