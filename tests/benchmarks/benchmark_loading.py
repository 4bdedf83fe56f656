"""Load time and memory of `load_pipeline` on FULL-SIZE files (random weights), in fp32, bf16 and the default dtype.

Not part of the test suite. One command (writes about 10 GB of weight files once, under --dir):

    python tests/benchmarks/benchmark_loading.py          # table on stdout, JSON in bench_out/

Families: OSEDiff (a full-size SD2.1-base diffusers folder: UNet, VAE, OpenCLIP-H text encoder; plus osediff.pkl
with rank-4 LoRA, as released; D3SR loads the same way), the ResShift family (TAD-SR / SinSR: the 118.6 M UNet .pth
and ResShift's VQGAN-f4 .pth) and TSD-SR (a full-size SD3-medium folder, transformer and VAE in fp16 as released, no
text encoder since TSD-SR uses fixed prompt embeddings; rank-64 LoRA on the official targets). Each row runs in its
own process after the imports: load seconds, `ready` seconds (the load plus reading every weight once, as a first
image must: a memory-mapped load pays its reads there), resident memory before the load, its peak during the load
(VmHWM) and after it, the peak of private memory alone (RssAnon, sampled every millisecond: no file or library
pages), and the loaded weights' own bytes. The `reference` rows read the same files the way the official scripts do
(diffusers `from_pretrained` of the components, or `torch.load` + `load_state_dict`; the LoRA file read, not
applied), without LoRA fusion or any check: the time to beat. `reference-bf16` makes the same calls for bf16
(`torch_dtype=` for diffusers models, `.to()` after `load_state_dict` for the .pth ones): the official way to the
dtype that `dtype="auto"` picks on a CPU with fast bf16 or on a GPU. `official` / `official-bf16` re-enact the
official inference scripts' whole build for OSEDiff and TSD-SR (fp32 `from_pretrained`, peft adapters with the released
LoRA config, the factors copied in, unmerged as by default, then `.to(dtype)`: their half-precision recipe, here in
bf16): what a user of the official code waits for; for the ResShift family that is the reference row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from benchmark_tiling import peak_rss_gib, smooth_lq, status_gib  # (this folder is on sys.path when the script runs)
from benchmark_training import reset_peak_rss, row_in_subprocess

GIB = 2**30


def write_files(folder: Path) -> dict[str, Path]:
    """The full-size files (random weights), written once."""
    import torch

    files = {
        "sd21": folder / "sd21-base",
        "osediff": folder / "osediff.pkl",
        "vq": folder / "autoencoder_vq_f4.pth",
        "tadsr": folder / "TAD-SR.pth",
    }
    if all(p.exists() for p in files.values()):
        return files
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, VQModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from onestep_sr import OneStepSRResShiftPipeline, ResShiftUNet
    from onestep_sr.pipelines.demo_models import SD_SCHEDULER, make_osediff_checkpoint, write_offline_clip_tokenizer
    from onestep_sr.pipelines.loading import SD21_BASE_CONFIG
    from onestep_sr.pipelines.loading.bases import RESSHIFT_VQ_F4_CONFIG
    from onestep_sr.pipelines.methods.resshift import write_weights

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ldm_checkpoint import vae_to_ldm

    torch.manual_seed(0)
    base = files["sd21"]
    UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD21_BASE_CONFIG / "unet")).save_pretrained(
        base / "unet"
    )
    AutoencoderKL.from_config(AutoencoderKL.load_config(SD21_BASE_CONFIG / "vae")).save_pretrained(base / "vae")
    text_config = json.loads((SD21_BASE_CONFIG / "text_encoder" / "config.json").read_text())
    CLIPTextModel(CLIPTextConfig(**text_config)).save_pretrained(base / "text_encoder")
    DDPMScheduler(**SD_SCHEDULER).save_pretrained(base / "scheduler")
    write_offline_clip_tokenizer(base / "tokenizer")
    (base / "model_index.json").write_text((SD21_BASE_CONFIG / "model_index.json").read_text())
    make_osediff_checkpoint(base, files["osediff"], rank=4)
    vq = VQModel(**RESSHIFT_VQ_F4_CONFIG)
    ldm = {k.removeprefix("first_stage_model."): v for k, v in vae_to_ldm(vq).items()}
    torch.save(ldm, files["vq"])
    from onestep_sr.pipelines.loading.bases import load_vq_f4

    pipe = OneStepSRResShiftPipeline(vae=load_vq_f4(files["vq"]), unet=ResShiftUNet(), method="tadsr")
    write_weights(pipe, files["tadsr"])
    return files


TSDSR_TARGETS = (
    "to_k",
    "to_q",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "proj",
    "linear",
    "proj_out",
)  # fmt: skip  (the official LoraConfig's target_modules, matched as peft matches them)


def write_tsdsr_files(folder: Path) -> dict[str, Path]:
    """A full-size SD3-medium folder (transformer and VAE in fp16, as released; TSD-SR needs no text encoder) and
    TSD-SR weights: rank-64 LoRA on the official targets (transformer, VAE encoder) and the prompt embeddings."""
    import torch

    files = {"sd3": folder / "sd3-medium", "tsdsr": folder / "tsdsr"}
    if all(p.exists() for p in files.values()):
        return files
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from safetensors.torch import save_file

    from onestep_sr.pipelines.loading import SD3_MEDIUM_CONFIG

    torch.manual_seed(0)
    base, rank = files["sd3"], 64
    for name, cls in (("transformer", SD3Transformer2DModel), ("vae", AutoencoderKL)):
        model = cls.from_config(cls.load_config(SD3_MEDIUM_CONFIG / name)).to(torch.float16)
        model.save_pretrained(base / name)
        del model
    FlowMatchEulerDiscreteScheduler.from_pretrained(SD3_MEDIUM_CONFIG / "scheduler").save_pretrained(base / "scheduler")
    (base / "model_index.json").write_text((SD3_MEDIUM_CONFIG / "model_index.json").read_text())
    files["tsdsr"].mkdir(parents=True, exist_ok=True)
    for name, cls in (("transformer", SD3Transformer2DModel), ("vae", AutoencoderKL)):
        with init_empty_weights():
            model = cls.from_config(cls.load_config(SD3_MEDIUM_CONFIG / name))
        state = {}
        for module_name, module in model.named_modules():
            if name == "vae" and not module_name.startswith("encoder."):
                continue
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            if name == "transformer" and not any(
                module_name == t or module_name.endswith("." + t) for t in TSDSR_TARGETS
            ):
                continue
            w = module.weight
            a_shape = (rank, *w.shape[1:])
            b_shape = (w.shape[0], rank) if w.ndim == 2 else (w.shape[0], rank, 1, 1)
            state[f"transformer.{module_name}.lora_A.weight"] = torch.randn(a_shape) * 0.01
            state[f"transformer.{module_name}.lora_B.weight"] = torch.randn(b_shape) * 0.01
        save_file(state, str(files["tsdsr"] / f"{name}.safetensors"))
    save_file(
        {"prompt_embeds": torch.randn(333, 4096), "pool_embeds": torch.randn(2048)},
        str(files["tsdsr"] / "embeddings.safetensors"),
    )
    return files


def weights_gib(modules) -> float:
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()]) / GIB


class PeakSampler:
    """The highest value of a /proc/self/status memory line, sampled every millisecond by a thread until stop().
    For RssAnon (private memory): VmHWM also counts pages of files and shared libraries, e.g. the tens of MiB of
    torch kernels a first bf16 load runs for the first time."""

    def __init__(self, field: str):
        import threading

        self.field, self.peak, self.running = field, status_gib(field), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, status_gib(self.field))
            time.sleep(0.001)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return max(self.peak, status_gib(self.field))


def official_build(family: str, files: dict[str, Path], dtype) -> list:
    """The official inference scripts' build, re-enacted from their documented steps (../shared/docs): fp32
    `from_pretrained`, peft adapters added with the released LoRA config, the file's factors copied into them
    (unmerged, the scripts' default), then the models cast to the inference dtype (their half-precision recipe)."""
    import torch
    from diffusers import AutoencoderKL
    from peft import LoraConfig

    if family == "osediff":
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        base = files["sd21"]
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
        text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
        ckpt = torch.load(files["osediff"], weights_only=True)
        adapters = {"default_encoder": "encoder", "default_decoder": "decoder", "default_others": "others"}
        for adapter, part in adapters.items():
            targets = ckpt[f"unet_lora_{part}_modules"]
            unet.add_adapter(
                LoraConfig(r=ckpt["rank_unet"], init_lora_weights="gaussian", target_modules=targets), adapter
            )
        targets = ckpt["vae_lora_encoder_modules"]
        vae.add_adapter(
            LoraConfig(r=ckpt["rank_vae"], init_lora_weights="gaussian", target_modules=targets), "default_encoder"
        )
        for model, state in ((unet, ckpt["state_dict_unet"]), (vae, ckpt["state_dict_vae"])):
            params = dict(model.named_parameters())
            assert set(state) <= set(params), "the official build left LoRA factors out"
            for name, value in state.items():
                params[name].data.copy_(value)
        unet.set_adapter(list(adapters))
        vae.set_adapter(["default_encoder"])
        models = [unet, vae, text_encoder]
    else:
        from diffusers import SD3Transformer2DModel
        from safetensors.torch import load_file

        base = files["sd3"]
        models = [
            SD3Transformer2DModel.from_pretrained(base, subfolder="transformer"),
            AutoencoderKL.from_pretrained(base, subfolder="vae"),
        ]
        for model, name in zip(models, ("transformer", "vae")):
            state = load_file(files["tsdsr"] / f"{name}.safetensors")
            rank = next(v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight"))
            # the transformer's official targets; the VAE's are the layers the file holds factors for
            factored = {k.removeprefix("transformer.").removesuffix(".lora_A.weight") for k in state if "lora_A" in k}
            targets = list(TSDSR_TARGETS) if name == "transformer" else sorted(factored)
            model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets))
            for n, param in model.named_parameters():
                if "default" in n:
                    param.data.copy_(state.pop("transformer." + n.replace(".default", "")))
            assert not state, "the official build left LoRA factors out"
    return [m.to(dtype) for m in models]


