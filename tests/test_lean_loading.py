"""Model folders read into private memory (pipelines/loading/lean.py): the same weights as `from_pretrained`, no
weight left in a file mapping after `load_pipeline`, and the folders it does not cover handed to the library."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from onestep_sr import load_pipeline
from onestep_sr.pipelines.loading.files import CheckpointError
from onestep_sr.pipelines.loading.lean import lean_load, read_safetensors_private
from onestep_sr.pipelines.loading.validation import component_weight_files, load_component

from helpers import OSEDIFF_PARITY, TADSR_PARITY, TSDSR_PARITY

TINY_SD21 = OSEDIFF_PARITY / "tiny-sd21"
COMPONENTS = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_the_same_weights_as_from_pretrained(name, dtype):
    cls, folder = COMPONENTS[name], TINY_SD21 / name
    lean = lean_load(cls, folder, component_weight_files(folder), dtype)
    assert lean is not None
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    reference = cls.from_pretrained(folder, local_files_only=True, **kwargs)
    want, got = reference.state_dict(), lean.state_dict()
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    assert {b.dtype for b in lean.buffers()} == {b.dtype for b in reference.buffers()}
    assert not lean.training


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16])
def test_pieces_read_by_several_threads_give_every_byte(tmp_path, monkeypatch, dtype):
    """Tensors split into pieces that straddle their ends (odd piece size), read by 3 threads, cast or not: the
    same values as safetensors' own reader, integers never cast."""
    from onestep_sr.pipelines.loading import lean

    generator = torch.Generator().manual_seed(0)
    state = {
        "big.fp16": torch.randn(37, 53, generator=generator).half(),
        "big.fp32": torch.randn(4099, generator=generator),
        "small.bf16": torch.randn(3, generator=generator).bfloat16(),
        "empty": torch.zeros(0, 5),
        "index": torch.arange(1000, dtype=torch.int64),
        "mask": torch.arange(10) % 3 == 0,
    }
    path = tmp_path / "mixed.safetensors"
    save_file(state, str(path))
    monkeypatch.setattr(lean, "PIECE_BYTES", 1000)
    monkeypatch.setattr(lean, "CAST_CHUNK", 77)  # fp16 <-> bf16 casts go through float32 in chunks: edges too
    monkeypatch.setattr(lean, "READER_THREADS", 3)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    got = read_safetensors_private(path, dtype)
    assert got.keys() == state.keys()
    for key, value in load_file(str(path)).items():
        want = value.to(dtype) if dtype is not None and value.is_floating_point() else value
        assert got[key].dtype == want.dtype and torch.equal(got[key], want), key
    assert read_safetensors_private(path, dtype, {"index"}).keys() == {"index"}


