"""Command line: `python -m onestep_sr upscale|convert|convert-tagger|train ...`.

`train` imports the training package only when it runs: inference never needs it."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from .pipelines.options import COLOR_FIX_METHODS, DTYPE_NAMES, LATENT_SAMPLING_MODES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
DEFAULT_MODELS_DIR = Path(os.environ.get("ONESTEP_SR_MODELS", "models"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m onestep_sr", description="One-step diffusion super-resolution.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("upscale", help="upscale image files or folders to PNGs")
    up.add_argument("inputs", nargs="*", type=Path, help="image files and/or folders of images")
    up.add_argument("-o", "--output", type=Path, default=Path("out"), help="output folder (default: ./out)")
    _add_model_args(up)
    up.add_argument("--upscale", type=int, default=4, help="integer scale factor (default 4)")
    up.add_argument(
        "--long-side",
        type=int,
        default=None,
        metavar="PX",
        help="target output long side: each input is first resized (bicubic) to PX / upscale on its long side, then "
        "upscaled by exactly --upscale (the output long side is PX rounded to a multiple of it)",
    )
    up.add_argument(
        "--color-fix",
        default=None,
        choices=COLOR_FIX_METHODS,
        help="colour correction (default: the method's own; see the README's methods table)",
    )
    up.add_argument(
        "--prompt",
        default="",
        help="text prompt for the denoiser (default: empty); with a tagger it follows the tags: 'TAGS, PROMPT,'",
    )
    up.add_argument("--save-prompts", action="store_true", help="write each image's prompt beside it (<name>.txt)")
    up.add_argument(
        "--overwrite", action="store_true", help="replace existing outputs (default: skip inputs whose output exists)"
    )
    up.add_argument(
        "--latent-sampling",
        default="mode",
        choices=LATENT_SAMPLING_MODES,
        help="'mode' is deterministic; 'sample' draws from the VAE posterior like the official code",
    )
    up.add_argument("--seed", type=int, default=42, help="seed for --latent-sampling sample")
    up.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_NAMES,
        help="precision (auto: bf16 where fast, else fp16 on CUDA, else fp32)",
    )
    up.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    up.add_argument("--no-fuse-lora", action="store_true", help="keep LoRA layers separate (slower)")
    up.add_argument(
        "--demo",
        action="store_true",
        help="run on a tiny randomly initialised model (no weights needed; output is NOT a real upscale)",
    )

    tag = sub.add_parser("convert-tagger", help="merge the DAPE LoRA into RAM and write a converted tagger folder")
    tag.add_argument("--tagger", type=Path, required=True, help="RAM base (ram_swin_large_14m.pth)")
    tag.add_argument("--tagger-lora", type=Path, default=None, help="DAPE LoRA (DAPE.pth)")
    tag.add_argument("--out", type=Path, required=True, help="folder to write (load it with onestep_sr.load_tagger)")
    tag.add_argument("--dtype", default="fp16", choices=("fp16", "fp32"), help="stored precision (default fp16)")

    train = sub.add_parser(
        "train",
        help="train a one-step SR model (also under `accelerate launch -m onestep_sr train`)",
        description="Train from a YAML/TOML config; key=value overrides any key (README: Training).",
    )
    train.add_argument("config", type=Path, help="the training config (.yaml, .yml or .toml)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. max_steps=100")

    conv = sub.add_parser("convert", help="convert official weights + base into a self-contained diffusers folder")
    _add_model_args(conv)
    conv.add_argument(
        "--out", type=Path, required=True, help="folder to write (loads with OneStepSRPipeline.from_pretrained)"
    )
    return parser


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    from .pipelines.methods import registered_methods

    methods = registered_methods()
    default = methods[0]
    parser.add_argument(
        "--base",
        type=Path,
        default=None,
        help="base model: diffusers folder or single-file checkpoint (default: $ONESTEP_SR_MODELS/"
        "<the method's usual folder>, e.g. " + ", ".join(m.base.folder for m in methods) + ")",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="official SR weights, method detected from the files: "
        + "; ".join(f"{m.display_name}: {m.default_weights}" for m in methods)
        + f" (default: $ONESTEP_SR_MODELS/{default.default_weights})",
    )
    parser.add_argument(
        "--method", default=None, choices=[m.id for m in methods], help="skip detection and use this method"
    )
    from .pipelines.methods.dape import DAPE_FILE, RAM_FILE

    parser.add_argument(
        "--tagger",
        type=Path,
        default=None,
        help=f"image tagger for the prompt (OSEDiff's DAPE): the RAM base {RAM_FILE.name} or a converted tagger "
        f"folder (default: $ONESTEP_SR_MODELS/{RAM_FILE.name} when it is there and the method takes a tagger)",
    )
    parser.add_argument(
        "--tagger-lora",
        type=Path,
        default=None,
        help=f"the DAPE LoRA merged into the RAM base (default: $ONESTEP_SR_MODELS/{DAPE_FILE.name} if present)",
    )
    parser.add_argument("--no-tagger", action="store_true", help="do not use a tagger even if one is found")
    options = sorted({o for m in methods for o in m.extra_options})
    for option in options:
        users = ", ".join(m.display_name for m in methods if option in m.extra_options)
        parser.add_argument(
            f"--{option.replace('_', '-')}",
            dest=option,
            type=Path,
            default=None,
            help=f"{users}: {option} file or folder (default: looked for beside the weights)",
        )


def missing_weights_message(base: Path, weights: Path) -> str | None:
    from .pipelines.methods import registered_methods

    lines = []
    if not weights.exists():
        lines.append(f"  SR weights not found: {weights}\n    put one of these there, or pass --weights PATH:")
        lines.extend("    " + line for m in registered_methods() for line in m.describe_files().splitlines())
    if not base.exists():
        lines.append(
            f"  base model not found: {base}\n    put the base model the weights need there, or pass --base PATH:"
        )
        lines.extend(f"    {m.display_name}: {m.base.name}, {m.base.hint}" for m in registered_methods())
    if not lines:
        return None
    return (
        "Missing model files (models dir: $ONESTEP_SR_MODELS, default ./models):\n"
        + "\n".join(lines)
        + "\n  Or try `python -m onestep_sr upscale --demo` to see the whole path run on a tiny untrained model."
    )


def collect_sources(paths: list[Path]) -> list[tuple[Path, Path | None]]:
    """(file, the folder root it was found under, or None for a file given directly)."""
    found: list[tuple[Path, Path | None]] = []
    for path in paths:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            found.extend((f, path) for f in files)
        elif path.is_file():
            found.append((path, None))
        else:
            raise FileNotFoundError(f"input not found: {path}")
    return found


def plan_outputs(sources: list[tuple[Path, Path | None]], out: Path) -> list[tuple[Path, Path]]:
    """(input, output PNG) pairs, mirroring the inputs' folders under `out`:

    - files under one folder root keep their relative path (`in/a/x.jpg` -> `out/a/x.png`); with several folder
      roots each is mirrored under its own name (`out/in1/...`, `out/in2/...`; a repeated name gets `-2`, `-3`);
      files given directly go to `out/<name>.png`;
    - inputs that would still share an output (`x.png` and `x.jpg` in one folder) keep their own suffix in the
      name: `x.png.png`, `x.jpg.png`. No two inputs ever write the same file.
    """
    roots = list(dict.fromkeys(root for _, root in sources if root is not None))
    prefixes: dict[Path, Path] = {}
    if len(roots) > 1:
        used: dict[str, int] = {}
        for root in roots:
            name = root.resolve().name or "input"
            used[name] = used.get(name, 0) + 1
            prefixes[root] = Path(name if used[name] == 1 else f"{name}-{used[name]}")
    else:
        prefixes = {root: Path() for root in roots}
    relative = [
        prefixes[root] / source.relative_to(root) if root is not None else Path(source.name) for source, root in sources
    ]
    targets = [rel.with_suffix(".png") for rel in relative]
    counts: dict[Path, int] = {}
    for t in targets:
        counts[t] = counts.get(t, 0) + 1
    planned = [out / (rel.with_name(rel.name + ".png") if counts[t] > 1 else t) for rel, t in zip(relative, targets)]
    if len(set(planned)) != len(planned):  # e.g. "x.png" given twice: refuse rather than overwrite
        dupes = sorted({str(p) for p in planned if planned.count(p) > 1})
        raise ValueError(f"several inputs would write {dupes[0]}; give each input once")
    return [(source, target) for (source, _), target in zip(sources, planned)]


def check_output_folder(out: Path, paths: list[Path]) -> str | None:
    """What makes `out` unusable for every image (checked before the model loads), or None."""
    if out.exists() and not out.is_dir():
        return f"-o {out} is an existing file, not a folder"
    resolved = out.resolve()
    for path in paths:
        if path.is_dir() and (resolved == path.resolve() or resolved.is_relative_to(path.resolve())):
            return (
                f"-o {out} is inside the input folder {path}: outputs could overwrite inputs or be read as inputs "
                "on the next run; choose an output folder outside the inputs"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".onestep_sr_write_test_"):
            pass
    except OSError as err:
        return f"cannot write to the output folder {out}: {err}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "convert":
        return _convert(args)
    if args.command == "convert-tagger":
        return _convert_tagger(args)
    if args.command == "train":
        return _train(args)
    return _upscale(args)


def _train(args) -> int:
    from .pipelines.loading import CheckpointError
    from .training.config import ConfigError, TrainConfig

    try:
        config = TrainConfig.from_file(args.config, args.overrides)
        from .training.loop import train

        result = train(config)
    except (ConfigError, CheckpointError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result.interrupted:
        print(f"stopped at step {result.step}; resume with: resume=latest (checkpoint {result.last_checkpoint})")
        return 130
    for name, path in result.exported.items():
        print(f"{name}: {path}")
    return 0


def _model_paths_or_message(args) -> tuple[Path, Path, str | None]:
    """The base and weights paths (defaults under $ONESTEP_SR_MODELS), and what to say if they are missing.

    Without --base, the base is the usual folder of the method the weights belong to.
    """
    from .pipelines.loading import CheckpointError
    from .pipelines.methods import detect_method, get_method, registered_methods

    weights = args.weights or DEFAULT_MODELS_DIR / registered_methods()[0].default_weights
    base = args.base
    if base is None:
        method = get_method(args.method) if args.method else None
        if method is None and weights.exists():
            try:
                method, _ = detect_method(weights)
            except CheckpointError:
                method = None
        base = DEFAULT_MODELS_DIR / (method or registered_methods()[0]).base.folder
    return base, weights, missing_weights_message(base, weights)


def _method_options(args) -> dict:
    from .pipelines.methods import registered_methods

    names = {o for m in registered_methods() for o in m.extra_options}
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _tagger_for(args, method) -> tuple | None:
    """(RAM base, DAPE LoRA or None) from --tagger/--tagger-lora, else found in the models folder by their
    official names when the method's pipeline takes a tagger; None without one."""
    from .pipelines.methods.dape import find_tagger_files

    if args.no_tagger or not method.pipeline_class.accepts_tagger:
        if args.tagger and not args.no_tagger:
            raise ValueError(f"{method.display_name} takes no tagger (--tagger was given)")
        return None
    if args.tagger:
        return args.tagger, args.tagger_lora
    found = find_tagger_files(DEFAULT_MODELS_DIR)
    if found is not None:
        print(f"tagger: {found[0]}" + (f" + {found[1]}" if found[1] else " (no DAPE LoRA found)"), file=sys.stderr)
    return found


