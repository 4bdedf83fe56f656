"""Model folders read straight into private, target-dtype memory: no memory map left behind.

`from_pretrained` memory-maps a safetensors file and keeps the weights as views of the mapping; anything that
later rewrites them (LoRA fusion, a dtype cast, the channels-last conversion) leaves the file's pages resident
beside the new copies, for as long as any tensor still points into the file. Measured on a full-size SD2.1 folder
plus osediff.pkl in fp32: 7.7 GiB resident for 4.8 GiB of weights, all of the excess inside the mappings. Here each
tensor is read with `readinto` into its own storage (a float tensor stored in another dtype is read and cast a
16 MiB piece at a time), by a few threads since the page faults of fresh memory bound the time, and the model is
built on the meta device and given those tensors, so a load holds the weights and nothing else. A folder this path
does not cover as-is (several shards, keys that need the library's renames, tied weights, fp32-pinned modules)
is left to `from_pretrained`: the caller falls back.
"""

from __future__ import annotations

import json
import math
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from .files import CheckpointError

STORED_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def safetensors_layout(path: Path) -> tuple[int, dict[str, dict]]:
    """(where the data starts, key -> {dtype, shape, data_offsets}) of a safetensors file, from its header alone."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated header)")
        (length,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(length))
        except ValueError as err:
            raise CheckpointError(f"{path}: not a readable safetensors file (bad header: {err})") from err
    return 8 + length, {k: v for k, v in header.items() if k != "__metadata__"}


def read_safetensors_private(
    path: Path, dtype: torch.dtype | None = None, keys: set[str] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (all, or `keys`) in memory of their own, float tensors cast to `dtype`.
    Every tensor is allocated first, then filled PIECE_BYTES at a time by a few reader threads (see `_fill`)."""
    start, header = safetensors_layout(path)
    size = path.stat().st_size
    state, pieces = {}, []
    for key, info in header.items():
        if keys is not None and key not in keys:
            continue
        stored = STORED_DTYPES.get(info.get("dtype"))
        shape, (begin, end) = info.get("shape"), info.get("data_offsets", (0, -1))
        if stored is None or end - begin != math.prod(shape) * stored.itemsize:
            raise CheckpointError(f"{path}: {key!r} has a dtype or extent this reader does not accept")
        if start + end > size:
            raise CheckpointError(f"{path}: {key!r} is cut short (truncated file?)")
        cast = dtype is not None and stored.is_floating_point and stored != dtype
        state[key] = torch.empty(shape, dtype=dtype if cast else stored)
        flat, step = state[key].reshape(-1), PIECE_BYTES // stored.itemsize
        pieces += [
            (key, flat[i : i + step], stored, start + begin + i * stored.itemsize) for i in range(0, flat.numel(), step)
        ]
    _fill(path, pieces)
    return state


PIECE_BYTES = 16 * 2**20
READER_THREADS = 4


def _fill(path: Path, pieces: list[tuple[str, torch.Tensor, torch.dtype, int]]) -> None:
    """Read each piece (key, flat target, stored dtype, file offset) into its target, casting through a 16 MiB
    staging buffer per thread where the target's dtype differs: never a whole-tensor temporary (freed temporaries
    stayed on glibc's heap and made a bf16 load peak at 1.5x its weights). Threads, because a load is bound by the
    page faults of the fresh memory it fills, not by the disk or the page cache: two readers filled a full-size
    SD2.1 folder (4.8 GB) in 1.4 s against 3.5 s for one, on 2 cores. Each thread reads through a file handle of
    its own (seek + readinto, which releases the GIL; no `os.pread` on Windows). Grad and inference modes are
    per thread: the readers take the caller's, since targets made under `torch.inference_mode()` (ComfyUI runs
    nodes so) are inference tensors that only an inference-mode thread may update in place."""
    local, handles = threading.local(), []
    inference = torch.is_inference_mode_enabled()

    def read(piece: tuple[str, torch.Tensor, torch.dtype, int]) -> None:
        with torch.inference_mode(inference):
            read_piece(*piece)

    def read_piece(key: str, target: torch.Tensor, stored: torch.dtype, offset: int) -> None:
        if not hasattr(local, "file"):
            local.file, local.staging = open(path, "rb", buffering=0), {}  # noqa: SIM115 (closed below)
            handles.append(local.file)
        if target.dtype == stored:
            buffer = target
        else:
            staging = local.staging.get(stored)
            if staging is None:
                staging = local.staging[stored] = torch.empty(PIECE_BYTES // stored.itemsize, dtype=stored)
            buffer = staging[: target.numel()]
        view, done, wanted = _bytes_of(buffer), 0, buffer.numel() * stored.itemsize
        local.file.seek(offset)
        while done < wanted:  # a raw read may return less than asked
            got = local.file.readinto(view[done:])
            if not got:
                raise CheckpointError(f"{path}: {key!r} is cut short (truncated file?)")
            done += got
        if buffer is not target:
            cast_copy(target, buffer, local.staging)

    threads = max(1, min(READER_THREADS, torch.get_num_threads(), len(pieces)))
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="onestep-sr-read") as pool:
            list(pool.map(read, pieces))  # (re-raises the first reader's error here)
    finally:
        for handle in handles:
            handle.close()


