"""One TSD-SR training step (`objective: tsdsr-tsd`) on FULL-SIZE SD3-medium architectures, random weights.

Not part of the test suite. One command:

    python tests/benchmarks/benchmark_tsdsr_tsd.py         # table on stdout, JSON in bench_out/tsdsr_tsd.json

The step is the real `Trainer.train_step`: the student (SD3-medium transformer LoRA rank 64 on the official targets
+ VAE-encoder LoRA rank 64) with LPIPS-alex + latent MSE + TSD (the teacher's and the fake score's CFG forwards on
the student's and the HR latents), its AdamW step, then the fake score's loss and step; one 256 px crop, batch 1,
the loop's default precision fp32 (`--precision bf16`: autocast with the frozen weights stored in bf16, as the
official run trains in fp16), gradient checkpointing on, the official ranks (64). Peak resident memory is measured
from the end of the build (reset there), so it is the training step's. Rows, each in its own subprocess:
  shared:           ONE frozen SD3 transformer with the student, teacher and fake-score adapters
  two copies:       the same step while a second full transformer is resident, as the official code holds it
                    (`transformer_reg`, carrying the teacher and fake-score LoRA): same compute, the official memory
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

from benchmark_tiling import peak_rss_gib  # (this folder is on sys.path when the script runs)
from benchmark_training import compare_layouts, median_step_seconds, reset_peak_rss, scratch_training_files

STUDENT_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "proj", "linear"]
STUDENT_TARGETS += ["proj_out"]
VAE_TARGETS = r"^encoder\..*(conv1|conv2|conv_in|conv_shortcut|conv|conv_out|to_k|to_q|to_v|to_out\.0)$"


def build_pipeline(tmp: Path, rank: int = 64):
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from peft import LoraConfig
    from safetensors.torch import save_file

    from onestep_sr import OneStepSRSD3Pipeline
    from onestep_sr.pipelines.loading import SD3_MEDIUM_CONFIG
    from onestep_sr.pipelines.models.prompt_embedding import PromptEmbedding

    torch.manual_seed(0)
    config = SD3Transformer2DModel.load_config(SD3_MEDIUM_CONFIG / "transformer")
    transformer = SD3Transformer2DModel.from_config(config)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD3_MEDIUM_CONFIG / "vae"))
    student = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=STUDENT_TARGETS)
    transformer.add_adapter(student, adapter_name="tsdsr")
    vae.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=VAE_TARGETS),
        adapter_name="tsdsr",
    )
    # the teacher LoRA file (official layout) and the null prompt's embeddings
    teacher = {}
    for name, module in transformer.named_modules():
        if "tsdsr" in getattr(module, "lora_A", {}):
            a, b = module.lora_A["tsdsr"].weight, module.lora_B["tsdsr"].weight
            teacher[f"transformer.{name}.lora_A.weight"] = torch.randn(a.shape) * 0.01
            teacher[f"transformer.{name}.lora_B.weight"] = torch.randn(b.shape) * 0.01
    save_file(teacher, tmp / "teacher.safetensors")
    null = {"prompt_embeds": torch.zeros(1, 333, 4096), "pool_embeds": torch.zeros(1, 2048)}
    save_file(null, tmp / "null.safetensors")
    embedding = PromptEmbedding.from_tensors(torch.randn(1, 333, 4096) * 0.1, torch.randn(1, 2048) * 0.1)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = OneStepSRSD3Pipeline(vae=vae, transformer=transformer, scheduler=scheduler, prompt_embedding=embedding,
                                method="tsdsr")  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_row(layout: str, precision: str, steps: int) -> dict:
    import torch

    from onestep_sr.training.config import TrainConfig
    from onestep_sr.training.loop import Trainer

    torch.set_num_threads(os.cpu_count() or 1)
    tmp = scratch_training_files()
    from onestep_sr.training.losses.backbones import alexnet_features

    alex = {f"features.{k}": v for k, v in alexnet_features().state_dict().items()}
    torch.save(alex, tmp / "alexnet-owt-7be5be79.pth")
    t0 = time.perf_counter()
    pipe = build_pipeline(tmp)
    config = TrainConfig.from_dict(
        dict(objective="tsdsr-tsd", train_data=str(tmp / "hq"), crop_size=256, perceptual="lpips-alex",
             perceptual_weight=1.0, perceptual_weights=str(tmp), output_dir=str(tmp / "out"),
             gradient_checkpointing=True, mixed_precision="bf16" if precision == "bf16" else "no", device="cpu",
             extra={"teacher_lora": str(tmp / "teacher.safetensors"),
                    "null_embeddings": str(tmp / "null.safetensors")}),
        check_paths=False,
    )  # fmt: skip
    trainer = Trainer(config, pipe=pipe)
    official_copies = [copy.deepcopy(pipe.transformer)] if layout == "two copies" else []
    build_s = time.perf_counter() - t0
    rss_model = peak_rss_gib()
    reset_peak_rss()  # the training step's peak, not the build's (random init runs in fp32 before the cast)
    batch = {"hq": torch.rand(1, 3, 256, 256), "lq": torch.rand(1, 3, 256, 256), "seed": [0]}
    seconds = median_step_seconds(trainer, batch, steps)
    return {
        "layout": layout,
        "precision": precision,
        "s_per_step": seconds,
        "peak_gib": peak_rss_gib(),
        "memory": "RSS",
        "model_rss_gib": rss_model,
        "build_s": build_s,
        "resident_copies": len(official_copies),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per row (after one warm-up step)")
    parser.add_argument("--precision", default="fp32", choices=("bf16", "fp32"), help="fp32: the loop's default")
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--_row", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._row:
        print(json.dumps(run_row(args._row[0], args._row[1], int(args._row[2]))))
        return 0
    out = args.out / f"tsdsr_tsd_{args.precision}.json"
    return compare_layouts(__file__, ("shared", "two copies"), [args.precision, str(args.steps)], out, "transformers")


if __name__ == "__main__":
    sys.exit(main())