def official_osediff_image(models: list, lq):
    """The official OSEDiff forward on a loaded official build, as documented (../shared/docs/methods-osediff.md
    1.3): bicubic 4x, text embedding of the empty prompt, VAE encode, one UNet step at t = 999, x0 from the DDPM
    formula, decode, AdaIN colour fix. (The official script samples the posterior; its mean costs the same.)"""
    import torch
    import torch.nn.functional as F

    unet, vae, text_encoder = models
    dtype = unet.dtype
    with torch.no_grad():
        up = F.interpolate(lq[None], scale_factor=4, mode="bicubic").clamp(0, 1)
        config = text_encoder.config  # the empty prompt: start, end, padding (ids kept inside a tiny test vocabulary)
        ids = torch.tensor([[config.bos_token_id, config.eos_token_id] + [0] * 75]) % config.vocab_size
        prompt = text_encoder(ids)[0]
        z = vae.encode((up * 2 - 1).to(dtype)).latent_dist.mode() * 0.18215
        eps = unet(z, 999, encoder_hidden_states=prompt).sample
        alpha = (torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2).neg().add(1).prod()
        x0 = (z - (1 - alpha) ** 0.5 * eps) / alpha**0.5
        out = (vae.decode(x0 / 0.18215).sample.float().clamp(-1, 1) + 1) / 2
        mean, std = out.mean((2, 3), keepdim=True), out.std((2, 3), keepdim=True)
        return (out - mean) / std * up.std((2, 3), keepdim=True) + up.mean((2, 3), keepdim=True)


