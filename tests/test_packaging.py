"""What users download stays light: the wheel and the Comfy registry archive hold the package, its configs,
shipped heads and workflows, and no test data."""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_DOWNLOAD_BYTES = 5 * 2**20  # the package is ~2 MB (tokenizer vocab, tag list, workflows and thumbnails)
MUST_SHIP = (
    "__init__.py",
    "pipelines/loading/configs/sd21-base/unet/config.json",
    "pipelines/models/data/ram_tag_list.txt",
    "training/losses/weights/lpips_vgg_head.safetensors",
    "training/losses/weights/dists_head.safetensors",
    "nodes/web/onestep_sr.js",
)


def comfyignore_patterns() -> list[str]:
    lines = (REPO / ".comfyignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        if pattern.endswith("/") and (path.startswith(pattern) or f"/{pattern}" in f"/{path}"):
            return True
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(Path(path).name, pattern):
            return True
    return False


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a git checkout")
def test_registry_archive_holds_no_test_data():
    """The registry packs the git-tracked files minus .comfyignore (plus [tool.comfy] includes: none here)."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    files = [f for f in tracked.decode().split("\0") if f]
    archive = [f for f in files if not ignored(f, comfyignore_patterns())]
    assert not [f for f in archive if f.startswith(("tests/", ".ci/"))]
    size = sum((REPO / f).stat().st_size for f in archive)
    assert size < MAX_DOWNLOAD_BYTES, f"the registry archive would be {size / 2**20:.1f} MB"
    assert set(MUST_SHIP) <= set(archive)
    # and the check can fail: without .comfyignore the archive would carry the test data
    assert sum((REPO / f).stat().st_size for f in files) > 4 * MAX_DOWNLOAD_BYTES


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory) -> Path:
    """A copy of the checkout to build from (builds write build/ and *.egg-info into their source tree), with the
    test suite's code but not its data: the packages must leave the tests out on their own."""
    copy = tmp_path_factory.mktemp("source") / "onestep-sr"

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {".git", "build", "__pycache__", ".ruff_cache", ".pytest_cache", "bench_out", "out"}
        if Path(folder) == REPO / "tests":
            skip.add("data")
        return {n for n in names if n in skip or n.endswith(".egg-info")}

    shutil.copytree(REPO, copy, ignore=ignore)
    return copy


@pytest.mark.slow
def test_wheel_holds_the_package_and_no_tests(tmp_path, source_tree):
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    done = subprocess.run([*command, str(source_tree)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("onestep_sr-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert not [n for n in names if "/tests/" in n or n.startswith("tests/")], "test files in the wheel"
    assert {f"onestep_sr/{f}" for f in MUST_SHIP} <= set(names)
    assert wheel.stat().st_size < MAX_DOWNLOAD_BYTES, f"the wheel is {wheel.stat().st_size / 2**20:.1f} MB"


def test_sdist_holds_the_package_and_no_tests(tmp_path, source_tree):
    from setuptools import build_meta

    assert (source_tree / "tests" / "test_packaging.py").is_file()  # (so leaving tests out is the build's doing)
    cwd = os.getcwd()
    os.chdir(source_tree)
    try:
        name = build_meta.build_sdist(str(tmp_path))
    finally:
        os.chdir(cwd)
    sdist = tmp_path / name
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
    root = names[0].split("/")[0]
    assert not [n for n in names if n.startswith(f"{root}/tests/")], "test files in the sdist"
    assert {f"{root}/{f}" for f in MUST_SHIP} <= set(names)
    assert sdist.stat().st_size < MAX_DOWNLOAD_BYTES
