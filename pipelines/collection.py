"""Upscale a collection of image files to PNGs: a stable plan of outputs, resumable (complete outputs are kept),
per-image failures recorded, and the work shared between the processes of an `accelerate launch` (one per GPU,
on one host or several).

The plan is a pure function of the inputs, so every process computes the same one; each process then takes its
own contiguous share of what is still to do, and no two processes ever write the same file. Every image starts
its own generator from the seed, so an image's output does not depend on how many processes ran or which one
took it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from .images import IMAGE_SUFFIXES, resize_to_long_side, save_png_atomically, write_atomically
from .pipeline_base import NonFiniteOutputError

FAILED_LIST = "failed.json"


# ---------------------------------------------------------------------- the plan


def collect_sources(paths: list[Path]) -> list[tuple[Path, Path | None]]:
    """(file, the folder root it was found under, or None for a file given directly), folders walked
    recursively in sorted order."""
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
    inputs = {source.resolve() for source, _ in sources}
    if any(target.resolve() in inputs for target in planned):
        raise ValueError("an output would overwrite an input; choose another -o")
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


# ---------------------------------------------------------------------- the processes


class Processes:
    """This process among the processes of an `accelerate launch` (or alone without one): its share of the
    work, its device, and a job-wide count of finished images for the main process's progress bar.

    The count goes through the launcher's key-value store (`MASTER_ADDR:MASTER_PORT`), never through collective
    operations: a process that finishes its share early never waits on a slower one until the end.
    """

    def __init__(self, device: str = "auto"):
        self.state = None
        self._store, self._key, self._local_count = None, "", 0
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            try:
                from accelerate import PartialState
            except ImportError as err:
                raise RuntimeError(
                    "several processes need accelerate to share the work: pip install accelerate"
                ) from err
            # cpu=True for a CPU run under `accelerate launch --multi_gpu` (gloo): without it each process
            # believes it is alone
            cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
            self.state = PartialState(cpu=cpu)
            self._store = _connect_store()
            self._key = f"onestep_sr/upscale/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/finished"

    @property
    def count(self) -> int:
        return 1 if self.state is None else self.state.num_processes

    @property
    def index(self) -> int:
        return 0 if self.state is None else self.state.process_index

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def device(self, requested: str) -> str:
        """The device this process runs on: with several processes, each takes its own (`auto`, `cuda`)."""
        if self.count == 1 or requested == "cpu":
            return requested
        if requested in ("auto", "cuda"):
            return "cpu" if self.state.device.type == "cpu" else str(self.state.device)
        raise ValueError(
            f"--device {requested} with {self.count} processes would put them all on one device; leave --device "
            "auto (each process takes its own GPU) or choose the GPUs with CUDA_VISIBLE_DEVICES"
        )

    def share(self, items: list) -> list:
        return split_share(items, self.index, self.count)

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def gather(self, value: Any) -> list:
        """Every process's `value`, in process order, on every process."""
        if self.state is None:
            return [value]
        from accelerate.utils import gather_object

        return gather_object([value])

    def add_finished(self, n: int) -> None:
        self._local_count += n
        if self._store is not None:
            self._store.add(self._key, n)

    def finished(self) -> int:
        """Images finished (written or failed) by all processes so far; this process's own count without a store."""
        return self._local_count if self._store is None else self._store.add(self._key, 0)


def split_share(items: list, index: int, count: int) -> list:
    """Process `index`'s contiguous share of `items` among `count` (sizes differ by at most one, the first
    processes' larger), as accelerate's `split_between_processes` splits a list."""
    base, extra = divmod(len(items), count)
    start = index * base + min(index, extra)
    return items[start : start + base + (index < extra)]


def _connect_store():
    """A client of the launcher's TCP store, or None (then progress counts this process only)."""
    from torch.distributed import TCPStore

    try:
        return TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=60)
        )
    except (KeyError, ValueError, RuntimeError):
        return None


# ---------------------------------------------------------------------- the work


@dataclass(frozen=True)
class UpscaleSettings:
    """What every image of a collection is upscaled with."""

    upscale: int = 4
    long_side: int | None = None
    prompt: str = ""
    color_fix: str | None = None
    latent_sampling: str = "mode"
    seed: int = 42
    save_prompts: bool = False
    batch_size: int = 1


@dataclass
class ShareReport:
    """What one process did with its share."""

    written: int = 0
    failed: list[dict] = field(default_factory=list)  # {"input", "output", "error"}
    seconds: float = 0.0


# errors that concern one image (unreadable, too large, out of memory, non-finite output): it is listed as
# failed and the others go on
IMAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    MemoryError,
    PIL.Image.DecompressionBombError,
    NonFiniteOutputError,
    torch.cuda.OutOfMemoryError,
)