@pytest.mark.parametrize("source,target", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_half_to_half_casts_through_float32_round_as_from_float64(source, target, monkeypatch):
    """Every bit pattern of one half type (NaNs aside) cast to the other, a chunk of float32 at a time: the value
    that rounding the exact float64 value gives, infinities and signed zeros included."""
    from onestep_sr.pipelines.loading import lean

    monkeypatch.setattr(lean, "CAST_CHUNK", 1000)
    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(source)
    values = values[~torch.isnan(values)]
    got = torch.empty(values.shape, dtype=target)
    lean.cast_copy(got, values, {})
    want = values.double().to(target)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def file_mappings(suffix: str = ".safetensors") -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[5].endswith(suffix):
            low, high = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((low, high))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_no_unet_or_vae_weight_lives_in_a_file_mapping_after_load_pipeline():
    """`from_pretrained` leaves weights as views of the memory-mapped files; the UNet's and the VAE's (the bulk)
    own their memory here, so no file stays mapped for them."""
    pipe = load_pipeline(TINY_SD21, OSEDIFF_PARITY / "osediff_tiny.pkl", dtype="fp32")
    mapped = file_mappings()
    tensors = [t for m in (pipe.unet, pipe.vae) for t in (*m.parameters(), *m.buffers())]
    inside = [t.shape for t in tensors if any(low <= t.data_ptr() < high for low, high in mapped)]
    assert tensors and inside == []
    # (what the library's own load does, for contrast: its weights are views of the file)
    reference = UNet2DConditionModel.from_pretrained(TINY_SD21 / "unet", local_files_only=True)
    mapped = file_mappings()
    assert any(any(low <= p.data_ptr() < high for low, high in mapped) for p in reference.parameters())


def test_text_encoders_go_to_the_library():
    """transformers 5 renames the official CLIP keys (`text_model.*`) as it loads: the lean path declines and
    `load_component` gives the library's weights."""
    folder = TINY_SD21 / "text_encoder"
    assert lean_load(CLIPTextModel, folder, component_weight_files(folder), None) is None
    loaded = load_component(CLIPTextModel, TINY_SD21, "text_encoder")
    reference = CLIPTextModel.from_pretrained(folder, local_files_only=True)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_folders_it_does_not_cover_go_to_the_library(tmp_path):
    """A VAE folder with the old attention names (query/key/value/proj_attn, as 2022 diffusers saved it) needs the
    library's renames: the lean path declines, `load_component` still loads it, with the same weights."""
    folder = tmp_path / "vae"
    shutil.copytree(TINY_SD21 / "vae", folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    old_names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    state = {}
    for key, value in load_file(weights).items():
        for new, old in old_names.items():
            key = key.replace(new, old)
        state[key] = value
    assert any(".query." in k for k in state)
    save_file(state, str(weights))
    assert lean_load(AutoencoderKL, folder, [weights], None) is None
    loaded = load_component(AutoencoderKL, folder)
    reference = AutoencoderKL.from_pretrained(TINY_SD21 / "vae", local_files_only=True)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_a_cut_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "cut.safetensors"
    data = (TINY_SD21 / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut short|truncated"):
        read_safetensors_private(path)


@pytest.mark.parametrize("rank", [4, 64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(96, 40, 3, 3), (70, 33)])
def test_lora_fusion_in_row_blocks_equals_one_float64_product(shape, channels_last, rank, monkeypatch):
    """Fusing a few output rows at a time (bounded float64 workspace) gives the whole-layer float64 result bit for
    bit, in either memory format, across uneven blocks."""
    from onestep_sr.pipelines.loading import lora

    monkeypatch.setattr(lora, "FUSION_BLOCK_VALUES", 7 * 40 * 9)  # blocks of 7 rows (conv) / 763 // 33 (linear)
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Conv2d(shape[1], shape[0], 3) if len(shape) == 4 else torch.nn.Linear(shape[1], shape[0])
    if channels_last and len(shape) == 4:
        layer.to(memory_format=torch.channels_last)
    a = torch.randn(rank, *shape[1:], generator=generator) * 0.05
    b = torch.randn(shape[0], rank, *((1, 1) if len(shape) == 4 else ()), generator=generator) * 0.05
    delta = (b.double().reshape(shape[0], -1) @ a.double().reshape(rank, -1)).reshape(shape)
    expected = (layer.weight.detach().double() + 2.0 * delta).float()
    lora.fuse_lora_delta(layer, a, b, 2.0)
    assert torch.equal(layer.weight.detach(), expected)
    layout = torch.channels_last if channels_last and len(shape) == 4 else torch.contiguous_format
    assert layer.weight.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "expanded"])
def test_the_finiteness_check_agrees_with_isfinite(dtype, layout, monkeypatch):
    """The load-time check (a sum in the weight's own dtype, then an exact check a chunk at a time) against
    torch.isfinite on every value: NaN or Inf anywhere, in any memory order, and fp16 weights whose finite total
    overflows fp16 (the sum alone would call them corrupted)."""
    from onestep_sr.pipelines.loading import validation

    monkeypatch.setattr(validation, "FINITE_CHECK_CHUNK", 1000)  # several chunks, the last one short
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, 9, 11, generator=generator, dtype=torch.float64)

    def arranged(values: torch.Tensor) -> torch.Tensor:
        values = values.to(dtype)
        if layout == "channels_last":
            return values.contiguous(memory_format=torch.channels_last)
        if layout == "transposed":
            return values.transpose(1, 3)
        if layout == "expanded":
            return values[:1].expand(40, -1, -1, -1)
        return values

    cases = [base, base.abs() * 0 + 6.0e4]  # the second sums past fp16's 65504, every value finite
    for position in (0, 137, 2969):  # first chunk, inside, last (short) chunk
        for bad in (float("nan"), float("inf"), float("-inf")):
            broken = base.clone()
            broken.view(-1)[position if layout != "expanded" else position % 495] = bad
            cases.append(broken)
    for values in cases:
        tensor = arranged(values)
        assert validation.all_finite(tensor) == bool(torch.isfinite(tensor).all())
    assert validation.all_finite(arranged(base)[:0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_in_place_a_few_rows_at_a_time(dtype, monkeypatch):
    """The conversion through a small scratch buffer (uneven blocks of output channels) gives the values and the
    layout of `.contiguous(memory_format=channels_last)`, inside each weight's own storage."""
    from onestep_sr.pipelines.loading import devices

    monkeypatch.setattr(devices, "CHANNELS_LAST_BLOCK_BYTES", 3 * 40 * 9 * 4)  # 3 rows (fp32), 6 (bf16) of 96
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(40, 96, 3), torch.nn.Conv2d(96, 7, 1), torch.nn.Linear(4, 5)).to(dtype)
    expected = {
        k: v.contiguous(memory_format=torch.channels_last if v.ndim == 4 else torch.contiguous_format)
        for k, v in model.state_dict().items()
    }
    storages = {k: v.untyped_storage().data_ptr() for k, v in model.state_dict().items()}
    devices.to_channels_last_in_place(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]) and value.stride() == expected[key].stride(), key
        assert value.untyped_storage().data_ptr() == storages[key], key


