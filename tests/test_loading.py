"""Loading bases and official weights: formats, single files, bundled configs, and clear errors."""

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import save_file

from onestep_sr import CheckpointError, load_pipeline
from onestep_sr.pipelines.demo_models import build_tiny_sd_base, make_osediff_checkpoint
from onestep_sr.pipelines.loading import SD21_BASE_CONFIG, devices, resolve_dtype
from onestep_sr.pipelines.methods import detect_method

from helpers import OSEDIFF_PARITY, assert_osediff_parity, run_osediff_case
from ldm_checkpoint import write_sd2_single_file

BASE = OSEDIFF_PARITY / "tiny-sd21"
WEIGHTS = OSEDIFF_PARITY / "osediff_tiny.pkl"


@pytest.fixture(scope="module")
def single_file_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    path = write_sd2_single_file(BASE, folder / "tiny-sd21.safetensors")
    config = folder / "config"  # the tiny model's configs without weights, as the bundled SD2.1 folder is
    shutil.copytree(BASE, config, ignore=shutil.ignore_patterns("*.safetensors"))
    return path, config


def test_single_file_base_reproduces_official(single_file_base, parity_cases):
    path, config = single_file_base
    pipe = load_pipeline(path, WEIGHTS, base_config=config)
    pipe.set_progress_bar_config(disable=True)
    for case in parity_cases:
        assert_osediff_parity(run_osediff_case(pipe, case), case)


def test_bundled_sd21_configs_describe_sd21_base():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((SD21_BASE_CONFIG / "unet" / "config.json").read_text()))
        vae = AutoencoderKL.from_config(json.loads((SD21_BASE_CONFIG / "vae" / "config.json").read_text()))
        text = CLIPTextModel(CLIPTextConfig.from_json_file(SD21_BASE_CONFIG / "text_encoder" / "config.json"))
    # published parameter counts of SD2.1-base's UNet, VAE and (penultimate-layer) OpenCLIP ViT-H text encoder
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert sum(p.numel() for p in text.parameters()) == 340_387_840
    tokenizer = CLIPTokenizer.from_pretrained(SD21_BASE_CONFIG / "tokenizer")
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    # CLIP BPE ids: <|startoftext|> a photo of a cat <|endoftext|>, then SD2's "!" padding (id 0)
    assert ids[:8] == [49406, 320, 1125, 539, 320, 2368, 49407, 0] and len(ids) == 77


def test_detects_osediff_and_rejects_unknown_formats(tmp_path):
    assert detect_method(WEIGHTS)[0].id == "osediff"
    other = tmp_path / "other.safetensors"
    save_file({"model.conv.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(CheckpointError, match="unknown SR weight format.*model.conv.weight"):
        load_pipeline(BASE, other)


def test_refuses_pickles_that_carry_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"state_dict_unet": Payload()}))
    with pytest.raises(CheckpointError, match="refused to load"):
        load_pipeline(BASE, evil)


def test_truncated_and_missing_files_name_the_file(tmp_path):
    truncated = tmp_path / "osediff.pkl"
    truncated.write_bytes(WEIGHTS.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="osediff.pkl: could not be read"):
        load_pipeline(BASE, truncated)
    with pytest.raises(CheckpointError, match="weight file not found"):
        load_pipeline(BASE, tmp_path / "nope.pkl")
    with pytest.raises(CheckpointError, match="this folder is not the weights of any supported method"):
        load_pipeline(BASE, tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="unknown file type '.txt'"):
        load_pipeline(BASE, tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="base model not found"):
        load_pipeline(tmp_path / "missing-base", WEIGHTS)
    with pytest.raises(CheckpointError, match="not a diffusers model folder; OSEDiff weights need an SD2.1-base"):
        load_pipeline(tmp_path, WEIGHTS)


