"""The DAPE tagger inside the OSEDiff pipeline: each image's prompt is the official tag prompt of its upsampled
input, computed once per image, saved and loaded with the pipeline, switchable off."""

import numpy as np
import pytest
import torch
from PIL import Image

from onestep_sr import OneStepSRPipeline, RAMTagger, load_converted, load_pipeline, load_tagger

from helpers import DAPE_PARITY, OSEDIFF_PARITY

RAM = DAPE_PARITY / "model" / "ram_tiny_base.pth"
DAPE = DAPE_PARITY / "model" / "dape_tiny.pth"
BASE, WEIGHTS = OSEDIFF_PARITY / "tiny-sd21", OSEDIFF_PARITY / "osediff_tiny.pkl"


@pytest.fixture(scope="module")
def tagger():
    return load_tagger(RAM, DAPE)


@pytest.fixture(scope="module")
def pipe(tagger):
    pipe = load_pipeline(BASE, WEIGHTS, tagger=tagger)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def image():
    rgb = np.random.default_rng(5).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    return Image.fromarray(rgb)


def test_prompt_is_the_official_tag_prompt_of_the_upsampled_input(pipe, tagger, image):
    out = pipe(image, prompt="a photo", upscale=2, output_type="pt")
    # what OSEDiff's script feeds DAPE: the bicubic-upsampled image (the one the VAE encodes), as a [0, 1] tensor
    upsampled = image.resize((48, 40), Image.BICUBIC)
    tags = tagger.tags(upsampled)[0]
    assert tags and out.prompts == [f"{tags}, a photo,"]
    # and the image is exactly the one conditioned on that prompt without the tagger
    plain = pipe(image, prompt=out.prompts[0], upscale=2, output_type="pt", use_tagger=False)
    assert plain.prompts == out.prompts
    torch.testing.assert_close(out.images, plain.images, atol=0, rtol=0)
    # use_tagger=False takes the prompt as given; an empty prompt gives a different image
    assert pipe(image, prompt="a photo", upscale=2, output_type="pt", use_tagger=False).prompts == ["a photo"]


def test_tags_are_computed_once_per_image_not_per_tile(pipe, tagger, image, monkeypatch):
    calls = []
    real = type(tagger).logits

    def counting(self, pixel_values):
        calls.append(pixel_values.shape[0])
        return real(self, pixel_values)

    monkeypatch.setattr(type(tagger), "logits", counting)
    out = pipe(
        [image, image.transpose(Image.FLIP_LEFT_RIGHT)], upscale=2, tile_size=16, tile_overlap=4, output_type="pt"
    )
    assert calls == [1, 1] and len(out.prompts) == 2


def test_precomputed_embeddings_bypass_the_tagger(pipe, image, tagger, monkeypatch):
    monkeypatch.setattr(type(tagger), "logits", lambda *a: pytest.fail("the tagger must not run"))
    embeds = torch.zeros(1, 77, 32)
    assert pipe(image, prompt_embeds=embeds, upscale=1, output_type="pt").prompts == [None]


def test_the_tagger_is_saved_and_loaded_with_the_pipeline(pipe, image, tmp_path):
    pipe.save_pretrained(tmp_path / "with-tagger", safe_serialization=True)
    assert isinstance(OneStepSRPipeline.from_pretrained(tmp_path / "with-tagger").tagger, RAMTagger)
    loaded = load_converted(tmp_path / "with-tagger")  # from_pretrained + the same inference set-up
    loaded.set_progress_bar_config(disable=True)
    assert loaded.tagger is not None
    a = pipe(image, upscale=2, output_type="pt")
    b = loaded(image, upscale=2, output_type="pt")
    assert a.prompts == b.prompts
    torch.testing.assert_close(a.images, b.images, atol=1e-6, rtol=0)


def test_tagger_arguments(tmp_path, image):
    from onestep_sr.pipelines.methods.dape import convert_tagger

    pair = load_pipeline(BASE, WEIGHTS, tagger=(RAM, DAPE))
    folder = load_pipeline(BASE, WEIGHTS, tagger=convert_tagger(RAM, DAPE, tmp_path / "tagger", dtype="fp32"))
    for p in (pair, folder):
        p.set_progress_bar_config(disable=True)
    assert pair(image, upscale=2, output_type="pt").prompts == folder(image, upscale=2, output_type="pt").prompts
    tsdsr = OSEDIFF_PARITY.parent / "tsdsr"
    with pytest.raises(ValueError, match="TSD-SR takes no tagger"):
        load_pipeline(tsdsr / "tiny-sd3", tsdsr / "lora", embeddings=tsdsr / "embeddings", tagger=(RAM, DAPE))
    with pytest.raises(ValueError, match="tagger must be"):
        load_pipeline(BASE, WEIGHTS, tagger=42)


def test_cli_tags_finds_the_official_files_and_saves_prompts(tmp_path, monkeypatch, pipe, image):
    import shutil

    from onestep_sr import cli

    image.save(tmp_path / "in.png")
    common = ["upscale", str(tmp_path / "in.png"), "--base", str(BASE), "--weights", str(WEIGHTS), "--upscale", "2",
              "--dtype", "fp32", "--save-prompts"]  # fmt: skip
    expected = pipe(image, prompt="a photo", upscale=2).prompts[0]
    out = tmp_path / "explicit"
    args = [*common, "-o", str(out), "--tagger", str(RAM), "--tagger-lora", str(DAPE), "--prompt", "a photo"]
    assert cli.main(args) == 0
    assert (out / "in.txt").read_text() == expected + "\n"
    # found by their official names in the models folder
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(RAM, models / "ram_swin_large_14m.pth")
    shutil.copy(DAPE, models / "DAPE.pth")
    monkeypatch.setattr(cli, "DEFAULT_MODELS_DIR", models)
    assert cli.main([*common, "-o", str(tmp_path / "found"), "--prompt", "a photo"]) == 0
    assert (tmp_path / "found" / "in.txt").read_text() == expected + "\n"
    assert cli.main([*common, "-o", str(tmp_path / "off"), "--prompt", "a photo", "--no-tagger"]) == 0
    assert (tmp_path / "off" / "in.txt").read_text() == "a photo\n"
    # convert-tagger writes a folder that --tagger takes
    assert cli.main(["convert-tagger", "--tagger", str(RAM), "--tagger-lora", str(DAPE), "--out",
                     str(tmp_path / "tagger"), "--dtype", "fp32"]) == 0  # fmt: skip
    assert (
        cli.main([*common, "-o", str(tmp_path / "conv"), "--prompt", "a photo", "--tagger", str(tmp_path / "tagger")])
        == 0
    )
    assert (tmp_path / "conv" / "in.txt").read_text() == expected + "\n"
