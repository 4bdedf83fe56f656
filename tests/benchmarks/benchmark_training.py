"""One training step of the generic objective on FULL-SIZE SD2.1-base architectures with random weights.

Not part of the test suite. One command:

    python tests/benchmarks/benchmark_training.py          # table on stdout, JSON in bench_out/training.json

The generator is OSEDiff's (SD2.1-base UNet + VAE, LoRA rank 4 on the official targets, conv_in trained in full),
trained by the `regression` objective (MSE + LPIPS-vgg on a full-size random VGG16) on one 256 px crop, batch 1,
through the real `Trainer.train_step` (forward, backward, clipping, AdamW). Rows: fp32 and bf16 autocast (the
default precision on a CPU with bf16 support), each with gradient checkpointing off and on. Each row runs in its
own subprocess, so its peak resident memory (VmHWM) is its own; seconds per step are the median of `--steps`
steps after one warm-up step. Weights are random: compute and memory are those of the real models.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmark_tiling import peak_rss_gib  # (this folder is on sys.path when the script runs)

ROWS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def build_pipeline():
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from onestep_sr import OneStepSRPipeline
    from onestep_sr.pipelines.demo_models import osediff_lora_targets
    from onestep_sr.pipelines.loading import SD21_BASE_CONFIG
    from onestep_sr.pipelines.loading.lora import LoRAWeights, apply_lora
    from onestep_sr.pipelines.models.prompt_embedding import PromptEmbedding

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD21_BASE_CONFIG / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD21_BASE_CONFIG / "vae"))
    scheduler = DDPMScheduler.from_pretrained(SD21_BASE_CONFIG, subfolder="scheduler")
    unet_targets, vae_targets = osediff_lora_targets(unet, vae)

    def factors(model, names, rank=4):
        modules = dict(model.named_modules())
        out = {}
        for name in dict.fromkeys(names):
            w = modules[name].weight
            a = (rank, *w.shape[1:])
            b = (w.shape[0], rank) if w.ndim == 2 else (w.shape[0], rank, 1, 1)
            out[name] = (torch.randn(a) * 0.01, torch.zeros(b))
        return LoRAWeights(out, 8 / rank)

    apply_lora(
        unet,
        factors(unet, [m for names in unet_targets.values() for m in names]),
        fuse=False,
        adapter_name="osediff",
        source="bench",
    )
    apply_lora(vae, factors(vae, vae_targets), fuse=False, adapter_name="osediff", source="bench")
    embedding = PromptEmbedding(77, unet.config.cross_attention_dim)
    pipe = OneStepSRPipeline(vae=vae, unet=unet, scheduler=scheduler, prompt_embedding=embedding, method="osediff")
    pipe.set_progress_bar_config(disable=True)
    for module in (unet, vae):
        module.eval()
    return pipe


def scratch_training_files() -> Path:
    """A temporary folder with one 256 px HQ image in hq/ and a random full-size VGG16 in torchvision's file."""
    import numpy as np
    import torch
    from PIL import Image

    from onestep_sr.training.losses.backbones import vgg16_features

    tmp = Path(tempfile.mkdtemp())
    (tmp / "hq").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(tmp / "hq" / "x.png")
    vgg = {f"features.{k}": v for k, v in vgg16_features().state_dict().items()}
    torch.save(vgg, tmp / "vgg16-397923af.pth")
    return tmp


