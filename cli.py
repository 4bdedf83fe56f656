"""Command line: `python -m onestep_sr upscale|convert|convert-tagger|train ...`.

`train` imports the training package only when it runs: inference never needs it."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from .pipelines.options import COLOR_FIX_METHODS, DTYPE_NAMES, LATENT_SAMPLING_MODES

DEFAULT_MODELS_DIR = Path(os.environ.get("ONESTEP_SR_MODELS", "models"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m onestep_sr", description="One-step diffusion super-resolution.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser(
        "upscale",
        help="upscale image files or folders to PNGs (several GPUs/hosts: `accelerate launch -m onestep_sr upscale`)",
        description="Upscale image files and folders (recursively) to PNGs under -o, mirroring the folders. Complete "
        "outputs are kept, so rerunning the same command resumes; failures are listed in OUT/failed.json. Under "
        "`accelerate launch` the images are shared between the processes.",
    )
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
    up.add_argument(
        "--device",
        default="auto",
        help="auto, cpu, cuda, cuda:1, ... (under `accelerate launch` with several processes: each takes its own)",
    )
    up.add_argument(
        "--batch-size",
        type=int,
        default=1,
        metavar="B",
        help="run up to B images of equal size through the model at once (faster on GPUs for small images; "
        "equal to one by one within the precision's tolerance; default 1)",
    )
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


def _tagger_for(args, method, say=print) -> tuple | None:
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
        say(f"tagger: {found[0]}" + (f" + {found[1]}" if found[1] else " (no DAPE LoRA found)"), file=sys.stderr)
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
    from .pipelines.collection import (
        Processes,
        UpscaleSettings,
        check_output_folder,
        collect_sources,
        plan_outputs,
        upscale_share,
        write_failed_list,
    )
    from .pipelines.loading import CheckpointError
    from .pipelines.methods import detect_method, load_pipeline

    if args.batch_size < 1:
        print(f"error: --batch-size must be at least 1, got {args.batch_size}", file=sys.stderr)
        return 2
    try:
        processes = Processes(args.device)
        device = processes.device(args.device)
    except (RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    say = _printer(processes.is_main)  # one voice for the job: the main process

    demo_dir = None
    if args.demo:
        from .pipelines.demo_models import build_demo_model

        say(
            "DEMO: building a tiny, randomly initialised (untrained) model; the output shows the pipeline "
            "running end to end, not a real super-resolution.",
            file=sys.stderr,
        )
        demo_dir = tempfile.TemporaryDirectory(prefix="onestep_sr_demo_")
        base, weights = build_demo_model(demo_dir.name)
    else:
        base, weights, message = _model_paths_or_message(args)
        if message:
            say(message, file=sys.stderr)
            return 2
    # 1. The plan: every process computes the same one from the inputs alone; problems that concern every
    #    image are refused before the model loads.
    try:
        sources = collect_sources(args.inputs)
    except FileNotFoundError as err:
        say(f"error: {err}", file=sys.stderr)
        return 2
    if not sources and args.demo:
        sources = [(_write_demo_input(Path(demo_dir.name)), None)]
    if not sources:
        say("error: no input images given (files or folders with .png/.jpg/...)", file=sys.stderr)
        return 2
    problem = check_output_folder(args.output, args.inputs)
    if problem is None:
        try:
            jobs = plan_outputs(sources, args.output)
        except ValueError as err:
            problem = str(err)
    if problem:
        say(f"error: {problem}", file=sys.stderr)
        return 2
    # 2. What is still to do (complete outputs are kept: a rerun resumes), decided by every process before any
    #    writes, then shared out.
    pending = [(s, t) for s, t in jobs if args.overwrite or not t.is_file()]
    kept = len(jobs) - len(pending)
    processes.wait()
    if kept:
        say(f"{kept} output(s) exist already and are kept (--overwrite replaces them)", file=sys.stderr)
    # 3. Each process loads the pipeline on its own device; if any cannot, all stop.
    error = None
    try:
        method, _ = detect_method(weights, args.method)
        tagger = None if args.demo else _tagger_for(args, method, say)
        pipe = load_pipeline(
            base,
            weights,
            dtype=args.dtype,
            device=device,
            fuse_lora=not args.no_fuse_lora,
            method=method.id,
            tagger=tagger,
            **_method_options(args),
        )
        pipe.set_progress_bar_config(disable=True)
    except (CheckpointError, ValueError, OSError) as err:
        error = f"error: {err}"
    errors = [e for e in processes.gather(error) if e]
    if errors:
        say(errors[0], file=sys.stderr)
        return 2
    # 4. Upscale this process's share; the main process shows the whole job's progress.
    settings = UpscaleSettings(
        upscale=args.upscale,
        long_side=args.long_side,
        prompt=args.prompt,
        color_fix=args.color_fix,
        latent_sampling=args.latent_sampling,
        seed=args.seed,
        save_prompts=args.save_prompts,
        batch_size=args.batch_size,
    )
    started = time.perf_counter()
    with _JobProgress(processes, len(pending)) as progress:
        try:
            report = upscale_share(
                pipe, processes.share(pending), settings, on_finished=progress.finished, on_failure=progress.failure
            )
        except KeyboardInterrupt:
            say("\ninterrupted: rerun the same command to resume (complete outputs are kept)", file=sys.stderr)
            return 130
        progress.wait_for_all()
    # 5. One summary and one failure list for the whole job.
    reports = processes.gather(report)
    seconds = time.perf_counter() - started
    written = sum(r.written for r in reports)
    failed = [f for r in reports for f in r.failed]
    if processes.is_main:
        listed = write_failed_list(args.output, failed)
        summary = f"wrote {written} image(s) to {args.output}"
        summary += f", {kept} kept (already there)" if kept else ""
        summary += f", {len(failed)} failed (listed in {listed})" if failed else ""
        if written:
            summary += f"; {written / seconds:.2f} images/s"
            summary += f" on {processes.count} processes" if processes.count > 1 else ""
        print(summary)
    return 1 if failed else 0


def _printer(enabled: bool):
    def say(*args, **kwargs):
        if enabled:
            print(*args, **kwargs)

    return say


class _JobProgress:
    """The main process's bar over the whole job (every process's finished images); other processes only count."""

    def __init__(self, processes, total: int):
        from tqdm.auto import tqdm

        self.processes, self.total = processes, total
        self.bar = tqdm(total=total, desc="upscaling", unit="img", disable=not processes.is_main)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()

    def finished(self, n: int) -> None:
        self.processes.add_finished(n)
        self.refresh()

    def failure(self, path, error: str) -> None:
        self.bar.write(f"skipped {path}: {error}", file=sys.stderr)

    def refresh(self) -> None:
        if self.processes.is_main:
            self.bar.n = min(self.processes.finished(), self.total)
            self.bar.refresh()

    def wait_for_all(self) -> None:
        """The main process follows the others' progress to the end (they never wait for it)."""
        if not self.processes.is_main or self.processes.count == 1:
            return
        while self.processes.finished() < self.total:
            self.refresh()
            time.sleep(0.2)
        self.refresh()


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
