"""Images mean what the user sees: EXIF orientation applied, animations never silently cut to one frame, modes
converted by what they are, the colour profile kept by the CLI, meta and sparse tensors refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms, ImageOps

from onestep_sr.cli import main
from onestep_sr.pipelines.images import ImageInputError, image_sizes, load_images

from helpers import OSEDIFF_PARITY

BASE, WEIGHTS = OSEDIFF_PARITY / "tiny-sd21", OSEDIFF_PARITY / "osediff_tiny.pkl"


def with_orientation(path, orientation: int, size=(20, 12)) -> Image.Image:
    rng = np.random.default_rng(orientation)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(path, exif=exif)
    return Image.open(path)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(tmp_path, orientation):
    img = with_orientation(tmp_path / "phone.jpg", orientation)
    upright = np.asarray(ImageOps.exif_transpose(img).convert("RGB"), dtype=np.float32) / 255
    (lq,) = load_images(img)
    assert lq.rgb.shape[-2:] == upright.shape[:2] and image_sizes(img) == [upright.shape[:2]]
    assert np.array_equal(lq.rgb[0].permute(1, 2, 0).numpy(), upright)
    # the raw pixels (np.asarray) keep the stored orientation
    (raw,) = load_images(np.asarray(img))
    assert raw.rgb.shape[-2:] == (12, 20)


def test_the_pipeline_output_is_upright(tmp_path, osediff_pipe):
    img = with_orientation(tmp_path / "phone.jpg", 6)  # stored 20 x 12, shown 12 x 20
    out = osediff_pipe(img, upscale=1, output_type="pt").images
    assert out.shape[-2:] == (20, 12)


def test_animations_are_a_clear_error_not_a_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), (i * 60, 0, 0)) for i in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageInputError, match="animated image with 3 frames"):
        load_images(Image.open(tmp_path / "anim.gif"))
    frames[0].save(tmp_path / "still.gif")
    assert load_images(Image.open(tmp_path / "still.gif"))[0].rgb.shape[-2:] == (8, 8)


def test_modes_are_converted_by_what_they_are():
    lab = Image.new("LAB", (6, 4), (50, 10, 20))
    (lq,) = load_images(lab)
    assert lq.alpha is None and lq.rgb.shape == (1, 3, 4, 6), "LAB gained an alpha channel"
    cmyk = Image.new("CMYK", (6, 4), (0, 255, 0, 0))
    assert load_images(cmyk)[0].alpha is None
    premultiplied = Image.new("RGBa", (6, 4), (10, 20, 30, 128))
    assert load_images(premultiplied)[0].alpha is not None
    with pytest.raises(ImageInputError, match="mode La cannot be converted"):
        load_images(Image.new("La", (6, 4)))


def test_meta_and_sparse_tensors_are_refused():
    with pytest.raises(ImageInputError, match="meta device"):
        load_images(torch.empty(3, 8, 8, device="meta"))
    with pytest.raises(ImageInputError, match="sparse"):
        load_images(torch.rand(3, 8, 8).to_sparse())


def test_cli_keeps_the_colour_profile_and_orientation(tmp_path):
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (12, 20, 3), dtype=np.uint8)).save(inputs / "icc.png", icc_profile=profile)
    with_orientation(inputs / "phone.jpg", 6)
    args = ["upscale", str(inputs), "-o", str(tmp_path / "out"), "--base", str(BASE), "--weights", str(WEIGHTS),
            "--dtype", "fp32", "--upscale", "2"]  # fmt: skip
    assert main(args) == 0
    with Image.open(tmp_path / "out" / "icc.png") as out:
        assert out.info.get("icc_profile") == profile
    with Image.open(tmp_path / "out" / "phone.png") as out:
        assert out.size == (24, 40), "the phone photo was not written upright"
