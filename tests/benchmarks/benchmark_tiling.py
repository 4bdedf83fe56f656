"""Speed and memory of the OSEDiff path on FULL-SIZE SD2.1-base architectures with random weights.

Not part of the test suite. One command:

    python tests/benchmarks/benchmark_tiling.py            # table on stdout, JSON in bench_out/

The DAPE/RAM tagger rows (`--no-tagger` skips them) time the full-size tagger on one 512 px image
in fp32 and in the default dtype, as OSEDiff runs it once per image before the 512 px upscale.

Every configuration runs in its own subprocess, so peak resident memory (VmHWM) is that
configuration's alone. Configurations, in the same run:
  baseline: fp32, untiled denoiser, untiled VAE (diffusers' plain encode/decode)
  default:  dtype="auto", tile_size="auto", vae_tile_size="auto" (what users get)
The text encoder is left out of both (prompt embeddings are random): it runs once per prompt and
would add the same ~0.7 GB (bf16) / 1.4 GB (fp32) to every row. Weights are random, so outputs
are meaningless; compute and memory are those of the real models. The VAE-tiling quality check
compares the streamed VAE against the untiled one on a smooth test image, both in fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SIZES = {"512": 128, "1024": 256, "2048": 512}  # output side -> LQ side at 4x


def peak_rss_gib() -> float:
    return status_gib("VmHWM")


def status_gib(field: str) -> float:
    """A memory line of /proc/self/status (VmHWM: peak resident, VmRSS: resident now), in GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def smooth_lq(side: int):
    """A smooth 3 x side x side test image in [0, 1] (sines): the benchmarks' LQ input."""
    import torch

    y, x = torch.meshgrid(torch.linspace(0, 6, side), torch.linspace(0, 6, side), indexing="ij")
    return torch.stack([torch.sin(x) * 0.4 + 0.5, torch.cos(y) * 0.4 + 0.5, torch.sin(x + y) * 0.2 + 0.5])


def build_pipeline(dtype, baseline: bool):
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from onestep_sr import OneStepSRPipeline, prepare_for_inference
    from onestep_sr.pipelines.loading import SD21_BASE_CONFIG

    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # build in the target dtype, as load_pipeline loads weights straight into it
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD21_BASE_CONFIG / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD21_BASE_CONFIG / "vae"))
    torch.set_default_dtype(torch.float32)
    scheduler = DDPMScheduler.from_pretrained(SD21_BASE_CONFIG, subfolder="scheduler")
    pipe = OneStepSRPipeline(vae=vae, unet=unet, scheduler=scheduler, timestep=999)
    pipe.set_progress_bar_config(disable=True)
    if baseline:  # plain diffusers usage: fp32, default memory format
        unet.eval()
        vae.eval()
        return pipe
    return prepare_for_inference(pipe, torch.device("cpu"), dtype)


