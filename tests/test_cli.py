"""The command line: upscale files/folders, convert, demo, and the missing-weights message."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from onestep_sr import OneStepSRPipeline, load_pipeline
from onestep_sr.cli import main

from helpers import OSEDIFF_PARITY

BASE = OSEDIFF_PARITY / "tiny-sd21"
WEIGHTS = OSEDIFF_PARITY / "osediff_tiny.pkl"


def test_upscale_folder_and_files(tmp_path, parity_cases):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for case in parity_cases:
        case.png("lr.png").save(inputs / f"{case.name}.png")
    (inputs / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    out = tmp_path / "out"
    rc = main(
        [
            "upscale",
            str(inputs),
            "-o",
            str(out),
            "--base",
            str(BASE),
            "--weights",
            str(WEIGHTS),
            "--dtype",
            "fp32",
            "--device",
            "cpu",
            "--color-fix",
            "wavelet",
            "--prompt",
            "a photo of a cat, ",
        ]
    )
    assert rc == 0
    for case in parity_cases:
        w, h = case.record["lr_size_wh"]
        assert Image.open(out / f"{case.name}.png").size == (4 * w, 4 * h)
    # the CLI writes what the library computes (same defaults: posterior mode, fused LoRA)
    case = parity_cases[0]
    pipe = load_pipeline(BASE, WEIGHTS, fuse_lora=True)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(case.png("lr.png"), prompt="a photo of a cat, ", color_fix="wavelet").images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out / f"{case.name}.png")), np.asarray(expected))


def test_bad_image_is_reported_and_skipped(tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "broken.png").write_bytes(b"\x89PNG not really")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(inputs / "ok.png")
    rc = main(
        [
            "upscale",
            str(inputs),
            "-o",
            str(tmp_path / "out"),
            "--base",
            str(BASE),
            "--weights",
            str(WEIGHTS),
            "--dtype",
            "fp32",
            "--upscale",
            "2",
        ]
    )
    assert rc == 1
    assert "skipped" in capsys.readouterr().err and (tmp_path / "out" / "ok.png").exists()


def test_missing_weights_say_which_files_go_where(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["upscale", "x.png"]) == 2
    err = capsys.readouterr().err
    assert "models/osediff.pkl" in err and "osediff.pkl" in err and "stable-diffusion-2-1-base" in err
    assert "--demo" in err


def test_convert_writes_a_loadable_folder(tmp_path, parity_cases):
    out = tmp_path / "converted"
    assert main(["convert", "--base", str(BASE), "--weights", str(WEIGHTS), "--out", str(out)]) == 0
    pipe = OneStepSRPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    case = parity_cases[1]
    result = pipe(
        case.lq * 0.5 + 0.5,
        prompt=case.prompt,
        upscale=1,
        color_fix="none",
        latent_sampling="sample",
        generator=case.generator(),
        output_type="pt",
    ).images
    assert (result * 2 - 1 - case.out[0]).abs().max() < 1e-4


def test_demo_runs_end_to_end_from_a_fresh_process(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "onestep_sr", "upscale", "--demo", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "untrained" in proc.stderr
    img = Image.open(out / "demo_input.png")
    assert img.size == (256, 192)  # the 64x48 demo input at 4x
    assert np.asarray(img).std() > 0


def test_long_side_resizes_each_input_first(tmp_path, parity_cases):
    """--long-side 50 at x2: a 32x24 input becomes 25x19 (aspect kept), then exactly x2 -> 50x38; the pixels are the
    library's run on that resized input."""
    from onestep_sr.pipelines.images import resize_to_long_side

    case = parity_cases[0]
    lr = case.png("lr.png")
    lr.save(tmp_path / "lr.png")
    out = tmp_path / "out"
    args = ["upscale", str(tmp_path / "lr.png"), "-o", str(out), "--base", str(BASE), "--weights", str(WEIGHTS)]
    assert main([*args, "--dtype", "fp32", "--upscale", "2", "--long-side", "50"]) == 0
    written = Image.open(out / "lr.png")
    assert lr.size == (32, 24) and written.size == (50, 38)
    small = resize_to_long_side(lr, 2, 50)
    assert small.shape == (3, 19, 25)
    # independent reference for the resize: Pillow's own bicubic on the 8-bit image, within 8-bit rounding
    pil_small = np.asarray(lr.convert("RGB").resize((25, 19), Image.BICUBIC), dtype=np.float32) / 255
    np.testing.assert_allclose(small.permute(1, 2, 0).numpy(), pil_small, atol=1 / 255 + 1e-6)
    pipe = load_pipeline(BASE, WEIGHTS, dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(small, upscale=2).images[0]
    np.testing.assert_array_equal(np.asarray(written), np.asarray(expected))


# ------------------------------------------------------------------ the CLI never loses data


def small_png(path, seed=0, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def run_cli(inputs, out, *extra):
    return main(["upscale", *map(str, inputs), "-o", str(out), "--base", str(BASE), "--weights", str(WEIGHTS),
                 "--dtype", "fp32", "--upscale", "1", *extra])  # fmt: skip


def test_output_inside_the_inputs_or_a_file_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    import onestep_sr.pipelines.methods as methods

    monkeypatch.setattr(methods, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded first"))
    small_png(tmp_path / "in" / "x.png")
    for out in (tmp_path / "in", tmp_path / "in" / "sub"):
        assert run_cli([tmp_path / "in"], out) == 2
        assert "inside the input folder" in capsys.readouterr().err
    (tmp_path / "file.png").write_bytes(b"x")
    assert run_cli([tmp_path / "in"], tmp_path / "file.png") == 2
    assert "is an existing file, not a folder" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "in").rglob("*")) == ["x.png"], "the inputs were touched"


def test_outputs_mirror_the_inputs_and_never_collide(tmp_path):
    small_png(tmp_path / "in" / "a" / "x.png", 1)
    small_png(tmp_path / "in" / "a" / "x.jpg", 2)
    small_png(tmp_path / "in" / "b" / "y.png", 3)
    assert run_cli([tmp_path / "in"], tmp_path / "out") == 0
    written = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.png"))
    assert written == ["a/x.jpg.png", "a/x.png.png", "b/y.png"]
    small_png(tmp_path / "in1" / "x.png", 4)
    small_png(tmp_path / "in2" / "x.png", 5)
    assert run_cli([tmp_path / "in1", tmp_path / "in2"], tmp_path / "out2") == 0
    written = sorted(str(p.relative_to(tmp_path / "out2")) for p in (tmp_path / "out2").rglob("*.png"))
    assert written == ["in1/x.png", "in2/x.png"]
    a, b = (np.asarray(Image.open(tmp_path / "out2" / d / "x.png")) for d in ("in1", "in2"))
    assert not np.array_equal(a, b), "one input's output replaced the other's"


def test_existing_outputs_are_kept_unless_overwrite(tmp_path, capsys):
    small_png(tmp_path / "in" / "x.png")
    out = tmp_path / "out"
    (out).mkdir()
    (out / "x.png").write_bytes(b"mine")
    assert run_cli([tmp_path / "in"], out) == 0
    assert (out / "x.png").read_bytes() == b"mine"
    assert "wrote 0 image(s)" in capsys.readouterr().out
    assert run_cli([tmp_path / "in"], out, "--overwrite") == 0
    assert Image.open(out / "x.png").size == (12, 10)
    assert not list(out.rglob("*.partial")), "a temporary file was left behind"


def test_per_image_failures_never_end_the_batch(tmp_path, monkeypatch, capsys):
    small_png(tmp_path / "in" / "a.png", 1)
    small_png(tmp_path / "in" / "bomb.png", 2, size=(64, 64))
    small_png(tmp_path / "in" / "c.png", 3)
    (tmp_path / "out" / "c.png").mkdir(parents=True)  # the output target is a folder
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 > 2 x 1000: a decompression bomb
    assert run_cli([tmp_path / "in"], tmp_path / "out") == 1
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "bomb.png" in captured.err
    assert "wrote 1 image(s)" in captured.out and "2 failed" in captured.out
    assert (tmp_path / "out" / "a.png").is_file() and (tmp_path / "out" / "c.png").is_dir()


def test_an_image_too_large_for_memory_is_skipped_not_fatal(tmp_path, monkeypatch, capsys):
    from onestep_sr.pipelines.pipeline_base import OneStepSRBase
    from onestep_sr.pipelines.tiling.memory import InsufficientMemoryError

    real = OneStepSRBase.check_memory

    def refuse_large(self, plans):
        if any(max(p.latent_hw) > 16 for p in plans):  # the 48 px image (the tiny VAE downsamples by 2)
            raise InsufficientMemoryError("needs 99 GiB, 1 GiB free")
        return real(self, plans)

    monkeypatch.setattr(OneStepSRBase, "check_memory", refuse_large)
    small_png(tmp_path / "in" / "big.png", 1, size=(48, 48))
    small_png(tmp_path / "in" / "small.png", 2, size=(24, 24))
    assert run_cli([tmp_path / "in"], tmp_path / "out") == 1
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "needs 99 GiB" in captured.err and "wrote 1 image(s)" in captured.out
    assert (tmp_path / "out" / "small.png").is_file() and not (tmp_path / "out" / "big.png").exists()