HALF_FLOATS = (torch.float16, torch.bfloat16)
CAST_CHUNK = 2**20  # elements: 4 MiB of float32 scratch


def cast_copy(target: torch.Tensor, source: torch.Tensor, scratch: dict) -> None:
    """`target.copy_(source)`, where a cast between fp16 and bf16 (both contiguous) goes through float32 a chunk at a
    time: torch converts between the two half types element by element (fp16 -> bf16 ran at 6 GB/s here, 10x slower
    than fp16 -> fp32 -> bf16), and the detour is exact (fp16 widens to fp32 without rounding; the one rounding is
    the same round-to-nearest-even). `scratch` (one thread's) keeps the float32 buffer between calls."""
    halves = source.dtype in HALF_FLOATS and target.dtype in HALF_FLOATS and source.dtype != target.dtype
    if not (halves and source.is_contiguous() and target.is_contiguous() and source.shape == target.shape):
        target.copy_(source)
        return
    source, target = source.reshape(-1), target.view(-1)
    wide = scratch.get("cast")
    if wide is None:
        wide = scratch["cast"] = torch.empty(CAST_CHUNK, dtype=torch.float32)
    for i in range(0, source.numel(), CAST_CHUNK):
        part = source[i : i + CAST_CHUNK]
        widened = wide[: part.numel()]
        widened.copy_(part)
        target[i : i + CAST_CHUNK].copy_(widened)


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def lean_load(component_cls: type, folder: Path, weight_files: list[Path], dtype: torch.dtype | None) -> Any:
    """The model of a checked folder built from privately read weights, or None where `from_pretrained` must
    (decided from the file's header, before any tensor is read)."""
    from accelerate import init_empty_weights
    from diffusers import ModelMixin

    diffusers_model = issubclass(component_cls, ModelMixin)
    if len(weight_files) != 1 or getattr(component_cls, "_keep_in_fp32_modules", None):
        return None
    if not diffusers_model and getattr(component_cls, "_tied_weights_keys", None):
        return None
    with init_empty_weights(include_buffers=False):
        if diffusers_model:
            model = component_cls.from_config(component_cls.load_config(folder))
        else:
            model = component_cls(component_cls.config_class.from_pretrained(folder))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _, header = safetensors_layout(weight_files[0])
    # buffers older exports stored that the model now rebuilds itself (e.g. CLIP's position_ids) are skipped, as
    # the libraries skip them
    rebuilt = {name for name, _ in model.named_buffers()} - set(expected)
    stored = {k: tuple(v.get("shape", ())) for k, v in header.items() if k not in rebuilt}
    if expected != stored:
        return None  # renamed, missing or extra weights: the library's loader converts or reports them
    model.load_state_dict(read_safetensors_private(weight_files[0], dtype, set(stored)), strict=True, assign=True)
    cast_float_buffers(model, dtype)
    return model.eval()


def build_with_weights(
    build: Any, state: dict[str, torch.Tensor], dtype: torch.dtype, source: Any, what: str, pages: Any = None
) -> torch.nn.Module:
    """`build()` without parameter storage, given `state` as its weights: each tensor copied into memory of its own
    in `dtype` (floats; the cast happens in the copy) and, with `pages` (a `MappedPages` of the file the state was
    memory-mapped from), its file pages released once copied. The load holds one copy of the weights in the target
    dtype: no randomly initialised float32 model cast afterwards, no file kept resident beside it (a ResShift bf16
    load peaked at 3.4x the weights that way). Names and shapes must fit exactly. Buffers the constructor computes
    stay real and follow `dtype`."""
    from accelerate import init_empty_weights

    from .validation import build_from_state, fit_state

    with init_empty_weights(include_buffers=False):
        model = build_from_state(build, source, what)
    private, scratch = {}, {}
    for key, value in state.items():
        copy = torch.empty(value.shape, dtype=dtype if value.is_floating_point() else value.dtype)
        cast_copy(copy, value, scratch)
        private[key] = copy
        if pages is not None:
            pages.release(value)
    if pages is not None:
        pages.release_file()
    fit_state(model, private, source, f"{what} weights", assign=True)
    cast_float_buffers(model, dtype)
    return model


def cast_float_buffers(model: torch.nn.Module, dtype: torch.dtype | None) -> None:
    """Floating buffers built at construction (not read from a file) follow the weights' dtype."""
    if dtype is None:
        return
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype:
                module._buffers[name] = buffer.to(dtype)