def load_row(family: str, config: str, folder: Path, first_image: bool = False) -> dict:
    import torch

    from onestep_sr import load_pipeline
    from onestep_sr.pipelines.loading import resolve_dtype

    torch.set_num_threads(os.cpu_count() or 1)
    files = write_tsdsr_files(folder) if family == "tsdsr" else write_files(folder)
    named = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    reference, _, reference_dtype = config.partition("-")
    official = reference == "official"
    reference = reference in ("reference", "official")
    if reference:  # "reference" in fp32, "reference-bf16": the same official calls asked for that dtype
        dtype = named[reference_dtype or "fp32"]
    else:
        dtype = named[config] if config in named else resolve_dtype("auto", torch.device("cpu"))
    if reference:
        import diffusers  # noqa: F401  (imports paid before the clock starts, as for the other rows)
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel
    before, private_before = status_gib("VmRSS"), status_gib("RssAnon")
    reset_peak_rss()
    private_peak = PeakSampler("RssAnon")
    start = time.perf_counter()
    if official and family != "resshift":
        modules = official_build(family, files, dtype)
    elif reference and family == "osediff":
        base = files["sd21"]
        modules = [
            UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=dtype),
            AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=dtype),
            CLIPTextModel.from_pretrained(base, subfolder="text_encoder", torch_dtype=dtype),
        ]
        torch.load(files["osediff"], weights_only=True)  # the LoRA, read (the official script then wraps it)
    elif reference and family == "tsdsr":
        from diffusers import SD3Transformer2DModel
        from safetensors.torch import load_file

        base = files["sd3"]
        modules = [
            SD3Transformer2DModel.from_pretrained(base, subfolder="transformer", torch_dtype=dtype),
            AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=dtype),
        ]
        for name in ("transformer", "vae"):  # the LoRA, read (the official script then wraps it)
            load_file(files["tsdsr"] / f"{name}.safetensors")
    elif reference:
        from diffusers import VQModel

        from onestep_sr import ResShiftUNet
        from onestep_sr.pipelines.loading.bases import RESSHIFT_VQ_F4_CONFIG, vq_state_from_ldm

        unet = ResShiftUNet()
        unet.load_state_dict(torch.load(files["tadsr"], weights_only=True)["state_dict"], strict=False)
        vq = VQModel(**RESSHIFT_VQ_F4_CONFIG)
        vq.load_state_dict(vq_state_from_ldm(torch.load(files["vq"], weights_only=True), 3), strict=False)
        modules = [unet.to(dtype), vq.to(dtype)]  # (the official scripts' half-precision recipe casts the models)
    else:
        base, weights = {
            "osediff": (files.get("sd21"), files.get("osediff")),
            "resshift": (files.get("vq"), files.get("tadsr")),
            "tsdsr": (files.get("sd3"), files.get("tsdsr")),
        }[family]
        pipe = load_pipeline(base, weights, dtype=dtype)
        modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    seconds = time.perf_counter() - start
    for module in modules:  # every weight read once, as the first image must: a mapped file pays its reads here
        for tensor in (*module.parameters(), *module.buffers()):
            tensor.detach().sum()
    ready = time.perf_counter() - start
    private = private_peak.stop()
    weights = weights_gib(modules)
    peak, after = peak_rss_gib(), status_gib("VmRSS")
    first_image_s = None
    if first_image and family == "osediff" and (official or not reference):
        lq = smooth_lq(128)
        if official:
            image = official_osediff_image(modules, lq)
        else:
            pipe.set_progress_bar_config(disable=True)
            image = pipe(lq, upscale=4, output_type="pt").images
        assert image.shape[-1] == 512 and torch.isfinite(image).all()
        first_image_s = round(time.perf_counter() - start, 2)
    return {
        "family": family,
        "config": config,
        "dtype": str(dtype).replace("torch.", ""),
        "load_s": round(seconds, 2),
        "ready_s": round(ready, 2),
        "weights_gib": round(weights, 3),
        "before_gib": round(before, 2),
        "peak_gib": round(peak, 2),
        "after_gib": round(after, 2),
        "peak_over_weights": round((peak - before) / weights, 3),
        "private_peak_over_weights": round((private - private_before) / weights, 3),
        "after_over_weights": round((after - before) / weights, 3),
        "first_image_s": first_image_s,
    }


