"""Images per second of a whole collection (`onestep_sr.pipelines.collection`, what `upscale` runs) on 1 vs 2
processes and with --batch-size, with the FULL-SIZE OSEDiff architecture (SD2.1-base UNet + VAE, random weights).

Not part of the test suite. One command:

    python tests/benchmarks/benchmark_collection.py            # table on stdout, JSON in bench_out/

Each row runs the same folder of N LQ images (default 16, 128 px -> 512 px) in a fresh output folder, in the
default precision, every process with ONE thread (so 2 processes use the 2 cores one process would leave
idle-ish). 2-process rows run under `accelerate launch --multi_gpu` (gloo on a CPU). Timing starts after every
process has built its model (a barrier) and ends when the last image is written; model build time is reported
apart. `--rows cuda` (or `all`) runs GPU rows (one process; batch 1, 4, 16) where a GPU is present. The text
encoder is left out (a random fixed prompt embedding conditions the UNet, as a method without text encoders runs):
it runs once per image either way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build_pipeline(device: str):
    import torch

    sys.path.insert(0, str(HERE))
    from benchmark_tiling import build_pipeline as build_osediff

    from onestep_sr.pipelines.loading import resolve_dtype
    from onestep_sr.pipelines.models.prompt_embedding import PromptEmbedding

    dtype = resolve_dtype("auto", torch.device(device))
    pipe = build_osediff(dtype, baseline=False)
    embedding = PromptEmbedding.from_tensors(torch.randn(1, 77, 1024, generator=torch.Generator().manual_seed(3)))
    pipe.register_modules(prompt_embedding=embedding.to(dtype))
    return pipe.to(device), dtype


def worker(args) -> int:
    """One process of a row (alone, or one of an accelerate launch)."""
    import torch

    from onestep_sr.pipelines.collection import (
        Processes,
        UpscaleSettings,
        collect_sources,
        plan_outputs,
        upscale_share,
    )

    torch.set_num_threads(args.threads)
    processes = Processes(args.device)
    t0 = time.perf_counter()
    pipe, dtype = build_pipeline(processes.device(args.device) if args.device != "auto" else "cpu")
    pipe.set_progress_bar_config(disable=True)
    build_s = time.perf_counter() - t0
    jobs = plan_outputs(collect_sources([args.inputs]), args.out)
    processes.wait()
    t0 = time.perf_counter()
    report = upscale_share(pipe, processes.share(jobs), UpscaleSettings(batch_size=args.batch_size))
    processes.wait()
    seconds = time.perf_counter() - t0
    reports = processes.gather(report)
    if processes.is_main:
        written = sum(r.written for r in reports)
        assert written == len(jobs), f"{written} of {len(jobs)} written: {[r.failed for r in reports]}"
        print(
            "ROW "
            + json.dumps(
                {
                    "processes": processes.count,
                    "threads_each": args.threads,
                    "batch_size": args.batch_size,
                    "device": args.device,
                    "dtype": str(dtype).replace("torch.", ""),
                    "images": written,
                    "seconds": round(seconds, 1),
                    "images_per_s": round(written / seconds, 4),
                    "build_s": round(build_s, 1),
                }
            ),
            flush=True,
        )
    return 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_row(inputs: Path, out: Path, processes: int, threads: int, batch_size: int, device: str) -> dict:
    me = [str(Path(__file__).resolve()), "--worker", "--inputs", str(inputs), "--out", str(out)]
    me += ["--threads", str(threads), "--batch-size", str(batch_size), "--device", device]
    if processes == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
        cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        cmd += ["--main_process_port", str(free_port()), *me]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rows = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
    if done.returncode != 0 or not rows:
        raise RuntimeError(f"row failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(rows[0])


def make_inputs(folder: Path, count: int, side: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:side, 0:side] / side * 6
    for i in range(count):
        rgb = np.stack([np.sin(x + i), np.cos(y - i), np.sin(x + y)], -1) * 0.4 + 0.5
        rgb = np.clip(rgb + rng.normal(0, 0.03, rgb.shape), 0, 1)
        Image.fromarray((rgb * 255).astype("uint8")).save(folder / f"img{i:02d}.png")
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--side", type=int, default=128, help="LQ side (the output is 4x)")
    parser.add_argument(
        "--rows",
        choices=("cpu", "processes", "cuda", "all"),
        default="cpu",
        help="CPU rows; only the 1 vs 2 process rows; GPU rows (1 process); or CPU and GPU",
    )
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import tempfile

    rows = []
    configs = []  # (processes, threads each, batch size, device)
    if args.rows in ("cpu", "all", "processes"):
        configs += [(1, 1, 1, "cpu"), (2, 1, 1, "cpu")]
    if args.rows in ("cpu", "all"):
        configs += [(1, 1, 4, "cpu"), (1, 2, 1, "cpu")]
    if args.rows in ("cuda", "all"):
        configs += [(1, 4, 1, "cuda"), (1, 4, 4, "cuda"), (1, 4, 16, "cuda")]
    with tempfile.TemporaryDirectory() as tmp:
        inputs = make_inputs(Path(tmp) / "in", args.images, args.side)
        for i, (processes, threads, batch, device) in enumerate(configs):
            row = run_row(inputs, Path(tmp) / f"out{i}", processes, threads, batch, device)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    base = rows[0]["images_per_s"]
    print(f"\n{args.images} images, {args.side} -> {args.side * 4} px, OSEDiff full-size (random weights), "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")  # fmt: skip
    print("| processes x threads | batch | device | dtype | images/s | vs 1x1 | build s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['processes']} x {r['threads_each']} | {r['batch_size']} | {r['device']} | {r['dtype']} | "
            f"{r['images_per_s']:.3f} | {r['images_per_s'] / base:.2f}x | {r['build_s']} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "collection.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
