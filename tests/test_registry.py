"""The method registry: a method registered only here is found by load_pipeline, listed and loaded by the
ComfyUI loader, and usable from the CLI, without any other file knowing about it."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from onestep_sr import OneStepSRPipeline, load_pipeline, prepare_for_inference, registered_methods
from onestep_sr.pipelines.loading import WeightsProbe, load_sd_base, read_weights
from onestep_sr.pipelines.methods import BaseModel, Method, WeightFile, register, unregister
from onestep_sr.pipelines.options import TileDefaults

import comfy_harness
from helpers import OSEDIFF_PARITY, make_comfy_models

BASE = OSEDIFF_PARITY / "tiny-sd21"
MARKER, DELTA = "fake_sr.json", "delta.safetensors"
TIMESTEP = 500


def detect(probe: WeightsProbe) -> bool:
    return probe.is_dir and probe.file(MARKER) is not None


def build(base, probe: WeightsProbe, options) -> OneStepSRPipeline:
    BUILDS.append(probe.path)
    components = load_sd_base(base, options.base_config, options.dtype)
    delta = read_weights(probe.path / DELTA)["conv_in.weight"]
    with torch.no_grad():
        components["unet"].conv_in.weight += delta
    return OneStepSRPipeline(**components, timestep=TIMESTEP, method="fake-sr")


BUILDS: list = []
FAKE = Method(
    id="fake-sr",
    display_name="Fake SR",
    pipeline_class=OneStepSRPipeline,
    detect=detect,
    build=build,
    weight_files=(WeightFile(MARKER, "made by this test"), WeightFile(DELTA, "made by this test")),
    base=BaseModel(name="tiny SD2.1", folder="tiny-sd21"),
    defaults=TileDefaults(color_fix="none", tile_size=32, tile_overlap=8),
    weights_layout="folder",
    folder_marker=MARKER,
)


@pytest.fixture(scope="module")
def fake_method():
    register(FAKE)
    yield FAKE
    unregister(FAKE.id)
    assert FAKE not in registered_methods()


@pytest.fixture(scope="module")
def fake_weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights") / "fakesr"
    folder.mkdir()
    (folder / MARKER).write_text(json.dumps({"method": "fake-sr"}))
    delta = torch.randn(32, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.05
    save_file({"conv_in.weight": delta}, str(folder / DELTA))
    return folder


def reference(image: torch.Tensor, delta_folder) -> torch.Tensor:
    """The same model assembled by hand, without the registry."""
    components = load_sd_base(BASE)
    with torch.no_grad():
        components["unet"].conv_in.weight += read_weights(delta_folder / DELTA)["conv_in.weight"]
    # the same inference set-up as load_pipeline (channels-last weights change the summation order)
    pipe = prepare_for_inference(OneStepSRPipeline(**components, timestep=TIMESTEP), torch.device("cpu"), torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe(image, upscale=2, color_fix="none", output_type="pt").images


def test_load_pipeline_finds_the_registered_method(fake_method, fake_weights):
    BUILDS.clear()
    pipe = load_pipeline(BASE, fake_weights)
    pipe.set_progress_bar_config(disable=True)
    assert [fake_weights] == BUILDS and pipe.sr_method is fake_method and pipe.display_name == "Fake SR"
    assert pipe.defaults == fake_method.defaults  # None / "auto" resolve to the method's own defaults
    image = torch.rand(3, 12, 10, generator=torch.Generator().manual_seed(1))
    out = pipe(image, upscale=2, output_type="pt").images
    torch.testing.assert_close(out, reference(image, fake_weights), atol=1e-6, rtol=0)
    adain = pipe(image, upscale=2, color_fix="adain", output_type="pt").images
    assert (adain - out).abs().max() > 1e-3  # so the default really was "none", not adain
    assert pipe.plan_tiling((300, 300)).tile_size == 32  # the method's tile default (beyond one-piece sizes)


def test_the_registered_method_is_not_mistaken_for_another(fake_method, fake_weights):
    from onestep_sr.pipelines.methods import detect_method

    assert detect_method(fake_weights)[0] is fake_method
    assert detect_method(OSEDIFF_PARITY / "osediff_tiny.pkl")[0].id == "osediff"
    with pytest.raises(ValueError, match="Fake SR takes no option"):
        load_pipeline(BASE, fake_weights, embeddings=fake_weights)


def test_the_comfyui_loader_lists_and_loads_it(fake_method, fake_weights, tmp_path):
    models, inputs = make_comfy_models(tmp_path)
    shutil.copytree(fake_weights, models / "onestep_sr" / "fakesr")
    shutil.copytree(BASE, models / "diffusers" / "tiny-sd21")
    comfy_harness.install(models, inputs)
    comfy_harness.install_v3()
    try:
        from onestep_sr.nodes import comfy_env

        comfy_env.register_model_folder()
        loader = comfy_harness.node_classes()["OneStepSRModelLoader"]
        weights = next(i for i in loader.define_schema().inputs if i.id == "weights")
        # the folder is offered (found by the method's marker), its parts are not offered alone
        assert "fakesr" in weights.kwargs["options"]
        assert not any(o.startswith("fakesr/") for o in weights.kwargs["options"])
        assert "Fake SR" in weights.kwargs["tooltip"]
        (sr,) = loader.execute(base="tiny-sd21", weights="fakesr", dtype="fp32", device="cpu", fuse_lora=True).args
        assert sr.method == "Fake SR" and sr.pipe.sr_method is fake_method
    finally:
        comfy_harness.uninstall_v3()
        comfy_harness.uninstall()


def test_the_cli_uses_it(fake_method, fake_weights, tmp_path, monkeypatch, capsys):
    from onestep_sr import cli

    image = torch.rand(12, 10, 3, generator=torch.Generator().manual_seed(2))
    path = tmp_path / "in.png"
    Image.fromarray((image.numpy() * 255).round().astype("uint8")).save(path)
    out = tmp_path / "out"
    common = ["-o", str(out), "--base", str(BASE), "--weights", str(fake_weights), "--upscale", "2"]
    assert cli.main(["upscale", str(path), *common, "--dtype", "fp32", "--device", "cpu"]) == 0
    written = Image.open(out / "in.png")
    assert written.size == (20, 24)
    expected = reference(Image.open(path), fake_weights)[0]
    ours = torch.from_numpy(np.asarray(written, dtype="float32") / 255).permute(2, 0, 1)
    assert (ours - expected).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit rounding of the same image
    assert cli.main(["upscale", str(path), *common, "--method", "fake-sr"]) == 0
    # the missing-weights message lists the registered method's files and where they come from
    monkeypatch.setattr(cli, "DEFAULT_MODELS_DIR", tmp_path / "no-models")
    assert cli.main(["upscale", str(path), "-o", str(out)]) == 2
    message = capsys.readouterr().err
    assert "Fake SR:" in message and f"{MARKER}  <- made by this test" in message and "OSEDiff:" in message
