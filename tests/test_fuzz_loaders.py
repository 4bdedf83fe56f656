"""Bounded, seeded fuzzing of every format detector and loader.

Each case mutates one file of a valid model (bit flips, truncation, zeroed ranges, safetensors header edits,
key renames and drops, dtype and shape changes, NaNs, non-tensor values, config edits) and loads it through
the public entry point. Every case must end in a valid model or in `CheckpointError`: any other exception
type, or a load running past its time limit, fails. FUZZ_CASES (default 320) sets the case count; FUZZ_SEED
the seed (CI uses the default, so failures reproduce).
"""

import json
import os
import random
import shutil
import signal
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from onestep_sr import load_pipeline
from onestep_sr.pipelines.loading.files import CheckpointError
from onestep_sr.pipelines.loading.validation import check_pipeline_weights
from onestep_sr.pipelines.methods import detect_method
from onestep_sr.pipelines.methods.dape import load_tagger

from helpers import DATA, OSEDIFF_PARITY, TSDSR_PARITY, write_tiny_d3sr

CASES = int(os.environ.get("FUZZ_CASES", "320"))
SEED = int(os.environ.get("FUZZ_SEED", "1234"))
CASE_SECONDS = 60
TADSR = DATA / "parity" / "tadsr" / "models"
DAPE = DATA / "parity" / "dape" / "model"


@dataclass
class Target:
    """A valid model: the file to mutate (relative to `root`, copied per case) and how it is loaded."""

    name: str
    root: Path
    file: str
    load: Callable[[Path], object]  # the copied root -> a loaded model


def _pipeline(pipe) -> object:
    check_pipeline_weights(pipe, "fuzz")
    return pipe


TARGETS = [
    Target("osediff.pkl", OSEDIFF_PARITY, "osediff_tiny.pkl",
           lambda r: _pipeline(load_pipeline(OSEDIFF_PARITY / "tiny-sd21", r / "osediff_tiny.pkl"))),
    Target("tsdsr-lora.safetensors", TSDSR_PARITY / "lora", "transformer.safetensors",
           lambda r: _pipeline(load_pipeline(TSDSR_PARITY / "tiny-sd3", r, embeddings=TSDSR_PARITY / "embeddings"))),
    Target("tsdsr-embeddings.pt", TSDSR_PARITY / "embeddings", "prompt_embeds.pt",
           lambda r: _pipeline(load_pipeline(TSDSR_PARITY / "tiny-sd3", TSDSR_PARITY / "lora", embeddings=r))),
    Target("tadsr.pth", TADSR, "tadsr_tiny_A.pth",
           lambda r: _pipeline(load_pipeline(TADSR / "autoencoder_vq_f4_tiny_A.pth", r / "tadsr_tiny_A.pth"))),
    Target("vq-f4.pth", TADSR, "autoencoder_vq_f4_tiny_A.pth",
           lambda r: _pipeline(load_pipeline(r / "autoencoder_vq_f4_tiny_A.pth", TADSR / "tadsr_tiny_A.pth"))),
    Target("ram.pth", DAPE, "ram_tiny_base.pth", lambda r: load_tagger(r / "ram_tiny_base.pth")),
    Target("dape.pth", DAPE, "dape_tiny.pth", lambda r: load_tagger(DAPE / "ram_tiny_base.pth", r / "dape_tiny.pth")),
    Target("sd21-unet.safetensors", OSEDIFF_PARITY / "tiny-sd21", "unet/diffusion_pytorch_model.safetensors",
           lambda r: _pipeline(load_pipeline(r, OSEDIFF_PARITY / "osediff_tiny.pkl"))),
    Target("sd21-vae-config.json", OSEDIFF_PARITY / "tiny-sd21", "vae/config.json",
           lambda r: _pipeline(load_pipeline(r, OSEDIFF_PARITY / "osediff_tiny.pkl"))),
    Target("detector", OSEDIFF_PARITY, "osediff_tiny.pkl", lambda r: detect_method(r / "osediff_tiny.pkl")),
]  # fmt: skip


# ---------------------------------------------------------------------------- mutations


def flip_bits(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))]


def zero_range(data: bytes, rng: random.Random) -> bytes:
    start = rng.randrange(len(data))
    end = min(len(data), start + rng.randint(1, 4096))
    return data[:start] + bytes(end - start) + data[end:]


