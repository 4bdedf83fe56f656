"""Command line: `python -m onestep_sr upscale ...` and `python -m onestep_sr convert ...`."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
DEFAULT_MODELS_DIR = Path(os.environ.get("ONESTEP_SR_MODELS", "models"))
DEFAULT_BASE = "stable-diffusion-2-1-base"
DEFAULT_WEIGHTS = "osediff.pkl"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m onestep_sr", description="One-step diffusion super-resolution.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("upscale", help="upscale image files or folders to PNGs")
    up.add_argument("inputs", nargs="*", type=Path, help="image files and/or folders of images")
    up.add_argument("-o", "--output", type=Path, default=Path("out"), help="output folder (default: ./out)")
    _add_model_args(up)
    up.add_argument("--upscale", type=int, default=4, help="integer scale factor (default 4)")
    up.add_argument("--color-fix", default=None, choices=("adain", "wavelet", "none"),
                    help="colour correction (default: the method's own: adain for OSEDiff, wavelet for TSD-SR)")
    up.add_argument("--prompt", default="", help="text prompt for the denoiser (default: empty)")
    up.add_argument("--latent-sampling", default="mode", choices=("mode", "sample"),
                    help="'mode' is deterministic; 'sample' draws from the VAE posterior like the official code")
    up.add_argument("--seed", type=int, default=42, help="seed for --latent-sampling sample")
    up.add_argument("--dtype", default="auto", help="auto, fp32, bf16 or fp16 (auto: bf16 where fast, else fp16 on CUDA, else fp32)")
    up.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    up.add_argument("--no-fuse-lora", action="store_true", help="keep LoRA layers separate (slower)")
    up.add_argument("--demo", action="store_true",
                    help="run on a tiny randomly initialised model (no weights needed; output is NOT a real upscale)")

    conv = sub.add_parser("convert", help="convert official weights + base into a self-contained diffusers folder")
    _add_model_args(conv)
    conv.add_argument("--out", type=Path, required=True, help="folder to write (loads with OneStepSRPipeline.from_pretrained)")
    return parser


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", type=Path, default=None,
                        help=f"SD2.1-base diffusers folder or single-file checkpoint (default: $ONESTEP_SR_MODELS/{DEFAULT_BASE})")
    parser.add_argument("--weights", type=Path, default=None,
                        help="official SR weights: osediff.pkl, or the TSD-SR folder with transformer.safetensors + "
                             f"vae.safetensors (default: $ONESTEP_SR_MODELS/{DEFAULT_WEIGHTS})")
    parser.add_argument("--embeddings", type=Path, default=None,
                        help="TSD-SR prompt embeddings (folder with prompt_embeds.pt + pool_embeds.pt, or one "
                             ".safetensors); default: looked for beside the weights")


def missing_weights_message(base: Path, weights: Path) -> str | None:
    lines = []
    if not weights.exists():
        lines.append(
            f"  SR weights not found: {weights}\n"
            f"    put the official OSEDiff checkpoint `osediff.pkl` (cswry/OSEDiff, preset/models/osediff.pkl) there,\n"
            f"    or pass --weights PATH (for TSD-SR: the folder with transformer.safetensors and vae.safetensors)"
        )
    if not base.exists():
        lines.append(
            f"  base model not found: {base}\n"
            f"    put the Stable Diffusion 2.1-base diffusers folder there (subfolders unet/ vae/ text_encoder/\n"
            f"    tokenizer/ scheduler/), or a single-file v2-1_512-ema-pruned.safetensors, or pass --base PATH"
        )
    if not lines:
        return None
    return "Missing model files (models dir: $ONESTEP_SR_MODELS, default ./models):\n" + "\n".join(lines) + \
        "\n  Or try `python -m onestep_sr upscale --demo` to see the whole path run on a tiny untrained model."


def collect_inputs(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input not found: {path}")
    return files


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "convert":
        return _convert(args)
    return _upscale(args)


def _model_paths_or_message(args) -> tuple[Path, Path, str | None]:
    """The base and weights paths (defaults under $ONESTEP_SR_MODELS), and what to say if they are missing."""
    base = args.base or DEFAULT_MODELS_DIR / DEFAULT_BASE
    weights = args.weights or DEFAULT_MODELS_DIR / DEFAULT_WEIGHTS
    return base, weights, missing_weights_message(base, weights)


def _convert(args) -> int:
    from .checkpoints import CheckpointError
    from .loading import convert_to_diffusers

    base, weights, message = _model_paths_or_message(args)
    if message:
        print(message, file=sys.stderr)
        return 2
    try:
        out = convert_to_diffusers(base, weights, args.out, embeddings=args.embeddings)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} (load it with onestep_sr.OneStepSRPipeline.from_pretrained({str(out)!r}), "
          "or OneStepSRSD3Pipeline for TSD-SR)")
    return 0


def _upscale(args) -> int:
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    from .checkpoints import CheckpointError
    from .images import ImageInputError
    from .loading import load_pipeline

    demo_dir = None
    if args.demo:
        from .tiny_models import build_tiny_sd_base, make_osediff_checkpoint

        print("DEMO: building a tiny, randomly initialised (untrained) model; the output shows the pipeline "
              "running end to end, not a real super-resolution.", file=sys.stderr)
        demo_dir = tempfile.TemporaryDirectory(prefix="onestep_sr_demo_")
        base = build_tiny_sd_base(Path(demo_dir.name) / "base")
        weights = make_osediff_checkpoint(base, Path(demo_dir.name) / "osediff.pkl")
    else:
        base, weights, message = _model_paths_or_message(args)
        if message:
            print(message, file=sys.stderr)
            return 2
    try:
        inputs = collect_inputs(args.inputs)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not inputs and args.demo:
        inputs = [_write_demo_input(Path(demo_dir.name))]
    if not inputs:
        print("error: no input images given (files or folders with .png/.jpg/...)", file=sys.stderr)
        return 2
    try:
        pipe = load_pipeline(base, weights, dtype=args.dtype, device=args.device, fuse_lora=not args.no_fuse_lora,
                             embeddings=args.embeddings)
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    pipe.set_progress_bar_config(disable=True)
    args.output.mkdir(parents=True, exist_ok=True)
    failures = 0
    done = 0
    try:
        for path in tqdm(inputs, desc="upscaling", unit="img"):
            try:
                with Image.open(path) as img:
                    img.load()
                    generator = torch.Generator().manual_seed(args.seed)
                    result = pipe(img, prompt=args.prompt, upscale=args.upscale, color_fix=args.color_fix,
                                  latent_sampling=args.latent_sampling, generator=generator).images[0]
            except (ImageInputError, OSError, ValueError) as err:
                failures += 1
                tqdm.write(f"skipped {path}: {err}", file=sys.stderr)
                continue
            result.save(args.output / f"{path.stem}.png")
            done += 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: {done} of {len(inputs)} images written to {args.output}", file=sys.stderr)
        return 130
    print(f"wrote {done} image(s) to {args.output}" + (f", {failures} failed" if failures else ""))
    return 1 if failures else 0


def _write_demo_input(folder: Path) -> Path:
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:48, 0:64] / 8.0
    rgb = np.stack([np.sin(x) * 0.5 + 0.5, np.cos(y) * 0.5 + 0.5, np.sin(x + y) * 0.25 + 0.5], axis=-1)
    path = folder / "demo_input.png"
    Image.fromarray((rgb * 255).astype("uint8")).save(path)
    return path


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