def resident_kib_of(path: Path) -> int:
    """Resident kB of this process's mappings of `path` (/proc/self/smaps)."""
    target, total, inside = str(path.resolve()), 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = len(fields) == 6 and fields[5] == target
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps (Linux)")
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_read_weight_files_leave_no_file_pages_resident(tmp_path, suffix):
    """`read_weights` memory-maps a .pth (torch.load) or .safetensors file and reads every value (the checks); the
    pages it read go back as it goes, the values stay what the file holds when read again, and a tensor outside the
    mapping is never touched."""
    from onestep_sr.pipelines.loading.files import MappedPages, read_weights

    generator = torch.Generator().manual_seed(0)
    saved = {f"w{i}": torch.randn(257, 1031, generator=generator) for i in range(8)}  # 8 MiB, unaligned records
    path = tmp_path / f"weights{suffix}"
    torch.save(saved, path) if suffix == ".pth" else save_file(saved, str(path))
    state = read_weights(path)
    mib = 2**10
    assert resident_kib_of(path) < mib  # 8 MiB read, < 1 MiB (the records' edge pages) resident
    assert all(torch.equal(state[k], v) for k, v in saved.items())  # faulted in again, unchanged
    assert resident_kib_of(path) > 7 * mib
    pages = MappedPages(path)
    for value in state.values():
        pages.release(value)
    assert resident_kib_of(path) < mib
    private = saved["w0"].clone()
    pages.release(private)  # not inside the file's mapping: untouched (DONTNEED on private memory would zero it)
    assert torch.equal(private, saved["w0"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resshift_family_loads_one_copy_in_the_target_dtype(dtype):
    """The UNet and the VQGAN built without storage and given private copies in the target dtype: the same values
    as the official float32 state cast once, buffers included, and nothing left in the .pth mappings."""
    from onestep_sr.pipelines.loading.bases import vq_state_from_ldm

    vq_path, unet_path = (TADSR_PARITY / "models" / n for n in ("autoencoder_vq_f4_tiny_A.pth", "tadsr_tiny_A.pth"))
    pipe = load_pipeline(vq_path, unet_path, dtype=dtype)
    official = torch.load(unet_path, weights_only=True)
    vq_official = vq_state_from_ldm(torch.load(vq_path, weights_only=True), len(pipe.vae.config.block_out_channels))
    for module, state in ((pipe.unet, official), (pipe.vae, vq_official)):
        mine = module.state_dict()
        weights = {k: v for k, v in state.items() if k in mine and not k.endswith("relative_position_index")}
        assert len(weights) == len(list(module.parameters()))
        assert all(mine[k].dtype == dtype and torch.equal(mine[k], v.to(dtype)) for k, v in weights.items())
        assert all(b.dtype == dtype for b in module.buffers() if b.is_floating_point())
    mapped = file_mappings(".pth")
    tensors = [t for m in (pipe.unet, pipe.vae) for t in (*m.parameters(), *m.buffers())]
    assert not [t.shape for t in tensors if any(low <= t.data_ptr() < high for low, high in mapped)]


LOADS = {
    "osediff": lambda: (TINY_SD21, OSEDIFF_PARITY / "osediff_tiny.pkl", {}),
    "tsdsr": lambda: (TSDSR_PARITY / "tiny-sd3", TSDSR_PARITY / "lora", {"embeddings": TSDSR_PARITY / "embeddings"}),
    "resshift": lambda: (
        TADSR_PARITY / "models" / "autoencoder_vq_f4_tiny_A.pth",
        TADSR_PARITY / "models" / "tadsr_tiny_A.pth",
        {},
    ),
}


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("family", sorted(LOADS))
def test_loads_under_inference_mode_as_comfyui_runs_nodes(family, dtype, monkeypatch):
    """ComfyUI executes nodes under `torch.inference_mode()`: tensors made there are inference tensors, which a
    thread outside inference mode may not write in place (the reader threads did, where they cast). The load
    gives the same weights as outside it, read by several threads in small pieces."""
    from onestep_sr.pipelines.loading import lean

    monkeypatch.setattr(lean, "PIECE_BYTES", 4096)
    monkeypatch.setattr(lean, "READER_THREADS", 3)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    base, weights, kwargs = LOADS[family]()
    with torch.inference_mode():
        inside = load_pipeline(base, weights, dtype=dtype, **kwargs)
    outside = load_pipeline(base, weights, dtype=dtype, **kwargs)
    for name in ("unet", "transformer", "vae"):
        module = getattr(inside, name, None)
        if module is None:
            continue
        got, want = module.state_dict(), getattr(outside, name).state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), name
        assert all(p.is_inference() for p in module.parameters())