def row_in_subprocess(script: str, *args: str) -> dict | None:
    """One row run as `script --_row ARGS` in its own process (so its peak RSS is its own): the JSON its last
    line prints, or None (its error printed) when it failed."""
    cmd = [sys.executable, script, "--_row", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def rows_in_subprocesses(script: str, names, args: list[str], out: Path) -> list[dict] | None:
    """Each row `script --_row NAME *args` in its own process, a progress line each, all of them as JSON in `out`
    (None, the error printed, when one failed)."""
    rows = []
    for name in names:
        r = row_in_subprocess(script, name, *args)
        if r is None:
            return None
        rows.append(r)
        print(f"{name:20s} {r['s_per_step']:7.1f} s/step  peak {r['peak_gib']:5.2f} GiB", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "rows": rows}
    out.write_text(json.dumps(info, indent=1))
    return rows


def compare_layouts(script: str, layouts: tuple[str, ...], args: list[str], out: Path, what: str) -> int:
    """One row per model layout (`script --_row LAYOUT *args`), the last one the official layout: the table of
    seconds per step and peak memory against it, on stdout and as JSON in `out`."""
    rows = rows_in_subprocesses(script, layouts, args, out)
    if rows is None:
        return 1
    official = rows[-1]["peak_gib"]
    print(f"\n| {what} held | s / step | peak {rows[0]['memory']} (GiB) | vs {layouts[-1]} |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['layout']} | {r['s_per_step']:.1f} | {r['peak_gib']:.2f} | {r['peak_gib'] / official:.0%} |")
    return 0


def reset_peak_rss() -> None:
    """Start VmHWM again from the current resident size (Linux: 5 > /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def timed_training_step(values: dict, build_pipeline, batch: dict, steps: int) -> tuple[dict, object]:
    """A Trainer over `build_pipeline()` with the config `values` (plus the scratch data, output and VGG16
    folders), then the median step time and the step's own peak resident memory (measured from the end of the
    build): (row fields, the trainer)."""
    import torch

    from onestep_sr.training.config import TrainConfig
    from onestep_sr.training.loop import Trainer

    torch.set_num_threads(os.cpu_count() or 1)
    tmp = scratch_training_files()
    folders = {"train_data": str(tmp / "hq"), "output_dir": str(tmp / "out"), "perceptual_weights": str(tmp)}
    t0 = time.perf_counter()
    config = TrainConfig.from_dict({**folders, "device": "cpu", **values}, check_paths=False)
    trainer = Trainer(config, pipe=build_pipeline())
    build_s = time.perf_counter() - t0
    rss_model = peak_rss_gib()
    reset_peak_rss()
    seconds = median_step_seconds(trainer, batch, steps)
    fields = {"s_per_step": seconds, "peak_gib": peak_rss_gib(), "model_rss_gib": rss_model, "build_s": build_s}
    return fields, trainer


def median_step_seconds(trainer, batch: dict, steps: int) -> float:
    """The median time of `steps` training steps after one warm-up step."""
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        trainer.train_step([batch])
        if i:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_row(precision: str, checkpointing: bool, steps: int) -> dict:
    import torch

    from onestep_sr.training.config import TrainConfig
    from onestep_sr.training.loop import Trainer

    torch.set_num_threads(os.cpu_count() or 1)
    tmp = scratch_training_files()
    config = TrainConfig.from_dict(
        dict(train_data=str(tmp / "hq"), crop_size=256, perceptual_weights=str(tmp), output_dir=str(tmp / "out"),
             mixed_precision="bf16" if precision == "bf16" else "no", gradient_checkpointing=checkpointing,
             device="cpu"),
        check_paths=False,
    )  # fmt: skip
    t0 = time.perf_counter()
    trainer = Trainer(config, pipe=build_pipeline())
    build_s = time.perf_counter() - t0
    rss_model = peak_rss_gib()
    batch = {"hq": torch.rand(1, 3, 256, 256), "lq": torch.rand(1, 3, 256, 256), "seed": [0]}
    seconds = median_step_seconds(trainer, batch, steps)
    trainable = sum(p.numel() for p in trainer.trainable.values())
    return {
        "precision": precision,
        "checkpointing": checkpointing,
        "s_per_step": seconds,
        "peak_rss_gib": peak_rss_gib(),
        "model_rss_gib": rss_model,
        "build_s": build_s,
        "trainable_params": trainable,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per row (after one warm-up step)")
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--_row", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._row:
        precision, checkpointing, steps = args._row
        print(json.dumps(run_row(precision, checkpointing == "1", int(steps))))
        return 0
    rows = []
    for precision, checkpointing in ROWS:
        r = row_in_subprocess(__file__, precision, str(int(checkpointing)), str(args.steps))
        if r is None:
            return 1
        rows.append(r)
        print(f"{precision:5s} ckpt={'on ' if checkpointing else 'off'}  {r['s_per_step']:7.2f} s/step  "
              f"peak {r['peak_rss_gib']:5.2f} GiB  (model {r['model_rss_gib']:.2f} GiB)", flush=True)  # fmt: skip
    args.out.mkdir(exist_ok=True)
    info = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "rows": rows}
    (args.out / "training.json").write_text(json.dumps(info, indent=1))
    base = rows[0]["s_per_step"]
    print("\n| precision | gradient checkpointing | s / step | vs fp32 | peak RSS (GiB) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['precision']} | {'on' if r['checkpointing'] else 'off'} | {r['s_per_step']:.2f} | "
              f"{base / r['s_per_step']:.2f}x | {r['peak_rss_gib']:.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())


def precision_rows_main(script: str, doc: str, rows: dict, run_row, out_name: str) -> int:
    """The command line of a benchmark whose rows are precisions (`--steps`, `--rows`, `--out`): each row in its
    own subprocess (`script --_row ROW STEPS` -> `run_row(row, steps)`), the table against the first row on stdout,
    JSON in `out/out_name`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per row (after one warm-up step)")
    parser.add_argument("--rows", default=";".join(rows), help=f"';'-separated, of {list(rows)}")
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--_row", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._row:
        print(json.dumps(run_row(args._row[0], int(args._row[1]))))
        return 0
    done = rows_in_subprocesses(script, args.rows.split(";"), [str(args.steps)], args.out / out_name)
    if done is None:
        return 1
    base = done[0]
    print(f"\n| precision | s / step | peak RSS (GiB) | time vs {base['row']} |")
    print("| --- | --- | --- | --- |")
    for r in done:
        ratio = r["s_per_step"] / base["s_per_step"]
        print(f"| {r['row']} | {r['s_per_step']:.1f} | {r['peak_gib']:.2f} | {ratio:.2f}x |")
    return 0
