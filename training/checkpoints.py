"""Training checkpoints as safetensors + JSON (never pickles): everything an EXACT resume needs.

    step-00000300/
        state.json                 step, config, phases, optimizer param groups, LR schedulers, fp16 scaler
        trainable.safetensors      the trained weights (by name)
        buffers.safetensors        the objective's changing buffers (e.g. spectral norm's vectors), when any
        ema.safetensors            their EMA, when enabled
        optimizer-<phase>.safetensors   the optimizer's per-parameter state
        rng-<rank>.json / .safetensors  every process's RNG states (Python, numpy, torch CPU and CUDA)

A checkpoint is written to `<name>.tmp` and renamed when complete, so a crash never leaves a half checkpoint that
`resume: latest` would pick.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT = "onestep-sr-training-checkpoint"
VERSION = 1
STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step-{step:08d}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"resume = {resume}: not a training checkpoint (no state.json)")
    return path


def _tensors(state: dict, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split an optimizer state into safetensors-ready tensors and a JSON skeleton naming them."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value, path):
        if isinstance(value, torch.Tensor):
            key = f"{prefix}{path}"
            tensors[key] = value.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(value, dict):
            return {
                "__dict__": [
                    [walk(k, f"{path}.k{i}"), walk(v, f"{path}.{i}")] for i, (k, v) in enumerate(value.items())
                ]
            }
        if isinstance(value, (list, tuple)):
            return {
                "__list__" if isinstance(value, list) else "__tuple__": [
                    walk(v, f"{path}.{i}") for i, v in enumerate(value)
                ]
            }
        return value

    return tensors, walk(state, "s")


def _restore(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {_restore(k, tensors): _restore(v, tensors) for k, v in skeleton["__dict__"]}
        if "__list__" in skeleton:
            return [_restore(v, tensors) for v in skeleton["__list__"]]
        if "__tuple__" in skeleton:
            return tuple(_restore(v, tensors) for v in skeleton["__tuple__"])
    return skeleton


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    py = random.getstate()
    np_state = np.random.get_state()
    info = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    return info, tensors


def set_rng_state(info: dict, tensors: dict[str, torch.Tensor]) -> None:
    py = info["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = info["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_rank_rng(folder: Path, rank: int) -> None:
    info, tensors = rng_state()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rng-{rank}.json").write_text(json.dumps(info))
    save_file(tensors, str(folder / f"rng-{rank}.safetensors"))


def load_rank_rng(folder: Path, rank: int) -> bool:
    path = folder / f"rng-{rank}.json"
    if not path.is_file():
        return False
    set_rng_state(json.loads(path.read_text()), load_file(str(folder / f"rng-{rank}.safetensors")))
    return True


def save_main(
    folder: Path,
    step: int,
    config: dict,
    trainable: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor] | None,
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any],
    scaler: torch.amp.GradScaler | None,
    buffers: dict[str, torch.Tensor] | None = None,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if buffers:
        save_file({k: v.detach().cpu().contiguous() for k, v in buffers.items()}, str(folder / "buffers.safetensors"))
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(folder / "trainable.safetensors"))
    if ema is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(folder / "ema.safetensors"))
    skeletons = {}
    for name, opt in optimizers.items():
        tensors, skeletons[name] = _tensors(opt.state_dict())
        save_file(tensors, str(folder / f"optimizer-{name}.safetensors"))
    state = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "config": config,
        "optimizers": skeletons,
        "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    (folder / "state.json").write_text(json.dumps(state, indent=1))


def read_state(folder: Path) -> dict:
    state = json.loads((folder / "state.json").read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"{folder}: not an onestep-sr training checkpoint")
    return state


def load_main(
    folder: Path,
    trainable: dict[str, torch.nn.Parameter],
    ema: dict[str, torch.Tensor] | None,
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any],
    scaler: torch.amp.GradScaler | None,
    buffers: dict[str, torch.Tensor] | None = None,
) -> int:
    state = read_state(folder)
    weights = load_file(str(folder / "trainable.safetensors"))
    if weights.keys() != trainable.keys():
        missing, extra = sorted(trainable.keys() - weights.keys()), sorted(weights.keys() - trainable.keys())
        raise ValueError(
            f"{folder}: the checkpoint's weights do not match this run (missing {missing[:3]}, extra {extra[:3]})"
        )
    with torch.no_grad():
        for k, p in trainable.items():
            p.copy_(weights[k])
        if buffers:
            path = folder / "buffers.safetensors"
            stored = load_file(str(path)) if path.is_file() else {}
            if stored.keys() != buffers.keys():
                raise ValueError(f"{folder}: the checkpoint's objective buffers do not match this run")
            for k, v in buffers.items():
                v.copy_(stored[k])
        if ema is not None:
            stored = load_file(str(folder / "ema.safetensors")) if (folder / "ema.safetensors").is_file() else weights
            for k, v in ema.items():
                v.copy_(stored[k])
    for name, opt in optimizers.items():
        tensors = load_file(str(folder / f"optimizer-{name}.safetensors"))
        opt.load_state_dict(_restore(state["optimizers"][name], tensors))
    for name, sched in schedulers.items():
        sched.load_state_dict(state["schedulers"][name])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(state["step"])


def prune(output_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