def run_config(config: str, out_side: int) -> dict:
    import torch

    from onestep_sr import Conditioning
    from onestep_sr.pipelines.images import LQImage, pad_to_multiple, upsample_pil_bicubic
    from onestep_sr.pipelines.loading import resolve_dtype

    torch.set_num_threads(os.cpu_count() or 1)
    dtype = torch.float32 if config == "baseline" else resolve_dtype("auto", torch.device("cpu"))
    t0 = time.perf_counter()
    pipe = build_pipeline(dtype, baseline=config == "baseline")
    build_s = time.perf_counter() - t0
    rss_models = peak_rss_gib()
    lq_side = out_side // 4
    latent_hw = (out_side // pipe.vae_scale_factor,) * 2
    if config == "baseline":
        tiling = pipe.plan_tiling(latent_hw, None, 32, 1, None, "gaussian")
    else:
        tiling = pipe.plan_tiling(latent_hw, "auto", 32, 1, "auto", "gaussian")
    g = torch.Generator().manual_seed(1)
    lq = smooth_lq(lq_side)[None]
    lq = (lq + 0.02 * torch.randn(lq.shape, generator=g)).clamp(0, 1)
    cond = Conditioning(torch.randn(1, 77, 1024, generator=g).to(dtype))
    with torch.no_grad():
        up = upsample_pil_bicubic(LQImage(rgb=lq), 4)
        padded, _ = pad_to_multiple(up.rgb * 2 - 1, pipe.vae_scale_factor)
        t = time.perf_counter()
        latents = pipe.encode(padded, "mode", None, tiling)
        encode_s = time.perf_counter() - t
        t = time.perf_counter()
        clean = pipe.denoise(latents, cond, tiling)
        denoise_s = time.perf_counter() - t
        t = time.perf_counter()
        image = pipe.decode(clean, tiling)
        decode_s = time.perf_counter() - t
    assert image.shape[-1] == out_side and torch.isfinite(image).all()
    return {
        "config": config,
        "output": out_side,
        "dtype": str(dtype).replace("torch.", ""),
        "denoiser_tile": tiling.tile_size,
        "vae_tile": tiling.vae_tile_size,
        "encode_s": round(encode_s, 2),
        "denoise_s": round(denoise_s, 2),
        "decode_s": round(decode_s, 2),
        "total_s": round(encode_s + denoise_s + decode_s, 2),
        "build_s": round(build_s, 1),
        "rss_models_gib": round(rss_models, 2),
        "peak_rss_gib": round(peak_rss_gib(), 2),
    }


def run_tagger(config: str) -> dict:
    """The full-size DAPE/RAM tagger (Swin-L 384 + tagging head, random weights): one 512 px image, as OSEDiff
    tags it before its 512 px run. fp32 (baseline) vs the default dtype; the best of 3 timed runs after a warm-up."""
    import torch
    from PIL import Image

    from onestep_sr import RAMTagger
    from onestep_sr.pipelines.loading import resolve_dtype

    torch.set_num_threads(os.cpu_count() or 1)
    dtype = torch.float32 if config == "baseline" else resolve_dtype("auto", torch.device("cpu"))
    torch.manual_seed(0)
    t0 = time.perf_counter()
    tagger = RAMTagger().to(dtype).eval()  # the release config: Swin-L (192, [2, 2, 18, 2]), 768-wide head
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in tagger.parameters())
    image = Image.new("RGB", (512, 512), (120, 80, 200))
    times = []
    with torch.no_grad():
        tagger.tags(image)  # warm-up
        for _ in range(3):
            t = time.perf_counter()
            tagger.tags(image)
            times.append(time.perf_counter() - t)
    return {
        "config": f"tagger-{config}",
        "dtype": str(dtype).replace("torch.", ""),
        "params_m": round(params / 1e6, 1),
        "tag_s": round(min(times), 2),
        "build_s": round(build_s, 1),
        "peak_rss_gib": round(peak_rss_gib(), 2),
    }


def run_resshift(config: str, lq_side: int) -> dict:
    """The full-size ResShift-family model (TAD-SR/SinSR: 118.6 M UNet + 55.3 M VQGAN-f4, random weights), one
    step, LQ -> 4x. baseline: fp32, untiled, diffusers' own SDPA attention in the VQGAN (the code before the
    chunked attention); fp32: this package in fp32, untiled; default: dtype "auto", tiling "auto"."""
    import torch
    from diffusers import VQModel

    from onestep_sr import OneStepSRResShiftPipeline, ResShiftUNet, prepare_for_inference
    from onestep_sr.pipelines.loading import resolve_dtype
    from onestep_sr.pipelines.loading.bases import RESSHIFT_VQ_F4_CONFIG

    torch.set_num_threads(os.cpu_count() or 1)
    dtype = torch.float32 if config in ("baseline", "fp32") else resolve_dtype("auto", torch.device("cpu"))
    torch.manual_seed(0)
    pipe = OneStepSRResShiftPipeline(vae=VQModel(**RESSHIFT_VQ_F4_CONFIG), unet=ResShiftUNet(), method="tadsr")
    pipe = prepare_for_inference(pipe, torch.device("cpu"), dtype)
    if config == "baseline":
        from diffusers.models.attention_processor import Attention, AttnProcessor2_0

        for layer in pipe.vae.modules():
            if isinstance(layer, Attention):
                layer.set_processor(AttnProcessor2_0())
    pipe.set_progress_bar_config(disable=True)
    rss_models = peak_rss_gib()
    lq = smooth_lq(lq_side)
    tiling = {} if config == "default" else {"tile_size": None, "vae_tile_size": None}
    plan = pipe.plan_tiling((lq_side, lq_side), **tiling)
    stamps = []
    t0 = time.perf_counter()

    def stamp(done: int, total: int) -> None:
        stamps.append((done, time.perf_counter()))

    generator = torch.Generator().manual_seed(0)
    out = pipe(lq, upscale=4, output_type="pt", generator=generator, progress_callback=stamp, **tiling).images
    total = time.perf_counter() - t0
    assert out.shape[-1] == 4 * lq_side and torch.isfinite(out).all()
    # stage ends from the progress units (the callback also fires on heartbeats inside a stage, with unchanged
    # counts); an untiled image decodes inside its one step, so its decode time is part of `denoise`
    encode_units = pipe.vae_units(plan, "encode")
    denoise_units = encode_units + pipe.denoiser_calls * plan.denoiser_tiles
    encode_end = next(t for done, t in stamps if done >= encode_units)
    denoise_end = next(t for done, t in stamps if done >= denoise_units)
    encode_s = encode_end - t0
    if pipe.runs_untiled(plan):
        denoise_s, decode_s = total - encode_s, None
    else:
        denoise_s, decode_s = denoise_end - encode_end, total - (denoise_end - t0)
    return {
        "config": f"resshift-{config}",
        "output": 4 * lq_side,
        "dtype": str(dtype).replace("torch.", ""),
        "denoiser_tile": plan.tile_size,
        "vae_tile": plan.vae_tile_size,
        "encode_s": round(encode_s, 2),
        "denoise_s": round(denoise_s, 2),
        "decode_s": None if decode_s is None else round(decode_s, 2),
        "total_s": round(total, 2),
        "rss_models_gib": round(rss_models, 2),
        "peak_rss_gib": round(peak_rss_gib(), 2),
    }


