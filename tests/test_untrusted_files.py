"""Regression corpus of crafted and damaged model files, generated here (no binaries committed).

Each case must end in the project's own `CheckpointError` (or, for runs, its memory/non-finite errors)
before anything runs, and no pickle payload may ever execute (a marker file would appear).
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from onestep_sr import load_pipeline
from onestep_sr.pipelines.loading.files import CheckpointError
from onestep_sr.pipelines.pipeline_base import NonFiniteOutputError
from onestep_sr.pipelines.pipeline_onestep_sr import OneStepSRPipeline
from onestep_sr.pipelines.pipeline_onestep_sr_sd3 import OneStepSRSD3Pipeline
from onestep_sr.pipelines.tiling.memory import InsufficientMemoryError

from helpers import OSEDIFF_PARITY, TSDSR_PARITY

BASE, WEIGHTS = OSEDIFF_PARITY / "tiny-sd21", OSEDIFF_PARITY / "osediff_tiny.pkl"
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
VAE_FILE = "vae/diffusion_pytorch_model.safetensors"


@pytest.fixture
def folder(osediff_converted, tmp_path):
    """A fresh copy of the converted tiny OSEDiff pipeline folder to damage."""
    return Path(shutil.copytree(osediff_converted, tmp_path / "pipe"))


def edit_tensors(path: Path, edit) -> None:
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_the_undamaged_folder_loads(folder):
    assert isinstance(OneStepSRPipeline.from_pretrained(folder), OneStepSRPipeline)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda s: s.update({"conv_in.weight": s["conv_in.weight"].to(torch.int64)}), "stored as I64"),
        (lambda s: s.update({"conv_in.weight": s["conv_in.weight"] > 0}), "stored as BOOL"),
        (lambda s: s["conv_in.weight"].view(-1).__setitem__(0, float("inf")), "non-finite"),
        (lambda s: s.pop("conv_in.weight"), "missing 1 weight.*conv_in.weight"),
        (lambda s: s.update({"extra.weight": torch.zeros(2)}), "unexpected 1 weight.*extra.weight"),
        (lambda s: s.update({"conv_in.weight": s["conv_in.weight"][:1]}), "wrong shape|conv_in.weight"),
    ],
    ids=["int64", "bool", "inf", "missing-key", "unexpected-key", "shape"],
)
def test_damaged_unet_weights_are_refused(folder, damage, message):
    edit_tensors(folder / UNET_FILE, damage)
    with pytest.raises(CheckpointError, match=message):
        OneStepSRPipeline.from_pretrained(folder)


def test_nan_vae_weights_are_refused(folder):
    edit_tensors(folder / VAE_FILE, lambda s: s["decoder.conv_out.weight"].fill_(float("nan")))
    with pytest.raises(CheckpointError, match="decoder.conv_out.weight.*non-finite"):
        OneStepSRPipeline.from_pretrained(folder)


@pytest.mark.parametrize(
    ("file", "changes", "message"),
    [
        ("vae/config.json", {"scaling_factor": 0}, "scaling_factor=0"),
        ("vae/config.json", {"block_out_channels": [10**9, 64]}, "block_out_channels.*out of range"),
        ("unet/config.json", {"layers_per_block": -1}, "layers_per_block.*out of range"),
        ("scheduler/scheduler_config.json", {"num_train_timesteps": 0}, "num_train_timesteps=0"),
        ("tokenizer/tokenizer_config.json", {"model_max_length": 10**12}, "model_max_length"),
        ("model_index.json", {"timestep": -5}, "timestep -5 is outside"),
        ("model_index.json", {"timestep": 1000}, "timestep 1000 is outside"),
    ],
)
def test_configs_out_of_range_are_refused(folder, file, changes, message):
    edit_json(folder / file, **changes)
    with pytest.raises(CheckpointError, match=message):
        OneStepSRPipeline.from_pretrained(folder)


def test_components_outside_the_folder_are_refused(folder, tmp_path):
    outside = Path(shutil.copytree(folder / "vae", tmp_path / "elsewhere" / "vae"))
    index = json.loads((folder / "model_index.json").read_text())
    index["../elsewhere/vae"] = index.pop("vae")
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="has a component '../elsewhere/vae'"):
        OneStepSRPipeline.from_pretrained(folder)
    index["vae"] = index.pop("../elsewhere/vae")
    (folder / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(folder / "vae")
    (folder / "vae").symlink_to(outside, target_is_directory=True)
    with pytest.raises(CheckpointError, match="outside the folder"):
        OneStepSRPipeline.from_pretrained(folder)


def test_a_weight_file_symlinked_out_of_the_folder_is_refused(folder, tmp_path):
    target = tmp_path / "secret.safetensors"
    shutil.move(folder / UNET_FILE, target)
    (folder / UNET_FILE).symlink_to(target)
    with pytest.raises(CheckpointError, match="symlink pointing outside"):
        OneStepSRPipeline.from_pretrained(folder)


def test_pickled_bin_components_are_refused(folder):
    state = load_file(str(folder / UNET_FILE))
    (folder / UNET_FILE).unlink()
    torch.save(state, folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pickle format \(diffusion_pytorch_model.bin\).*safetensors"):
        OneStepSRPipeline.from_pretrained(folder)


def test_custom_code_is_never_imported(folder, tmp_path, monkeypatch):
    marker = tmp_path / "PWNED"
    (folder / "evil_module.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass Evil: pass\n")
    monkeypatch.syspath_prepend(str(folder))
    for library in ("evil_module", "os", "subprocess", "builtins"):
        edit_json(folder / "model_index.json", unet=[library, "Evil" if library == "evil_module" else "system"])
        with pytest.raises(CheckpointError, match="custom code is never imported"):
            OneStepSRPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="never import code"):
        OneStepSRPipeline.from_pretrained(folder, custom_pipeline="evil_module")
    assert not marker.exists()


def test_nan_prompt_embedding_is_refused(tmp_path):
    from onestep_sr import convert_to_diffusers

    out = convert_to_diffusers(
        TSDSR_PARITY / "tiny-sd3", TSDSR_PARITY / "lora", tmp_path / "tsdsr", embeddings=TSDSR_PARITY / "embeddings"
    )
    assert isinstance(OneStepSRSD3Pipeline.from_pretrained(out), OneStepSRSD3Pipeline)
    weights = next((out / "prompt_embedding").glob("*.safetensors"))
    edit_tensors(weights, lambda s: next(iter(s.values())).view(-1).__setitem__(3, float("nan")))
    with pytest.raises(CheckpointError, match="prompt_embedding.*non-finite"):
        OneStepSRSD3Pipeline.from_pretrained(out)


def test_official_files_with_bad_tensors_are_refused(tmp_path):
    state = torch.load(WEIGHTS, weights_only=True)
    key = next(k for k, v in state["state_dict_unet"].items() if isinstance(v, torch.Tensor))
    for name, value in (("nan", float("nan")), ("int", None)):
        damaged = pickle.loads(pickle.dumps(state))
        tensor = damaged["state_dict_unet"][key]
        damaged["state_dict_unet"][key] = tensor.long() if value is None else tensor.fill_(value)
        path = tmp_path / f"osediff_{name}.pkl"
        torch.save(damaged, path)
        with pytest.raises(CheckpointError, match=f"osediff_{name}.pkl: '.*{key}'"):
            load_pipeline(BASE, path)


# ---------------------------------------------------------------------------- malicious pickles

PAYLOADS = {
    "os.system": lambda marker: (os.system, (f"touch {marker}",)),
    "subprocess.Popen": lambda marker: (subprocess.Popen, (["touch", str(marker)],)),
    "builtins.eval": lambda marker: (eval, (f"open({str(marker)!r}, 'w')",)),
}


def write_input(folder: Path) -> Path:
    from PIL import Image

    path = folder / "input.png"
    Image.new("RGB", (16, 16), (120, 80, 40)).save(path)
    return path


def malicious_pickle(path: Path, payload: str, marker: Path, legacy: bool, beside_tensors: bool) -> Path:
    class Payload:
        def __reduce__(self):
            return PAYLOADS[payload](marker)

    state = {"payload": Payload()}
    if beside_tensors:
        state = {**torch.load(WEIGHTS, weights_only=True), "payload": Payload()}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize("suffix", [".pkl", ".pt", ".ckpt", ".bin"])
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_malicious_pickles_never_run(tmp_path, payload, suffix):
    from onestep_sr.cli import main as cli

    marker = tmp_path / "PWNED"
    inputs = write_input(tmp_path)
    for legacy in (False, True):
        for beside in (False, True):
            evil = malicious_pickle(tmp_path / f"evil{suffix}", payload, marker, legacy, beside)
            entry_points = [
                lambda evil=evil: load_pipeline(BASE, evil),  # as the SR weights
                lambda evil=evil: load_pipeline(evil, WEIGHTS),  # as a single-file base
                lambda evil=evil: load_pipeline(TSDSR_PARITY / "tiny-sd3", TSDSR_PARITY / "lora", embeddings=evil),
            ]
            for run in entry_points:
                with pytest.raises(CheckpointError):
                    run()
            assert cli(["upscale", "--base", str(BASE), "--weights", str(evil), str(inputs), "-o", str(tmp_path)]) == 2
            assert not marker.exists(), f"{payload} payload ran ({suffix}, legacy={legacy}, beside={beside})"


def test_malicious_pickle_in_a_fresh_process_never_runs(tmp_path):
    """The same through the installed CLI in its own interpreter (nothing imported beforehand by the tests)."""
    marker = tmp_path / "PWNED"
    evil = malicious_pickle(tmp_path / "osediff.pkl", "os.system", marker, legacy=False, beside_tensors=True)
    result = subprocess.run(
        [sys.executable, "-m", "onestep_sr.cli", "upscale", "--base", str(BASE), "--weights", str(evil),
         str(write_input(tmp_path)), "-o", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode != 0 and "refused to load" in result.stderr
    assert not marker.exists()


# ---------------------------------------------------------------------------- runs


def test_hopeless_sizes_are_refused_before_the_input_is_converted(osediff_pipe_fused, monkeypatch):
    from onestep_sr.pipelines import images

    def never(*_):
        raise AssertionError("the input was converted before the size check")

    monkeypatch.setattr(images, "_from_tensor", never)
    huge = torch.zeros(1, 3, 6000, 6000)  # x4: 24000 px on a side, far more than this machine has
    with pytest.raises(InsufficientMemoryError, match=r"24000x24000 output needs about [\d.]+ GiB.*but only"):
        osediff_pipe_fused(huge, upscale=4, output_type="pt")


@contextmanager
def nan_weight(weight: torch.Tensor):
    """The weight filled with NaN inside (a module broken after its load checks), restored after."""
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.fill_(float("nan"))
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_non_finite_decode_is_a_clear_error(osediff_pipe_fused):
    pipe, image = osediff_pipe_fused, torch.rand(3, 16, 16)
    vae_decoder = nan_weight(pipe.vae.decoder.conv_out.weight)
    with vae_decoder, pytest.raises(NonFiniteOutputError, match="VAE decode produced non-finite pixels"):
        pipe(image, upscale=1, output_type="pt")
    unet = nan_weight(pipe.unet.conv_out.weight)
    with unet, pytest.raises(NonFiniteOutputError, match="denoiser produced non-finite latents"):
        pipe(image, upscale=1, output_type="pt")


@pytest.mark.parametrize("key", ["state_dict_unet", "rank_unet", "anything"])
def test_a_broadcast_view_cannot_hang_the_loader(tmp_path, key):
    """A ~1.4 KB pickle holding torch.ones(1).expand(10**7, 10**6) (stride 0: 1e13 values over one stored value)
    is refused from its sizes and strides alone, whatever its key, before any pass over its values."""
    import time

    evil = tmp_path / "osediff.pkl"
    huge = torch.ones(1).expand(10**7, 10**6)
    torch.save({key: huge} if key == "anything" else {**torch.load(WEIGHTS, weights_only=True), key: huge}, evil)
    assert evil.stat().st_size < 10**6 or key != "anything"
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=r"10,000,000,000,000 values .* over a storage of 1"):
        load_pipeline(BASE, evil)
    assert time.monotonic() - start < 5
    # an ordinary non-contiguous (transposed) weight is still accepted
    from onestep_sr.pipelines.loading.files import read_weights

    torch.save({"w": torch.randn(4, 5).t()}, tmp_path / "t.pkl")
    assert read_weights(tmp_path / "t.pkl")["w"].shape == (5, 4)


@pytest.mark.parametrize(
    ("where", "changes", "message"),
    [
        ("unet/config.json", {"layers_per_block": 200000}, r"layers_per_block=200000: more than 1000 layers"),
        ("text_encoder/config.json", {"num_hidden_layers": 100000}, r"num_hidden_layers=100000: more than 1000"),
        ("unet/config.json", {"norm_num_groups": 0}, r"norm_num_groups=0: must be >= 1"),
        ("unet/config.json", {"layers_per_block": 3}, r"implies [\d,]+ parameters but the weights hold [\d,]+"),
        ("scheduler/scheduler_config.json", {"beta_start": 0.02, "beta_end": 0.001}, "beta_start=0.02 > beta_end"),
        ("scheduler/scheduler_config.json", {"beta_end": 1.5}, r"beta_end=1.5; expected a number in \(0, 1\)"),
        ("scheduler/scheduler_config.json", {"prediction_type": "noise"}, "prediction_type='noise'"),
        ("model_index.json", {"text_encoder": ["transformers", "CLIPTokenizer"]}, "is a CLIPTokenizer, not a transf"),
    ],
    ids=["layers", "hidden-layers", "groups-0", "config-vs-weights", "betas-order", "beta-range", "prediction",
         "tokenizer-as-encoder"],
)  # fmt: skip
def test_configs_that_would_fail_later_are_refused_at_load(folder, where, changes, message):
    """Absurd or inconsistent configs are refused from the config alone (before anything is built from it), and
    components that would only fail at their first call fail at load."""
    import time

    edit_json(folder / where, **changes)
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=message):
        OneStepSRPipeline.from_pretrained(folder)
    assert time.monotonic() - start < 30


def test_a_tokenizer_larger_than_its_text_encoder_is_refused(folder):
    path = folder / "tokenizer" / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    vocab.update({f"extra{i}</w>": len(vocab) + i for i in range(2000)})
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"tokenizer has \d+ tokens but text_encoder embeds only \d+"):
        OneStepSRPipeline.from_pretrained(folder)


@pytest.mark.parametrize("rank_key", ["rank_unet", "rank_vae"])
def test_lora_rank_zero_is_a_clear_error(tmp_path, rank_key):
    state = torch.load(WEIGHTS, weights_only=True)
    state[rank_key] = 0
    torch.save(state, tmp_path / "osediff.pkl")
    with pytest.raises(CheckpointError, match=f"{rank_key}=0; a LoRA rank is a whole number >= 1"):
        load_pipeline(BASE, tmp_path / "osediff.pkl")


def test_lora_factors_of_rank_zero_are_refused():
    from onestep_sr.pipelines.loading.lora import LoRAWeights, apply_lora

    layer = torch.nn.Linear(4, 3)
    with pytest.raises(CheckpointError, match="rank 0"):
        apply_lora(layer, LoRAWeights({"": (torch.zeros(0, 4), torch.zeros(3, 0))}, 1.0), fuse=True,
                   adapter_name="x", source="w")  # fmt: skip


def test_a_tokenizer_without_an_unknown_token_is_refused(folder):
    edit_json(folder / "tokenizer" / "tokenizer_config.json", unk_token=None)
    with pytest.raises(CheckpointError, match="tokenizer has no unknown token"):
        OneStepSRPipeline.from_pretrained(folder)