def upscale_share(
    pipe,
    jobs: list[tuple[Path, Path]],
    settings: UpscaleSettings,
    on_finished: Callable[[int], None] = lambda n: None,
    on_failure: Callable[[Path, str], None] = lambda path, error: None,
) -> ShareReport:
    """Upscale `jobs` ((input, output PNG) pairs) with `pipe`, each output written atomically. A failing image
    is reported and skipped; `on_finished(n)` after every n images finished (written or failed)."""
    report, started = ShareReport(), time.perf_counter()
    for batch in _batches(jobs, settings.batch_size):
        loaded, errors = [], []
        for source, target in batch:
            try:
                loaded.append((source, target, *_load(source, target, settings)))
            except IMAGE_ERRORS as err:
                errors.append((source, target, err))
        if loaded:
            errors += _upscale_loaded(pipe, loaded, settings, report)
        for source, target, err in errors:
            report.failed.append({"input": str(source), "output": str(target), "error": _describe(err)})
            on_failure(source, _describe(err))
        on_finished(len(batch))
    report.seconds = time.perf_counter() - started
    return report


def _batches(jobs: list[tuple[Path, Path]], batch_size: int) -> Iterator[list[tuple[Path, Path]]]:
    """Runs of jobs to load and upscale together: one by one in order, or (batch_size > 1) sorted by input size
    so images of one size meet in a batch (the pipeline batches equal sizes only)."""
    if batch_size > 1:
        jobs = sorted(jobs, key=_header_size)
    for start in range(0, len(jobs), batch_size):
        yield jobs[start : start + batch_size]


def _header_size(job: tuple[Path, Path]) -> tuple[int, int]:
    try:
        with PIL.Image.open(job[0]) as img:
            return img.size
    except IMAGE_ERRORS:
        return (0, 0)  # reported when it is loaded


def _load(source: Path, target: Path, settings: UpscaleSettings) -> tuple[Any, bytes | None]:
    """(the pipeline's input, the ICC profile to keep) for one file."""
    if target.is_dir():
        raise ValueError(f"its output {target} is a folder")
    with PIL.Image.open(source) as img:
        img.load()
        icc = img.info.get("icc_profile")
        if settings.long_side is not None:
            return resize_to_long_side(img, settings.upscale, settings.long_side), icc
        return img.copy(), icc


def _upscale_loaded(pipe, loaded: list, settings: UpscaleSettings, report: ShareReport) -> list:
    """Run loaded images through the pipeline (together, or one by one if the batch fails, so one bad image
    fails alone) and write them; returns the failures."""
    try:
        outputs = _run(pipe, [item[2] for item in loaded], settings)
    except IMAGE_ERRORS as err:
        if len(loaded) == 1:
            return [(loaded[0][0], loaded[0][1], err)]
        return [failure for item in loaded for failure in _upscale_loaded(pipe, [item], settings, report)]
    failures = []
    for (source, target, _, icc), (image, prompt) in zip(loaded, outputs):
        try:
            if settings.save_prompts:  # before the image: a complete PNG means a complete output
                write_text_atomically(target.with_suffix(".txt"), (prompt or "") + "\n")
            # the input's colour profile travels with the pixels (they are in its colour space)
            save_png_atomically(image, target, icc_profile=icc)
        except OSError as err:
            failures.append((source, target, err))
            continue
        report.written += 1
    return failures


def _run(pipe, images: list, settings: UpscaleSettings) -> list[tuple[Any, str | None]]:
    output = pipe(
        images,
        prompt=settings.prompt,
        upscale=settings.upscale,
        color_fix=settings.color_fix,
        latent_sampling=settings.latent_sampling,
        # every image starts its own generator from the seed, as the official scripts seed per image
        generator=[torch.Generator().manual_seed(settings.seed) for _ in images],
        batch_size=settings.batch_size,
    )
    return list(zip(output.images, output.prompts))


def _describe(err: BaseException) -> str:
    text = str(err)
    return text if isinstance(err, ValueError | OSError | MemoryError) and text else f"{type(err).__name__}: {text}"


def write_failed_list(out: Path, failed: list[dict]) -> Path | None:
    """OUT/failed.json listing each failed input with its error (written atomically), or a stale one removed
    when nothing failed. Returns its path when written."""
    path = out / FAILED_LIST
    if not failed:
        path.unlink(missing_ok=True)
        return None
    return write_text_atomically(path, json.dumps({"failed": failed}, indent=2, ensure_ascii=False) + "\n")


def write_text_atomically(path: Path, text: str) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
