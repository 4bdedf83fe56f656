"""Shared test helpers: paths to the test data and the OSEDiff parity cases."""

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

DATA = Path(__file__).parent / "data"


def parity_root() -> Path:
    """Where every parity suite reads its data: tests/data/parity, or the root ONESTEP_SR_PARITY_ROOT names (a
    second set of cases in the same layout runs unchanged)."""
    return Path(os.environ.get("ONESTEP_SR_PARITY_ROOT") or DATA / "parity")


def parity_dir(name: str) -> Path:
    folder = parity_root() / name
    if not folder.is_dir():
        raise FileNotFoundError(f"parity data {folder} is missing (ONESTEP_SR_PARITY_ROOT={parity_root()})")
    return folder


# every node the pack registers, in registration order
NODE_IDS = [
    "OneStepSRModelLoader",
    "OneStepSRPrompt",
    "OneStepSRUpscale",
    "OneStepSRTileSplit",
    "OneStepSRTileStitch",
    "OneStepSRTaggerLoader",
    "OneStepSRPromptExtractor",
]
OSEDIFF_PARITY = parity_root() / "osediff"


def osediff_cases() -> list[dict]:
    return json.loads((OSEDIFF_PARITY / "cases.json").read_text())["cases"]


class ParityCase:
    def __init__(self, record: dict):
        self.record = record
        self.name = record["name"]
        self.dir = OSEDIFF_PARITY / record["dir"]
        self.prompt = record["prompt"]
        self.seed = record["seed"]
        self.lq = load_file(self.dir / "input.safetensors")["lq"]  # [-1, 1]
        self.out = load_file(self.dir / "output_raw.safetensors")["out"]  # [-1, 1]
        self.colorfix = load_file(self.dir / "colorfix.safetensors")
        self.intermediates = load_file(self.dir / "intermediates.safetensors")

    @property
    def official_size_needed_no_flooring(self) -> bool:
        w, h = self.record["lr_size_wh"]
        return self.record["model_input_size_wh"] == [w * self.record["upscale"], h * self.record["upscale"]]

    def png(self, name: str) -> Image.Image:
        return Image.open(self.dir / name)

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


# The OSEDiff parity tolerance (justified in test_parity_osediff.py's docstring).
OSEDIFF_RAW_ATOL = 1e-4


def run_osediff_case(pipe, case, **kwargs):
    """The official call: torch.manual_seed(seed); forward(lq, prompt) -- with our public API."""
    kwargs.setdefault("upscale", 1)
    kwargs.setdefault("color_fix", "none")
    image = kwargs.pop("image", case.lq * 0.5 + 0.5)
    result = pipe(
        image, prompt=case.prompt, latent_sampling="sample", generator=case.generator(), output_type="pt", **kwargs
    )
    return result.images


def assert_osediff_parity(images, case):
    diff = (images * 2 - 1 - case.out[0]).abs().max().item()
    assert diff <= OSEDIFF_RAW_ATOL, f"{case.name}: max |ours - official| = {diff:.3g} > {OSEDIFF_RAW_ATOL}"


def png_to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]


TSDSR_PARITY = parity_root() / "tsdsr"
DAPE_PARITY = parity_root() / "dape"
TADSR_PARITY = parity_root() / "tadsr"


class TSDSRCase:
    def __init__(self, record: dict):
        self.record = record
        self.id = record["id"]
        self.seed = record["seed"]
        self.lora_dir = TSDSR_PARITY / record["lora_dir"]
        cases = TSDSR_PARITY / "cases"
        self.input = load_file(cases / f"{self.id}_input.safetensors")
        self.latent = load_file(cases / f"{self.id}_latent.safetensors")
        self.raw = load_file(cases / f"{self.id}_raw.safetensors")["image"]  # [-1, 1]
        self.colorfix = {m: load_file(cases / f"{self.id}_{m}.safetensors")["result"] for m in ("wavelet", "adain")}

    def png(self, suffix: str) -> Image.Image:
        return Image.open(TSDSR_PARITY / "cases" / f"{self.id}_{suffix}.png")

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


