"""Validation metrics against independent float64 references, and the training datasets' behaviour."""

from __future__ import annotations

import ast
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage, signal

from onestep_sr.training.data.datasets import PositionSampler, TrainImages, validation_pairs
from onestep_sr.training.metrics import psnr_y, ssim_y

REPO = Path(__file__).resolve().parents[2]


def y_of(x: torch.Tensor) -> np.ndarray:
    rgb = np.round(x[0].double().numpy() * 255) / 255
    return 65.481 * rgb[0] + 128.553 * rgb[1] + 24.966 * rgb[2] + 16.0


def ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al.'s SSIM with an 11x11 sigma-1.5 Gaussian (scipy's correlate2d, valid region)."""
    x = np.arange(11) - 5
    g = np.exp(-(x**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()

    def f(t):
        return signal.correlate2d(t, w, mode="valid")

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ma, mb = f(a), f(b)
    va, vb, cov = f(a * a) - ma**2, f(b * b) - mb**2, f(a * b) - ma * mb
    return float((((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))).mean())


def test_psnr_and_ssim_against_references():
    g = torch.Generator().manual_seed(0)
    hq = torch.rand(1, 3, 40, 36, generator=g)
    sr = (hq + 0.05 * torch.randn(1, 3, 40, 36, generator=g)).clamp(0, 1)
    a, b = y_of(sr)[4:-4, 4:-4], y_of(hq)[4:-4, 4:-4]
    assert psnr_y(sr, hq, 4).item() == pytest.approx(10 * math.log10(255**2 / ((a - b) ** 2).mean()), abs=1e-9)
    assert ssim_y(sr, hq, 4).item() == pytest.approx(ssim_reference(a, b), abs=1e-9)
    assert ssim_y(hq, hq).item() == pytest.approx(1.0, abs=1e-12)
    assert math.isinf(psnr_y(hq, hq).item())
    # PSNR on Y, not RGB: an RGB PSNR of the same pair is a different number
    rgb = 10 * math.log10(1 / ((np.round(sr.numpy() * 255) - np.round(hq.numpy() * 255)) ** 2 / 255**2).mean())
    assert abs(psnr_y(sr, hq).item() - rgb) > 0.1
    # the reference can tell windows apart: a box-window SSIM is another number
    ma, mb = ndimage.uniform_filter(a, 11), ndimage.uniform_filter(b, 11)
    box = ((2 * ma * mb + 6.5025) / (ma**2 + mb**2 + 6.5025)).mean()
    assert abs(box - ssim_reference(a, b)) > 1e-3


def write(folder: Path, name: str, size=(80, 80), seed=0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / name)
    return folder / name


def test_unreadable_and_too_small_images_are_skipped_with_a_warning(tmp_path):
    write(tmp_path / "hq", "a.png")
    (tmp_path / "hq" / "broken.png").write_bytes(b"\x89PNG not really")
    write(tmp_path / "hq", "small.png", size=(20, 20))
    data = TrainImages(tmp_path / "hq", 64, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = [data[i] for i in range(9)]
    assert {Path(s.path).name for s in samples} == {"a.png"}
    messages = " ".join(str(w.message) for w in caught)
    assert "broken.png" in messages and "smaller than crop_size 64" in messages


def test_samples_depend_only_on_their_position(tmp_path):
    for i in range(5):
        write(tmp_path / "hq", f"{i}.png", seed=i)
    a, b = TrainImages(tmp_path / "hq", 32, seed=7), TrainImages(tmp_path / "hq", 32, seed=7)
    for position in (0, 3, 11):
        x, y = a[position], b[position]
        assert torch.equal(x.hq, y.hq) and x.degradation == y.degradation and x.seed == y.seed
    assert a[0].degradation != a[1].degradation
    epoch = sorted(Path(a[p].path).name for p in range(5))
    assert epoch == [f"{i}.png" for i in range(5)], "an epoch visits every image once"


def test_position_sampler_splits_the_same_stream_between_processes():
    one = PositionSampler(2, batch=4, accumulation=1, processes=1, rank=0)
    two = [PositionSampler(2, batch=2, accumulation=1, processes=2, rank=r) for r in range(2)]
    stream = iter(one)
    assert [next(stream) for _ in range(4)] == [8, 9, 10, 11]
    per_rank = [[p for _, p in zip(range(2), iter(s))] for s in two]
    assert sorted(per_rank[0] + per_rank[1]) == [8, 9, 10, 11]


def test_paired_folders(tmp_path):
    write(tmp_path / "hq", "x.png", size=(64, 64), seed=1)
    Image.open(tmp_path / "hq" / "x.png").resize((16, 16), Image.BICUBIC).save(tmp_path / "lq.png")
    (tmp_path / "lq").mkdir()
    (tmp_path / "lq.png").rename(tmp_path / "lq" / "x.png")
    data = TrainImages(tmp_path / "hq", 32, lq_root=tmp_path / "lq", scale=4)
    s = data[0]
    assert s.lq.shape == (3, 8, 8) and s.hq.shape == (3, 32, 32) and s.degradation is None
    (tmp_path / "lq" / "x.png").unlink()
    with pytest.raises(FileNotFoundError, match="no LQ twin"):
        TrainImages(tmp_path / "hq", 32, lq_root=tmp_path / "lq")
    (tmp_path / "v" / "hq").mkdir(parents=True)
    (tmp_path / "v" / "lq").mkdir()
    write(tmp_path / "v" / "lq", "only.png")
    write(tmp_path / "v" / "hq", "other.png")
    with pytest.raises(FileNotFoundError, match="no HQ twin"):
        validation_pairs(tmp_path / "v")


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in `path` names, resolved to an absolute dotted name."""
    package = ".".join(("onestep_sr", *path.relative_to(REPO).with_suffix("").parts[:-1]))
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join([*base, node.module] if node.module else base))
                names |= {".".join([*base, *([node.module] if node.module else []), a.name]) for a in node.names}
            else:
                names.add(node.module or "")
    return names


@pytest.mark.parametrize("folder", ["pipelines", "nodes"])
def test_inference_never_imports_training(folder):
    """pipelines/ and nodes/ never import training/, not even lazily inside a function."""
    offenders = [
        str(p.relative_to(REPO))
        for p in sorted((REPO / folder).rglob("*.py"))
        if any(m == "onestep_sr.training" or m.startswith("onestep_sr.training.") for m in imported_modules(p))
    ]
    assert not offenders, f"{folder}/ imports training/: {offenders}"


def test_the_import_check_can_fail():
    assert "onestep_sr.training.loop" in imported_modules(REPO / "cli.py") or any(
        m.startswith("onestep_sr.training") for m in imported_modules(REPO / "cli.py")
    )