def first_image_column(row: dict) -> str:
    return "" if row.get("first_image_s") is None else f"{row['first_image_s']:.1f}s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("bench_out/loading_files"), help="where the files go")
    parser.add_argument(
        "--families", default="osediff,resshift,tsdsr", help="tsdsr writes a 4 GB fp16 SD3-medium folder once"
    )
    parser.add_argument(
        "--configs",
        default="reference,fp32,reference-bf16,bf16,default",
        help="reference (the official scripts' way, fp32), reference-bf16 / reference-fp16 (the same calls asked for "
        "that dtype: torch_dtype=, or .to() after load_state_dict), official / official-bf16 (the official scripts' "
        "whole build: adapters added and filled, then cast), fp32, bf16, fp16, default (dtype='auto': its pick on "
        "this CPU)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="each row this many times, interleaved")
    parser.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="seconds to wait before each row: on a virtual machine whose balloon reports free pages to the host, "
        "memory the previous row freed is cheap to fill again for a few seconds, then costly; 12 puts every row in "
        "the same (cold) state",
    )
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument(
        "--first-image",
        action="store_true",
        help="OSEDiff rows (ours, official): also the time from the start of the load to the first 128 -> 512 image",
    )
    parser.add_argument("--_row", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._row:
        print(json.dumps(load_row(args._row[0], args._row[1], Path(args._row[2]), args._row[3] == "1")))
        return 0
    write_files(args.dir)  # once, before any timing
    if "tsdsr" in args.families.split(","):
        write_tsdsr_files(args.dir)
    rows = []
    for _ in range(args.repeats):
        for family in [f for f in args.families.split(",") if f]:
            for config in [c for c in args.configs.split(",") if c]:
                time.sleep(args.settle)
                row = row_in_subprocess(__file__, family, config, str(args.dir), str(int(args.first_image)))
                row = row or {"family": family, "config": config, "error": "failed (its error is printed above)"}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(f"\nLoading, full-size files with random weights ({machine}); over-weights = (RSS - RSS before) / weights")
    print(f"{'family':9} {'config':14} {'dtype':>9} {'load':>7} {'ready':>7} {'weights':>8} {'peak':>7} {'after':>7} "
          f"{'peak/w':>7} {'private/w':>9} {'after/w':>8} {'first image':>12}")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"{r['family']:9} {r['config']:14} failed: {r['error']}")
            continue
        print(f"{r['family']:9} {r['config']:14} {r['dtype']:>9} {r['load_s']:>6.1f}s {r['ready_s']:>6.1f}s "
              f"{r['weights_gib']:>7.2f}G "
              f"{r['peak_gib']:>6.2f}G {r['after_gib']:>6.2f}G {r['peak_over_weights']:>7.2f} "
              f"{r['private_peak_over_weights']:>9.2f} {r['after_over_weights']:>8.2f} "
              f"{first_image_column(r):>12}")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmark_loading.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