def test_weights_for_another_base_are_a_clear_error(tmp_path):
    other_base = build_tiny_sd_base(tmp_path / "other-base")  # different channel widths from tiny-sd21
    with pytest.raises(CheckpointError, match=r"osediff_tiny.pkl: .*wrong base model for these weights\?"):
        load_pipeline(other_base, WEIGHTS)
    # and the matching pair loads and runs
    weights = make_osediff_checkpoint(other_base, tmp_path / "osediff.pkl")
    image = torch.rand(3, 8, 12, generator=torch.Generator().manual_seed(0))
    outputs = []
    for fuse in (True, False):  # fused in place vs peft layers: two independent implementations of the LoRA
        pipe = load_pipeline(other_base, weights, fuse_lora=fuse)
        pipe.set_progress_bar_config(disable=True)
        outputs.append(pipe(image, upscale=2, output_type="pt").images)
    assert outputs[0].shape == (1, 3, 16, 24)
    torch.testing.assert_close(outputs[0], outputs[1], atol=5e-5, rtol=0)


def test_single_file_that_is_not_sd2(tmp_path):
    sd1 = tmp_path / "sd15.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768),
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 4),
        },
        str(sd1),
    )
    with pytest.raises(CheckpointError, match="SD1.x checkpoint"):
        load_pipeline(sd1, WEIGHTS)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="junk.safetensors: not a readable safetensors file"):
        load_pipeline(junk, WEIGHTS)


def test_peft_and_fused_lora_agree(osediff_pipe, osediff_pipe_fused):
    # two independent implementations of the same delta: peft layers vs our in-place W + s*B@A
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 16, 16, generator=g)
    cond = torch.randn(1, 77, 32, generator=g)
    a = osediff_pipe.unet(latents, 999, encoder_hidden_states=cond).sample
    b = osediff_pipe_fused.unet(latents, 999, encoder_hidden_states=cond).sample
    torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    assert not any("lora" in n for n, _ in osediff_pipe_fused.unet.named_parameters())
    assert any("lora_A" in n for n, _ in osediff_pipe.unet.named_parameters())


@pytest.mark.parametrize("fast_bf16,expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_resolve_dtype(monkeypatch, fast_bf16, expected):
    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("fp16", cpu) == torch.float16
    assert resolve_dtype(torch.float16, cpu) == torch.float16
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: fast_bf16)
    assert resolve_dtype("auto", cpu) == expected
    with pytest.raises(ValueError, match="dtype must be one of .*'fp8'"):
        resolve_dtype("fp8", cpu)


@pytest.mark.parametrize("cpuinfo, amx, avx512_bf16, fast", [
    ("vendor_id\t: AuthenticAMD\n", False, True, True),
    ("vendor_id\t: GenuineIntel\n", False, True, False),
    ("vendor_id\t: GenuineIntel\n", True, True, True),
    ("vendor_id\t: AuthenticAMD\n", False, False, False),
])  # fmt: skip
def test_fast_bf16_is_amx_or_amd_with_avx512_bf16(cpuinfo, amx, avx512_bf16, fast, monkeypatch, tmp_path):
    """The rule behind dtype="auto" on the CPU and the VAE attention kernel: the AVX512-BF16 flag alone is not
    enough (an Intel CPU without AMX runs bf16 slower than fp32: measured, see pipelines/cpu.py)."""
    import builtins

    from onestep_sr.pipelines import cpu

    info = tmp_path / "cpuinfo"
    info.write_text(cpuinfo)
    real_open = builtins.open
    monkeypatch.setattr(
        builtins, "open", lambda path, *a, **kw: real_open(info if path == "/proc/cpuinfo" else path, *a, **kw)
    )
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    cpu.cpu_has_fast_bf16.cache_clear()
    try:
        assert cpu.cpu_has_fast_bf16() == fast
    finally:
        cpu.cpu_has_fast_bf16.cache_clear()


def test_unknown_device_and_missing_cuda_are_clear_errors(monkeypatch):
    from onestep_sr.pipelines.loading import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        resolve_device("cuda")
