"""Reading weight files safely: `read_weights` never unpickles code (pickles go through
`torch.load(weights_only=True)`), `read_weight_keys` reads only what detection needs.
"""

from __future__ import annotations

import functools
import mmap
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..options import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, WEIGHT_SUFFIXES


class CheckpointError(ValueError):
    """A weight file that is missing, unreadable, of an unknown format, or does not fit the base model."""


def check_tensors(state: Any, source: Any, after_each: Any = None) -> None:
    from .validation import check_tensors as check

    check(state, source, after_each=after_each)


def read_weights(path: str | os.PathLike, allow_tensor: bool = False) -> Any:
    """Load a weight file into a dict (or, with allow_tensor, a single tensor) without executing code from it."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; expected a weight file")
    if not path.is_file():
        raise CheckpointError(f"weight file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = dict(load_file(str(path)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupted?): {err}") from err
        _check_releasing_pages(state, path)  # (safetensors maps the file too)
        return state
    if suffix in PICKLE_SUFFIXES:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=_is_zip(path))
        except pickle.UnpicklingError as err:
            raise CheckpointError(
                f"{path}: refused to load: the pickle contains more than tensors and plain containers, and "
                f"unpickling arbitrary objects could run code. Convert it to safetensors from a trusted source. ({err})"
            ) from err
        except Exception as err:  # any failure to parse a damaged pickle is the file's fault
            raise CheckpointError(f"{path}: could not be read (truncated or corrupted?): {err}") from err
        if not isinstance(state, dict) and not (allow_tensor and isinstance(state, torch.Tensor)):
            raise CheckpointError(f"{path}: expected a dict of weights, found a {type(state).__name__}")
        _check_releasing_pages(state, path)
        return state
    raise CheckpointError(f"{path}: unknown file type {suffix!r}; expected one of {WEIGHT_SUFFIXES}")


def _check_releasing_pages(state: Any, path: Path) -> None:
    """check_tensors reads every value of a memory-mapped file: each tensor's pages go back once it has passed."""
    pages = MappedPages(path)
    check_tensors(state, path, after_each=pages.release)
    pages.release_file()


def read_weight_keys(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a (possibly huge) checkpoint, cheaply: safetensors headers only, pickles memory-mapped."""
    path = Path(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES and path.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupted?): {err}") from err
    state = read_weights(path)
    if isinstance(state.get("state_dict"), dict):  # LDM .ckpt files nest the weights
        state = state["state_dict"]
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


class MappedPages:
    """Where `path` is memory-mapped in this process (Linux: /proc/self/maps), to drop the pages behind a tensor read
    from that mapping out of the resident set once its values have been read or copied out.

    `torch.load(..., weights_only=True, mmap=True)` and safetensors keep every page read resident until the file's
    last tensor is freed: a ResShift load held the whole file beside the model built from it (peak 2.0x the weights
    in fp32, 3.4x in bf16). madvise(MADV_DONTNEED) on a file mapping whose pages were only read gives them back; the
    page cache keeps them, and a later read of the tensor faults them in again from the file, unchanged (tensors
    read from weight files are never written: a written page of a private mapping would be lost). Only whole pages
    inside one of this file's mappings are released; elsewhere (no /proc, no madvise) this does nothing."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.spans = _mappings_of(self.path)

    def release_file(self) -> None:
        """Every page of the file's current mappings, once all the tensors needed from it are read: the edge pages
        `release` leaves and the tensors smaller than a page (thousands of norms and biases)."""
        madvise = _madvise()
        for low, high in _mappings_of(self.path) if madvise is not None else ():
            madvise(low, high - low, mmap.MADV_DONTNEED)

    def release(self, tensor: torch.Tensor) -> None:
        if not self.spans or tensor.device.type != "cpu":
            return
        storage = tensor.untyped_storage()
        start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        if not any(low <= start and end <= high for low, high in self.spans):
            return
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages only: neighbours may share the edges
        last = end // mmap.PAGESIZE * mmap.PAGESIZE
        madvise = _madvise()
        if last > first and madvise is not None:
            madvise(first, last - first, mmap.MADV_DONTNEED)


def _mappings_of(path: Path) -> list[tuple[int, int]]:
    maps = Path("/proc/self/maps")
    if not maps.is_file() or not hasattr(mmap, "MADV_DONTNEED"):
        return []
    target = os.path.realpath(path)
    spans = []
    for line in maps.read_text(errors="replace").splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            low, high = (int(x, 16) for x in fields[0].split("-"))
            spans.append((low, high))
    return spans


@functools.cache
def _madvise():
    import ctypes

    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return madvise


def _is_zip(path: Path) -> bool:
    # memory-mapping needs the zip-based format; legacy pickles are read into memory
    return zipfile.is_zipfile(path)


class WeightsProbe:
    """The weights a user pointed at (a file or a folder), read at most once per file.

    Method detectors look at it (file names, keys, shapes) and the chosen method's builder reads the
    same cached state, so a checkpoint is never loaded twice.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._states: dict[Path, dict[str, Any]] = {}
        self._keys: dict[Path, dict[str, tuple[int, ...]]] = {}

    @property
    def is_dir(self) -> bool:
        return self.path.is_dir()

    def file(self, name: str) -> Path | None:
        """`name` inside the folder (or beside the file) the user gave, if it exists."""
        folder = self.path if self.is_dir else self.path.parent
        candidate = folder / name
        return candidate if candidate.is_file() else None

    def state(self, path: Path | None = None) -> dict[str, Any]:
        path = Path(path or self.path)
        if path not in self._states:
            self._states[path] = read_weights(path)
        return self._states[path]

    def keys(self, path: Path | None = None) -> dict[str, tuple[int, ...]]:
        """Key -> shape (tensors) or () (other entries), from a safetensors header or the cached state."""
        path = Path(path or self.path)
        if path not in self._keys:
            if path in self._states or path.suffix.lower() not in SAFETENSORS_SUFFIXES:
                state = self.state(path)
                self._keys[path] = {
                    str(k): tuple(v.shape) if isinstance(v, torch.Tensor) else () for k, v in state.items()
                }
            else:
                self._keys[path] = read_weight_keys(path)
        return self._keys[path]
