"""Training images: a folder of HQ images (LQ made on the fly), or paired LQ/HQ folders; and the sample order.

Every sample is a pure function of its position in the global sample stream: position -> (epoch, index in
that epoch's permutation) -> image, crop, flip and degradation seed. So a run resumed at step S sees exactly the
samples it would have seen, and N processes see, between them, the same samples as one process with N times
the batch, whatever the number of workers.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ...pipelines.images import IMAGE_SUFFIXES
from .degradation import DegradationParams, DegradationSampler


def list_images(root: str | os.PathLike) -> list[Path]:
    """Image files under `root`, recursively, in a stable sorted order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return files


def read_rgb(path: Path) -> torch.Tensor:
    """[3, H, W] float in [0, 1]."""
    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def sample_seed(seed: int, position: int) -> int:
    """One 63-bit seed per sample position (SplitMix64 of the two), independent of batching."""
    x = (seed * 0x9E3779B97F4A7C15 + position + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


@dataclass
class Sample:
    """One training example: HQ crop [3, H, W]; LQ [3, h, w] when paired, else the degradation to apply."""

    position: int
    seed: int
    hq: torch.Tensor
    lq: torch.Tensor | None
    degradation: DegradationParams | None
    path: str


class TrainImages(torch.utils.data.Dataset):
    """Indexed by global sample position. HQ-only: random crop of `crop_size`, degradation parameters drawn from the
    sample's seed (the degradation's own flip included). Paired: aligned random crops of HQ and LQ (LQ at HQ/scale
    or at HQ size), a random horizontal flip of both. Unreadable or too small files are skipped with a warning
    (the next image takes the slot), never a crash mid-run."""

    def __init__(
        self,
        hq_root: str | os.PathLike,
        crop_size: int,
        seed: int = 0,
        lq_root: str | os.PathLike | None = None,
        scale: int = 4,
        sampler: DegradationSampler | None = None,
    ):
        self.files = list_images(hq_root)
        self.hq_root, self.lq_root = Path(hq_root), Path(lq_root) if lq_root is not None else None
        self.crop_size, self.seed, self.scale = crop_size, seed, scale
        self.sampler = sampler or DegradationSampler()
        if self.lq_root is not None:
            missing = [f for f in self.files if not self._lq_path(f).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} HQ image(s) have no LQ twin under {self.lq_root} (same relative path, any image "
                    f"suffix); first: {missing[0].relative_to(self.hq_root)}"
                )
        self._bad: set[int] = set()
        self._epoch, self._order = -1, None  # the permutation of the epoch last used

    def _lq_path(self, hq: Path) -> Path:
        rel = hq.relative_to(self.hq_root)
        for suffix in (rel.suffix, *IMAGE_SUFFIXES):
            candidate = self.lq_root / rel.with_suffix(suffix)
            if candidate.is_file():
                return candidate
        return self.lq_root / rel

    def __len__(self) -> int:
        return len(self.files)

    def index_of(self, position: int) -> int:
        """The file index at a global position: epoch-wise permutations of the files, seeded by (seed, epoch)."""
        epoch, offset = divmod(position, len(self.files))
        if self._epoch != epoch:
            g = torch.Generator().manual_seed(sample_seed(self.seed, -1 - epoch))
            self._epoch, self._order = epoch, torch.randperm(len(self.files), generator=g)
        return int(self._order[offset])

    def __getitem__(self, position: int) -> Sample:
        index = self.index_of(position)
        for attempt in range(len(self.files)):
            i = (index + attempt) % len(self.files)
            if i in self._bad:
                continue
            try:
                return self._load(position, i)
            except (OSError, ValueError) as err:
                self._bad.add(i)
                warnings.warn(f"skipping training image {self.files[i]}: {err}", stacklevel=2)
        raise RuntimeError(f"no usable training image under {self.hq_root} (all {len(self.files)} were skipped)")

    def _load(self, position: int, index: int) -> Sample:
        seed = sample_seed(self.seed, position)
        g = torch.Generator().manual_seed(seed)
        path = self.files[index]
        hq = read_rgb(path)
        size = self.crop_size
        h, w = hq.shape[-2:]
        if h < size or w < size:
            raise ValueError(f"{w}x{h} is smaller than crop_size {size}")
        top = int(torch.randint(0, h - size + 1, (1,), generator=g)) // self.scale * self.scale
        left = int(torch.randint(0, w - size + 1, (1,), generator=g)) // self.scale * self.scale
        hq = hq[:, top : top + size, left : left + size]
        if self.lq_root is None:
            return Sample(position, seed, hq, None, self.sampler.sample(g), str(path))
        lq = read_rgb(self._lq_path(path))
        f = 1 if lq.shape[-2:] == (h, w) else self.scale
        if lq.shape[-2:] != (h // f, w // f):
            raise ValueError(f"its LQ twin is {tuple(lq.shape[-2:])}, expected {(h, w)} or {(h // f, w // f)}")
        lq = lq[:, top // f : (top + size) // f, left // f : (left + size) // f]
        if torch.rand((), generator=g) < 0.5:
            hq, lq = hq.flip(-1), lq.flip(-1)
        return Sample(position, seed, hq, lq, None, str(path))


def collate(samples: list[Sample]) -> dict:
    return {
        "position": [s.position for s in samples],
        "seed": [s.seed for s in samples],
        "hq": torch.stack([s.hq for s in samples]),
        "lq": torch.stack([s.lq for s in samples]) if samples[0].lq is not None else None,
        "degradation": [s.degradation for s in samples],
        "path": [s.path for s in samples],
        "prompt": [caption_of(s.path) for s in samples],
        **prompt_embeddings_of([s.path for s in samples]),
    }


def prompt_embeddings_of(image_paths: list[str]) -> dict:
    """Per-image prompt embeddings for objectives that condition on them (TSD-SR's teacher): `<name>.safetensors`
    beside each image with tensors `prompt_embeds` [N, D] and `pooled_prompt_embeds` [P] (a leading 1 is fine).
    All or none of a batch's images must have one."""
    files = [Path(p).with_suffix(".safetensors") for p in image_paths]
    present = [f.is_file() for f in files]
    if not any(present):
        return {}
    if not all(present):
        missing = files[present.index(False)]
        raise ValueError(f"some training images have prompt embeddings beside them and others not (no {missing})")
    from safetensors.torch import load_file

    embeds, pooled = [], []
    for f in files:
        state = load_file(f)
        if not {"prompt_embeds", "pooled_prompt_embeds"} <= state.keys():
            raise ValueError(f"{f}: expected tensors prompt_embeds and pooled_prompt_embeds, found {sorted(state)}")
        embeds.append(state["prompt_embeds"].reshape(state["prompt_embeds"].shape[-2:]).float())
        pooled.append(state["pooled_prompt_embeds"].reshape(-1).float())
    return {"prompt_embeds": torch.stack(embeds), "pooled_prompt_embeds": torch.stack(pooled)}


def caption_of(image_path: str) -> str | None:
    """A training image's own prompt: the text of `<name>.txt` beside it (one line, e.g. its tags), or None."""
    caption = Path(image_path).with_suffix(".txt")
    if not caption.is_file():
        return None
    return " ".join(caption.read_text(encoding="utf-8").split())


class PositionSampler(torch.utils.data.Sampler):
    """This process's sample positions from optimizer step `start_step` on: each step consumes `global_batch`
    positions, micro-step a and process r taking [a * B * P + r * B, +B) of them (B per-process batch, P
    processes), so the union over processes is the same at any P."""

    def __init__(self, start_step: int, batch: int, accumulation: int, processes: int, rank: int):
        self.start_step, self.batch, self.accumulation = start_step, batch, accumulation
        self.processes, self.rank = processes, rank

    def __iter__(self):
        step = self.start_step
        per_step = self.batch * self.accumulation * self.processes
        while True:
            for micro in range(self.accumulation):
                first = step * per_step + micro * self.batch * self.processes + self.rank * self.batch
                yield from range(first, first + self.batch)
            step += 1


def validation_pairs(root: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(lq, hq) files of a validation folder with lq/ and hq/ subfolders holding the same file stems."""
    root = Path(root)
    lq_dir, hq_dir = root / "lq", root / "hq"
    if not lq_dir.is_dir() or not hq_dir.is_dir():
        raise FileNotFoundError(f"validation folder {root} must hold lq/ and hq/ subfolders")
    hq_by_stem = {p.relative_to(hq_dir).with_suffix(""): p for p in list_images(hq_dir)}
    pairs = []
    for lq in list_images(lq_dir):
        key = lq.relative_to(lq_dir).with_suffix("")
        if key not in hq_by_stem:
            raise FileNotFoundError(f"validation LQ {lq} has no HQ twin in {hq_dir}")
        pairs.append((lq, hq_by_stem[key]))
    return pairs
