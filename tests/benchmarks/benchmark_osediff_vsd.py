"""One OSEDiff VSD training step (`objective: osediff-vsd`) on FULL-SIZE SD2.1-base architectures, random weights.

Not part of the test suite. One command:

    python tests/benchmarks/benchmark_osediff_vsd.py        # table on stdout, JSON in bench_out/osediff_vsd.json

The step is the real `Trainer.train_step`: the generator (UNet + VAE-encoder LoRA, conv_in), MSE + LPIPS-vgg + VSD
(the regulariser's and the frozen UNet's CFG scores) and its AdamW step, then the regulariser's diffusion loss and
its step; one 256 px crop, batch 1, the default precision (fp32), gradient checkpointing on, the full-size text
encoder included. Rows, each in its own subprocess (peak resident memory, VmHWM, is its own):
  shared:       ONE frozen UNet shared by the generator, the frozen score and the regulariser (peft adapters)
  three copies: the same step while two more UNet copies and a second text encoder are resident, as the official
                code holds them (unet_fix, unet_update and the regulariser's own text encoder): same compute, the
                official memory
Seconds per step are the median of `--steps` steps after one warm-up step.
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
from benchmark_training import build_pipeline as build_generator
from benchmark_training import compare_layouts, median_step_seconds, scratch_training_files


def build_pipeline():
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from onestep_sr.pipelines.loading import SD21_BASE_CONFIG

    pipe = build_generator()
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(SD21_BASE_CONFIG / "text_encoder")).eval()
    tokenizer = CLIPTokenizer.from_pretrained(SD21_BASE_CONFIG / "tokenizer")
    pipe.register_modules(text_encoder=text_encoder.to(torch.float32), tokenizer=tokenizer, prompt_embedding=None)
    return pipe


def peak_memory_gib(device: str) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else peak_rss_gib()


def run_row(layout: str, steps: int, device: str = "cpu", crop: int = 256, batch_size: int = 1) -> dict:
    import torch
    from safetensors.torch import save_file

    from onestep_sr.training.config import TrainConfig
    from onestep_sr.training.loop import Trainer

    torch.set_num_threads(os.cpu_count() or 1)
    tmp = scratch_training_files()
    pipe = build_pipeline()
    # the base folder the objective reads its frozen conv_in from
    (tmp / "base" / "unet").mkdir(parents=True)
    conv_in = pipe.unet.conv_in.base_layer
    save_file(
        {"conv_in.weight": conv_in.weight.detach().clone(), "conv_in.bias": conv_in.bias.detach().clone()},
        tmp / "base" / "unet" / "diffusion_pytorch_model.safetensors",
    )
    config = TrainConfig.from_dict(
        dict(objective="osediff-vsd", base=str(tmp / "base"), train_data=str(tmp / "hq"), crop_size=256,
             perceptual_weights=str(tmp), output_dir=str(tmp / "out"), gradient_checkpointing=True, device=device,
             mixed_precision="bf16" if device == "cuda" else "no"),
        check_paths=False,
    )  # fmt: skip
    t0 = time.perf_counter()
    trainer = Trainer(config, pipe=pipe)
    official_copies = []
    if layout == "three copies":
        with torch.no_grad():
            for _ in range(2):
                unet = copy.deepcopy(pipe.unet)
                official_copies.append(unet)
            official_copies.append(copy.deepcopy(pipe.text_encoder))
    build_s = time.perf_counter() - t0
    rss_model = peak_rss_gib()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    shape = (batch_size, 3, crop, crop)
    batch = {"hq": torch.rand(shape), "lq": torch.rand(shape), "seed": list(range(batch_size))}
    batch["prompt"] = ["a cat"] * batch_size
    seconds = median_step_seconds(trainer, batch, steps)
    return {
        "layout": layout,
        "s_per_step": seconds,
        "peak_gib": peak_memory_gib(device),
        "memory": "CUDA allocated" if device == "cuda" else "RSS",
        "device": device,
        "crop": crop,
        "batch_size": batch_size,
        "model_rss_gib": rss_model,
        "build_s": build_s,
        "resident_copies": len(official_copies),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per row (after one warm-up step)")
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: bf16 autocast, CUDA peak")
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--_row", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._row:
        layout, steps, device, crop, batch = args._row
        print(json.dumps(run_row(layout, int(steps), device, int(crop), int(batch))))
        return 0
    row_args = [str(args.steps), args.device, str(args.crop), str(args.batch_size)]
    out = args.out / f"osediff_vsd_{args.device}.json"
    return compare_layouts(__file__, ("shared", "three copies"), row_args, out, "UNets")


if __name__ == "__main__":
    sys.exit(main())
