"""Reading weight files safely: `read_weights` never unpickles code (pickles go through
`torch.load(weights_only=True)`), `read_weight_keys` reads only what detection needs.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..options import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, WEIGHT_SUFFIXES


class CheckpointError(ValueError):
    """A weight file that is missing, unreadable, of an unknown format, or does not fit the base model."""


def check_tensors(state: Any, source: Any) -> None:
    from .validation import check_tensors as check

    check(state, source)


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
        check_tensors(state, path)
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
        check_tensors(state, path)
        return state
    raise CheckpointError(f"{path}: unknown file type {suffix!r}; expected one of {WEIGHT_SUFFIXES}")


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
