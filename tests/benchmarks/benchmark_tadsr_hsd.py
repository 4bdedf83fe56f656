"""One TAD-SR training iteration (`objective: tadsr-hsd`) on the FULL-SIZE ResShift-family architecture, random weights.

Not part of the test suite. One command:

    python tests/benchmarks/benchmark_tadsr_hsd.py          # table on stdout, JSON in bench_out/tadsr_hsd.json

The step is the real `Trainer.train_step` with the official recipe's content: the student (ResShift Swin-UNet,
118.6 M parameters, all trained) at t = 14 from the prior sample; the discriminator's update on the frozen
teacher's encoder features of the noised GT and student latents; then the teacher's 15-step DDIM target, HSD's two
teacher forwards, the discriminator's generator term and the student's AdamW step. VQGAN-f4 (55.3 M, frozen)
encodes the 256 px HQ crop and its 64 px LR's x4 bicubic; batch 1. Rows, each in its own subprocess (so its peak
resident memory is its own; measured from the end of the build):
  fp32            the loop's default precision (the official recipe trains in fp32)
  bf16            autocast bf16 for the student and the discriminator, the VQGAN stored in bf16, the teacher's
                  forwards in fp32 (the objective's default), the trained weights fp32
  bf16, teacher bf16   the same with `teacher_precision: autocast` (the teacher stored and run in bf16)
  fp32 + ckpt     fp32 with gradient checkpointing of the student's and the teacher's blocks
"""

from __future__ import annotations

import sys

from benchmark_training import precision_rows_main, timed_training_step  # (this folder is on sys.path)

# row: (mixed_precision, gradient checkpointing, extra.teacher_precision)
ROWS = {
    "fp32": ("no", False, "fp32"),
    "bf16": ("bf16", False, "fp32"),
    "bf16, teacher bf16": ("bf16", False, "autocast"),
    "fp32 + ckpt": ("no", True, "fp32"),
}


def build_pipeline():
    import torch
    from diffusers import VQModel

    from onestep_sr import OneStepSRResShiftPipeline, ResShiftUNet
    from onestep_sr.pipelines.loading.bases import RESSHIFT_VQ_F4_CONFIG

    torch.manual_seed(0)
    pipe = OneStepSRResShiftPipeline(vae=VQModel(**RESSHIFT_VQ_F4_CONFIG), unet=ResShiftUNet(), method="tadsr")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_row(row: str, steps: int) -> dict:
    import torch

    precision, checkpointing, teacher = ROWS[row]
    values = dict(objective="tadsr-hsd", crop_size=256, weight_decay=0.0, max_grad_norm=0.0, ema_decay=0.999,
                  gradient_checkpointing=checkpointing, mixed_precision=precision,
                  extra={"teacher_precision": teacher})  # fmt: skip
    batch = {"hq": torch.rand(1, 3, 256, 256), "lq": torch.rand(1, 3, 64, 64), "seed": [0]}
    fields, trainer = timed_training_step(values, build_pipeline, batch, steps)
    discriminator = trainer.objective.discriminator
    return {
        "row": row,
        **fields,
        "student_params_m": sum(p.numel() for p in trainer.pipe.unet.parameters()) / 1e6,
        "discriminator_params_m": sum(p.numel() for p in discriminator.parameters()) / 1e6,
    }


def main() -> int:
    return precision_rows_main(__file__, __doc__, ROWS, run_row, "tadsr_hsd.json")


if __name__ == "__main__":
    sys.exit(main())