def edit_safetensors_header(data: bytes, rng: random.Random) -> bytes:
    if len(data) < 8:
        return flip_bits(data, rng)
    (size,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + size])
    except (ValueError, UnicodeDecodeError):
        return flip_bits(data, rng)
    keys = [k for k in header if k != "__metadata__"]
    key = rng.choice(keys)
    entry = header[key]
    choice = rng.randrange(5)
    if choice == 0:
        entry["dtype"] = rng.choice(["I64", "BOOL", "F64", "U8", "F8_E4M3", "XYZ"])
    elif choice == 1:
        entry["shape"] = [rng.choice([0, 1, 3, 10**6, -1]) for _ in entry["shape"] or [1]]
    elif choice == 2:
        entry["data_offsets"] = [rng.randrange(10**9), rng.randrange(10**9)]
    elif choice == 3:
        header[key + ".renamed"] = header.pop(key)
    else:
        header.pop(key)
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data[8 + size :]


def mutate_state(path: Path, rng: random.Random) -> None:
    """Load the (valid) state, change one entry, save it back in the same format."""
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(path, weights_only=True)
    tensors = list(_tensor_slots(state))
    if not tensors:
        return
    container, key = rng.choice(tensors)
    tensor = container[key]
    choice = rng.randrange(7)
    if choice == 0:
        container[f"{key}_renamed"] = container.pop(key)
    elif choice == 1:
        container.pop(key)
    elif choice == 2:
        container[key] = tensor.to(rng.choice([torch.int64, torch.bool, torch.float64, torch.uint8]))
    elif choice == 3:
        container[key] = tensor.flatten()[: max(1, tensor.numel() // 2)]
    elif choice == 4 and tensor.is_floating_point() and tensor.numel():
        container[key] = tensor.clone().view(-1).index_fill_(0, torch.tensor([0]), float("nan")).view(tensor.shape)
    elif choice == 5:
        container[f"{key}.extra"] = torch.zeros(3)
    else:
        container[key] = "not a tensor" if path.suffix != ".safetensors" else torch.zeros(0)
    if path.suffix == ".safetensors":
        save_file({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, str(path))
    else:
        torch.save(state, path)


def _tensor_slots(state, depth: int = 0):
    if isinstance(state, dict) and depth < 3:
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                yield state, key
            else:
                yield from _tensor_slots(value, depth + 1)


def mutate_json(path: Path, rng: random.Random) -> None:
    data = json.loads(path.read_text())
    key = rng.choice(list(data))
    data[key] = rng.choice([None, -1, 0, 10**12, "x", [], [10**9], 1e309, True])
    path.write_text(json.dumps(data))


def mutate(path: Path, rng: random.Random) -> str:
    if path.suffix == ".json":
        mutate_json(path, rng)
        return "json"
    kinds = ["flip", "truncate", "zero", "state"] + (["header"] if path.suffix == ".safetensors" else [])
    kind = rng.choice(kinds)
    if kind == "state":
        mutate_state(path, rng)
        return kind
    data = path.read_bytes()
    edit = {"flip": flip_bits, "truncate": truncate, "zero": zero_range, "header": edit_safetensors_header}[kind]
    path.write_bytes(edit(data, rng))
    return kind


# ---------------------------------------------------------------------------- the test


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout


def d3sr_target(folder: Path) -> Target:
    """D3SR's file is this package's own (no official weights): a tiny one is written for the run."""
    folder.mkdir(parents=True)
    write_tiny_d3sr(folder / "d3sr.safetensors")
    sd21 = OSEDIFF_PARITY / "tiny-sd21"
    return Target("d3sr.safetensors", folder, "d3sr.safetensors",
                  lambda r: _pipeline(load_pipeline(sd21, r / "d3sr.safetensors")))  # fmt: skip


def test_fuzzed_files_load_or_fail_with_the_project_error(tmp_path):
    rng = random.Random(SEED)
    outcomes: Counter = Counter()
    targets = [*TARGETS, d3sr_target(tmp_path / "d3sr-source")]
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for case in range(CASES):
            target = targets[case % len(targets)]
            root = tmp_path / f"case{case}"
            shutil.copytree(target.root, root)
            kind = mutate(root / target.file, rng)
            signal.alarm(CASE_SECONDS)
            try:
                target.load(root)
                outcomes["loaded"] += 1
            except CheckpointError:
                outcomes["CheckpointError"] += 1
            except CaseTimeout:
                pytest.fail(f"case {case} ({target.name}, {kind}) ran past {CASE_SECONDS} s")
            except Exception as err:  # any other type is the failure this test looks for
                pytest.fail(f"case {case} ({target.name}, {kind}): {type(err).__name__}: {err}")
            finally:
                signal.alarm(0)
            outcomes[f"{target.name}:{kind}"] += 1
            shutil.rmtree(root)
    finally:
        signal.signal(signal.SIGALRM, previous)
    print(f"\nfuzz: {CASES} cases, seed {SEED}: {dict(sorted(outcomes.items()))}")
    assert outcomes["loaded"] + outcomes["CheckpointError"] == CASES
    assert outcomes["CheckpointError"] > CASES // 4  # most mutations must be caught, not silently loaded