def vae_quality(out_side: int, vae_tile_size: int) -> dict:
    """Streamed vs untiled VAE (fp32, same random full-size VAE): PSNR of decode(encode(x))."""
    import math

    import torch
    from diffusers import AutoencoderKL

    from onestep_sr.pipelines.loading import SD21_BASE_CONFIG
    from onestep_sr.pipelines.tiling.streamed_vae import ATTENTION_PAD, ATTENTION_TILE, StreamedVAE, streamed_vae

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD21_BASE_CONFIG / "vae")).eval()
    y, x = torch.meshgrid(torch.linspace(0, 8, out_side), torch.linspace(0, 8, out_side), indexing="ij")
    image = torch.stack([torch.sin(x), torch.cos(y), torch.sin(x + y)])[None] * 0.8
    streamed = streamed_vae(vae, vae_tile_size)
    # what images beyond the global-attention limit get: attention in tiles with context, forced here
    tiled_attention = StreamedVAE(vae, vae_tile_size, ATTENTION_TILE, ATTENTION_PAD, global_attention_tokens=0)
    with torch.no_grad():
        ref_post = vae.encode(image).latent_dist
        ref = vae.decode(ref_post.mean).sample
        s_post = streamed.encode(image)
        s = streamed.decode(s_post.mean)
        s_dec_only = streamed.decode(ref_post.mean)
        t_post = tiled_attention.encode(image)
        t_dec_only = tiled_attention.decode(ref_post.mean)

    def psnr(a, b):
        mse = ((a.double() - b.double()) ** 2).mean().item()
        peak = float(b.max() - b.min())
        return round(10 * math.log10(peak * peak / mse), 2) if mse > 0 else float("inf")

    return {
        "output": out_side,
        "vae_tile": vae_tile_size,
        "psnr_latent_db": psnr(s_post.mean, ref_post.mean),
        "psnr_decode_db": psnr(s_dec_only, ref),
        "psnr_roundtrip_db": psnr(s, ref),
        f"tiled_attention_{ATTENTION_TILE}_pad_{ATTENTION_PAD}": {
            "psnr_latent_db": psnr(t_post.mean, ref_post.mean),
            "psnr_decode_db": psnr(t_dec_only, ref),
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="512,1024,2048", help="output sides to run")
    parser.add_argument(
        "--baseline-sizes",
        default="512,1024",
        help="output sides for the fp32 untiled baseline (2048 needs >24 GiB untiled fp32 on CPU)",
    )
    parser.add_argument("--quality-sizes", default="2048", help="output sides for the VAE tiling PSNR check")
    parser.add_argument("--no-tagger", action="store_true", help="skip the DAPE tagger rows")
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--_tagger", nargs=1, help=argparse.SUPPRESS)
    parser.add_argument("--_resshift", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument(
        "--resshift",
        default="128:baseline,128:fp32,128:default,256:baseline,256:fp32,256:default,512:default",
        help="ResShift-family rows as LQ_SIDE:CONFIG, CONFIG baseline|fp32|default (LQ 128 -> 512 px, 256 -> 1024, "
        "512 -> 2048); '' skips them",
    )
    parser.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--_quality", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(run_config(args._child[0], int(args._child[1]))))
        return 0
    if args._resshift:
        print(json.dumps(run_resshift(args._resshift[1], int(args._resshift[0]))))
        return 0
    if args._tagger:
        print(json.dumps(run_tagger(args._tagger[0])))
        return 0
    if args._quality:
        print(json.dumps(vae_quality(int(args._quality[0]), int(args._quality[1]))))
        return 0

    def child(flag, *values) -> dict:
        proc = subprocess.run([sys.executable, __file__, flag, *map(str, values)], capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": (proc.stderr.strip().splitlines() or ["killed"])[-1][:200], "rc": proc.returncode}
        return json.loads(proc.stdout.strip().splitlines()[-1])

    rows = []
    sizes = [int(s) for s in args.sizes.split(",") if s]
    baseline_sizes = {int(s) for s in args.baseline_sizes.split(",") if s}
    for side in sizes:
        for config in ("baseline", "default"):
            if config == "baseline" and side not in baseline_sizes:
                continue
            row = {"config": config, "output": side, **child("--_child", config, side)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    resshift = []
    for item in [i for i in args.resshift.split(",") if i]:
        side, config = item.split(":")
        resshift.append({"config": f"resshift-{config}", "output": 4 * int(side), **child("--_resshift", side, config)})
        print(json.dumps(resshift[-1]), file=sys.stderr, flush=True)
    taggers = [] if args.no_tagger else [child("--_tagger", config) for config in ("baseline", "default")]
    quality = [child("--_quality", side, 512) for side in [int(s) for s in args.quality_sizes.split(",") if s]]

    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {__import__('torch').__version__}"
    )
    print(f"\nOSEDiff path, full-size SD2.1-base random weights, LQ x4 ({machine})\n")
    header = (
        f"{'config':9} {'output':>6} {'dtype':>8} {'tile':>5} {'vae':>5} {'encode':>7} {'denoise':>8} "
        f"{'decode':>7} {'total':>7} {'peak RSS':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['config']:9} {r['output']:>6}  failed: {r['error']}")
            continue
        print(
            f"{r['config']:9} {r['output']:>6} {r['dtype']:>8} {r['denoiser_tile']!s:>5} {r['vae_tile']!s:>5} "
            f"{r['encode_s']:>6.1f}s {r['denoise_s']:>7.1f}s {r['decode_s']:>6.1f}s {r['total_s']:>6.1f}s "
            f"{r['peak_rss_gib']:>7.2f}G"
        )
    by = {(r["config"], r["output"]): r for r in rows if "error" not in r}
    for side in sizes:
        if ("baseline", side) in by and ("default", side) in by:
            print(f"speed-up at {side}: {by[('baseline', side)]['total_s'] / by[('default', side)]['total_s']:.2f}x")
    if ("default", 1024) in by and ("default", 2048) in by:
        growth = by[("default", 2048)]["peak_rss_gib"] / by[("default", 1024)]["peak_rss_gib"]
        print(f"peak RSS 2048 / 1024 (default): {growth:.2f}x")
    for q in quality:
        print(f"VAE tiled vs untiled at {q.get('output')} px, tile {q.get('vae_tile')}: " + json.dumps(q))
    if resshift:
        print("\nTAD-SR / SinSR (ResShift family), full-size UNet + VQGAN-f4 random weights, one step, LQ x4\n")
        print(header)
        for r in resshift:
            if "error" in r:
                print(f"{r['config']:16} {r['output']:>6}  failed: {r['error']}")
                continue
            row = f"{r['config']:16} {r['output']:>6} {r['dtype']:>8} {r['denoiser_tile']!s:>5} {r['vae_tile']!s:>5} "
            decode = "in den." if r["decode_s"] is None else f"{r['decode_s']:>6.1f}s"
            print(row + f"{r['encode_s']:>6.1f}s {r['denoise_s']:>7.1f}s {decode:>7} {r['total_s']:>6.1f}s "
                  f"{r['peak_rss_gib']:>7.2f}G")  # fmt: skip
        timed = {(r["config"], r["output"]): r["total_s"] for r in resshift if "error" not in r}
        for (config, side), seconds in sorted(timed.items(), key=lambda item: item[0][1]):
            if config != "resshift-baseline":
                for base in ("resshift-baseline", "resshift-fp32"):
                    if base != config and (base, side) in timed:
                        print(f"{config} vs {base} at {side}: {timed[(base, side)] / seconds:.2f}x faster")
    if taggers:
        print("\nDAPE/RAM tagger (Swin-L 384 + tagging head, random weights), one 512 px image per call\n")
        print(f"{'config':16} {'dtype':>8} {'params':>8} {'time':>7} {'peak RSS':>9}")
        for t in taggers:
            if "error" in t:
                print(f"tagger failed: {t['error']}")
                continue
            row = f"{t['config']:16} {t['dtype']:>8} {t['params_m']:>7.1f}M {t['tag_s']:>6.2f}s"
            print(f"{row} {t['peak_rss_gib']:>7.2f}G")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmark_tiling.json").write_text(
        json.dumps(
            {"machine": machine, "rows": rows, "vae_quality": quality, "tagger": taggers, "resshift": resshift},
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