# The TSD-SR parity tolerance (justified in test_parity_tsdsr.py's docstring).
TSDSR_RAW_ATOL = 1e-4


def run_tsdsr_case(pipe, case, image=None, upscale=1, color_fix="none"):
    """A TSD-SR parity case through the public __call__, with the case's seed (the official posterior draw)."""
    image = case.input["pixel_values"] * 0.5 + 0.5 if image is None else image
    return pipe(
        image,
        upscale=upscale,
        color_fix=color_fix,
        latent_sampling="sample",
        generator=case.generator(),
        output_type="pt",
    ).images


def tsdsr_raw_diff(images, case) -> float:
    return (images[0] * 2 - 1 - case.raw).abs().max().item()


def tsdsr_cases() -> list[TSDSRCase]:
    return [TSDSRCase(r) for r in json.loads((TSDSR_PARITY / "cases.json").read_text())["cases"]]


def make_comfy_models(root: Path) -> tuple[Path, Path]:
    """A ComfyUI-style models folder with the tiny models under the file names the workflows expect, and an
    input folder holding example.png. Returns (models, input)."""
    import shutil

    models = root / "models"
    shutil.copytree(OSEDIFF_PARITY / "tiny-sd21", models / "diffusers" / "stable-diffusion-2-1-base")
    shutil.copytree(TSDSR_PARITY / "tiny-sd3", models / "diffusers" / "stable-diffusion-3-medium-diffusers")
    (models / "onestep_sr" / "tsdsr").mkdir(parents=True)
    shutil.copy(OSEDIFF_PARITY / "osediff_tiny.pkl", models / "onestep_sr" / "osediff.pkl")
    for f in (
        "lora/transformer.safetensors",
        "lora/vae.safetensors",
        "embeddings/prompt_embeds.pt",
        "embeddings/pool_embeds.pt",
    ):
        shutil.copy(TSDSR_PARITY / f, models / "onestep_sr" / "tsdsr")
    shutil.copy(DAPE_PARITY / "model" / "ram_tiny_base.pth", models / "onestep_sr" / "ram_swin_large_14m.pth")
    shutil.copy(DAPE_PARITY / "model" / "dape_tiny.pth", models / "onestep_sr" / "DAPE.pth")
    shutil.copy(TADSR_PARITY / "models" / "tadsr_tiny_A.pth", models / "onestep_sr" / "TAD-SR.pth")
    shutil.copy(
        TADSR_PARITY / "models" / "autoencoder_vq_f4_tiny_A.pth", models / "onestep_sr" / "autoencoder_vq_f4.pth"
    )
    write_tiny_d3sr(models / "onestep_sr" / "d3sr.safetensors")
    (models / "checkpoints").mkdir()
    inputs = root / "input"
    inputs.mkdir()
    shutil.copy(OSEDIFF_PARITY / "cases" / "s1_cat_32x24" / "lr.png", inputs / "example.png")
    return models, inputs


def write_tiny_d3sr(path: Path) -> Path:
    """A D3SR checkpoint on the tiny SD2.1 (this package's format; there are no official weights): a fresh
    generator with seeded random LoRA factors and prompt embedding, so it differs from the base."""
    import torch

    from onestep_sr.pipelines.methods import d3sr

    pipe = d3sr.build_untrained(OSEDIFF_PARITY / "tiny-sd21", timestep=500)
    g = torch.Generator().manual_seed(19)
    with torch.no_grad():
        for p in d3sr.trainable(pipe).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return d3sr.write_weights(pipe, path)


def tadsr_case_records() -> list[dict]:
    return json.loads((TADSR_PARITY / "cases.json").read_text())["cases"]


def tadsr_one_step_cases() -> list[str]:
    """The TAD-SR cases run whole (not the official chopped-patch case), from cases.json."""
    return [r["name"] for r in tadsr_case_records() if "chop_size" not in r]


def accelerate_launch(processes: int) -> list[str]:
    """`accelerate launch --multi_gpu --num_processes N` (N CPU processes on gloo on this machine), every default
    stated (no config file is read), on a free port."""
    import socket
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
    ]  # fmt: skip
