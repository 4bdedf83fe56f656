"""Whole collections: `upscale` shared between the processes of `accelerate launch` (two CPU processes on gloo
here), byte-identical to one process, resumable after a killed process, failures listed in failed.json, and
--batch-size equal to one by one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from onestep_sr.cli import main
from onestep_sr.pipelines.collection import split_share

from helpers import OSEDIFF_PARITY, accelerate_launch

BASE = OSEDIFF_PARITY / "tiny-sd21"
WEIGHTS = OSEDIFF_PARITY / "osediff_tiny.pkl"
# the posterior draw makes the run noised: each image's draw must not depend on the process that takes it
MODEL = ["--base", str(BASE), "--weights", str(WEIGHTS), "--dtype", "fp32", "--latent-sampling", "sample"]


def png(path: Path, seed: int, size=(16, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def mixed_folder(root: Path, count: int = 9, size_scale: int = 1) -> Path:
    """Nested folders, three sizes, a name collision (x.png beside x.jpg) and one broken file."""
    sizes = [(16, 12), (20, 16), (24, 24)]
    for i in range(count):
        w, h = sizes[i % 3]
        png(root / ("a" if i % 2 else "b/deep") / f"img{i:02d}.png", i, (w * size_scale, h * size_scale))
    png(root / "a" / "x.png", 100)
    Image.open(root / "a" / "img01.png").convert("RGB").save(root / "a" / "x.jpg", quality=90)
    (root / "b" / "broken.png").write_bytes(b"not an image")
    return root


def upscale_command(inputs: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "onestep_sr", "upscale", str(inputs), "-o", str(out), *MODEL, "--upscale", "2", *extra]


def run(launcher: list[str], args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300, **kw)


# one thread in every process (as accelerate launch sets it): the float sums then run in one order everywhere
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def folder_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_shares_cover_every_item_once_in_order():
    for n in range(0, 12):
        for count in (1, 2, 3, 5):
            shares = [split_share(list(range(n)), i, count) for i in range(count)]
            assert [x for s in shares for x in s] == list(range(n))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process over the mixed folder."""
    root = tmp_path_factory.mktemp("one")
    inputs = mixed_folder(root / "in")
    done = run([sys.executable], upscale_command(inputs, root / "out"), root)
    assert done.returncode == 1, done.stderr[-3000:]  # the broken file failed, the others were written
    return root / "out"


@pytest.mark.slow
def test_two_processes_write_what_one_writes(tmp_path, one_process):
    inputs = mixed_folder(tmp_path / "in")
    done = run(accelerate_launch(2), upscale_command(inputs, tmp_path / "out"), tmp_path)
    assert "on 2 processes" in done.stdout, done.stderr[-3000:]  # really two processes, each with its share
    assert "wrote 11 image(s)" in done.stdout and "1 failed" in done.stdout
    assert "12/12" in done.stderr, "the main process's bar is not the whole job's"
    expected, got = folder_bytes(one_process), folder_bytes(tmp_path / "out")
    failed = json.loads(got.pop("failed.json"))["failed"]
    expected.pop("failed.json")
    assert got == expected, "the two-process outputs differ from one process's"
    assert sorted(got) == sorted(
        ["a/img01.png", "a/img03.png", "a/img05.png", "a/img07.png", "a/x.jpg.png", "a/x.png.png"]
        + [f"b/deep/img{i:02d}.png" for i in (0, 2, 4, 6, 8)]
    )
    assert [Path(f["input"]).name for f in failed] == ["broken.png"]
    assert "cannot identify image file" in failed[0]["error"]
    assert failed[0]["output"].endswith("b/broken.png")


@pytest.mark.slow
def test_a_killed_process_then_a_rerun_gives_the_same_folder(tmp_path):
    inputs = mixed_folder(tmp_path / "in", count=18, size_scale=2)  # larger images: a run long enough to kill
    reference = tmp_path / "reference"
    assert run([sys.executable], upscale_command(inputs, reference), tmp_path).returncode == 1
    out = tmp_path / "out"
    launcher = subprocess.Popen(
        [*accelerate_launch(2), *upscale_command(inputs, out)],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while len(list(out.rglob("*.png"))) < 3 and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.02)
        workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "onestep_sr" in p.cmdline()]
        assert len(workers) == 2, "not two worker processes"
        workers[1].send_signal(signal.SIGKILL)  # mid-way: some outputs written, most not
        launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    written = len(list(out.rglob("*.png")))
    assert 3 <= written < 20, f"the kill did not land mid-way ({written} of 20 outputs)"
    done = run(accelerate_launch(2), upscale_command(inputs, out), tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]
    assert f"{written} kept" in done.stdout
    assert not [p for p in out.rglob("*") if p.name.endswith(".partial")], "a partial file was left"
    got, expected = folder_bytes(out), folder_bytes(reference)
    assert got.pop("failed.json") != b"" and expected.pop("failed.json") != b""
    assert got == expected


def test_batch_size_equals_one_by_one(tmp_path, capsys):
    inputs = mixed_folder(tmp_path / "in", count=7)
    common = [str(inputs), *MODEL, "--upscale", "2"]
    assert main(["upscale", *common, "-o", str(tmp_path / "one")]) == 1
    assert main(["upscale", *common, "-o", str(tmp_path / "batched"), "--batch-size", "3"]) == 1
    one, batched = folder_bytes(tmp_path / "one"), folder_bytes(tmp_path / "batched")
    assert sorted(one) == sorted(batched) and len(one) == 10
    for name in one:
        if name.endswith(".png"):
            a, b = (np.asarray(Image.open(f / name), dtype=np.int16) for f in (tmp_path / "one", tmp_path / "batched"))
            # fp32 rounding of a batched forward may move a pixel across one 8-bit level, never more
            assert np.abs(a - b).max() <= 1, name
    assert json.loads(one["failed.json"])["failed"][0]["input"].endswith("broken.png")
    assert main(["upscale", *common, "-o", str(tmp_path / "x"), "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err


def test_failed_list_is_removed_when_a_rerun_succeeds(tmp_path):
    inputs = tmp_path / "in"
    png(inputs / "a.png", 1)
    (inputs / "b.png").write_bytes(b"broken")
    out = tmp_path / "out"
    assert main(["upscale", str(inputs), "-o", str(out), *MODEL, "--upscale", "1"]) == 1
    assert [Path(f["input"]).name for f in json.loads((out / "failed.json").read_text())["failed"]] == ["b.png"]
    png(inputs / "b.png", 2)  # fixed: the rerun writes it and keeps a.png
    assert main(["upscale", str(inputs), "-o", str(out), *MODEL, "--upscale", "1"]) == 0
    assert not (out / "failed.json").exists() and (out / "b.png").is_file()


def test_one_device_for_several_processes_is_refused():
    from onestep_sr.pipelines.collection import Processes

    processes = Processes("cpu")
    assert processes.count == 1 and processes.device("cuda:1") == "cuda:1"  # alone: as asked

    class Two:
        num_processes, process_index = 2, 1
        device = torch.device("cuda", 1)

    processes.state = Two()
    assert processes.device("auto") == "cuda:1" and processes.device("cpu") == "cpu"
    with pytest.raises(ValueError, match="would put them all on one device"):
        processes.device("cuda:0")