def _convert_tagger(args) -> int:
    from .pipelines.loading import CheckpointError
    from .pipelines.methods.dape import convert_tagger

    try:
        out = convert_tagger(args.tagger, args.tagger_lora, args.out, dtype=args.dtype)
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote the tagger to {out} (load it with onestep_sr.load_tagger({str(out)!r}), or pass --tagger {out})")
    return 0


def _convert(args) -> int:
    from .pipelines.loading import CheckpointError
    from .pipelines.methods import convert_to_diffusers, detect_method

    base, weights, message = _model_paths_or_message(args)
    if message:
        print(message, file=sys.stderr)
        return 2
    try:
        method, _ = detect_method(weights, args.method)
        tagger = _tagger_for(args, method)
        out = convert_to_diffusers(base, weights, args.out, method=method.id, tagger=tagger, **_method_options(args))
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {method.display_name} to {out} (load it with onestep_sr.load_converted({str(out)!r}) or "
        f"onestep_sr.{method.pipeline_class.__name__}.from_pretrained({str(out)!r}))"
    )
    return 0


def _upscale(args) -> int:
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    from .pipelines.images import ImageInputError, resize_to_long_side, save_png_atomically
    from .pipelines.loading import CheckpointError
    from .pipelines.methods import detect_method, load_pipeline
    from .pipelines.tiling.memory import InsufficientMemoryError

    demo_dir = None
    if args.demo:
        from .pipelines.demo_models import build_demo_model

        print(
            "DEMO: building a tiny, randomly initialised (untrained) model; the output shows the pipeline "
            "running end to end, not a real super-resolution.",
            file=sys.stderr,
        )
        demo_dir = tempfile.TemporaryDirectory(prefix="onestep_sr_demo_")
        base, weights = build_demo_model(demo_dir.name)
    else:
        base, weights, message = _model_paths_or_message(args)
        if message:
            print(message, file=sys.stderr)
            return 2
    try:
        sources = collect_sources(args.inputs)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not sources and args.demo:
        sources = [(_write_demo_input(Path(demo_dir.name)), None)]
    if not sources:
        print("error: no input images given (files or folders with .png/.jpg/...)", file=sys.stderr)
        return 2
    # problems that concern every image are refused before the model loads
    problem = check_output_folder(args.output, args.inputs)
    if problem is None:
        try:
            jobs = plan_outputs(sources, args.output)
        except ValueError as err:
            problem = str(err)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    inputs = {source.resolve() for source, _ in jobs}
    if any(target.resolve() in inputs for _, target in jobs):
        print("error: an output would overwrite an input; choose another -o", file=sys.stderr)
        return 2
    skipped = [(s, t) for s, t in jobs if t.is_file() and not args.overwrite]
    jobs = [(s, t) for s, t in jobs if args.overwrite or not t.is_file()]
    if skipped:
        print(f"{len(skipped)} output(s) exist already and are kept (--overwrite replaces them)", file=sys.stderr)
    try:
        method, _ = detect_method(weights, args.method)
        tagger = None if args.demo else _tagger_for(args, method)
        pipe = load_pipeline(
            base,
            weights,
            dtype=args.dtype,
            device=args.device,
            fuse_lora=not args.no_fuse_lora,
            method=method.id,
            tagger=tagger,
            **_method_options(args),
        )
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    pipe.set_progress_bar_config(disable=True)
    failures, done = 0, 0
    try:
        for path, target in tqdm(jobs, desc="upscaling", unit="img"):
            if target.is_dir():
                failures += 1
                tqdm.write(f"skipped {path}: its output {target} is a folder", file=sys.stderr)
                continue
            try:
                with Image.open(path) as img:
                    img.load()
                    icc = img.info.get("icc_profile")
                    generator = torch.Generator().manual_seed(args.seed)
                    source = img if args.long_side is None else resize_to_long_side(img, args.upscale, args.long_side)
                    output = pipe(
                        source,
                        prompt=args.prompt,
                        upscale=args.upscale,
                        color_fix=args.color_fix,
                        latent_sampling=args.latent_sampling,
                        generator=generator,
                    )
                # the input's colour profile travels with the pixels (they are in its colour space)
                save_png_atomically(output.images[0], target, icc_profile=icc)
                if args.save_prompts:
                    target.with_suffix(".txt").write_text((output.prompts[0] or "") + "\n", encoding="utf-8")
            except (ImageInputError, InsufficientMemoryError, Image.DecompressionBombError, OSError, ValueError) as err:
                failures += 1
                tqdm.write(f"skipped {path}: {err}", file=sys.stderr)
                continue
            done += 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: {done} of {len(jobs)} images written to {args.output}", file=sys.stderr)
        return 130
    summary = f"wrote {done} image(s) to {args.output}"
    summary += f", {len(skipped)} kept (already there)" if skipped else ""
    summary += f", {failures} failed" if failures else ""
    print(summary)
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
