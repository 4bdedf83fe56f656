"""The training loop, on accelerate: one process or many (`accelerate launch`), CPU or GPU.

    python -m onestep_sr train CONFIG [key=value ...]
    accelerate launch [--multi_gpu --num_processes N] -m onestep_sr train CONFIG [key=value ...]

Each optimizer step: every micro-batch (gradient accumulation) through each of the objective's phases in order
-> gradients averaged over processes -> fp16 unscale -> clipping -> optimizer and LR-schedule step -> EMA. Data
order, crops, degradations and start noise depend only on the sample's position in the global stream, so N
processes with batch B train like one process with batch N*B, and a resumed run continues exactly.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoints as ckpt
from .config import ConfigError, TrainConfig

TRAIN_EXTRA_HINT = "training needs accelerate and PyYAML: pip install 'onestep-sr[train]'"


@dataclass
class TrainResult:
    step: int
    output_dir: Path
    last_checkpoint: Path | None
    exported: dict[str, Path]
    interrupted: bool = False


def lr_factor(config: TrainConfig, step: int) -> float:
    """The LR multiplier at optimizer step `step` (diffusers' schedule definitions): a linear warm-up from 0, then
    constant, linear decay to 0, cosine to 0, or cosine with `lr_cycles` hard restarts."""
    warmup = config.lr_warmup_steps
    if step < warmup:
        return step / max(1, warmup)
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, config.max_steps - warmup)
    if config.lr_schedule == "linear":
        return max(0.0, 1.0 - progress)
    if config.lr_schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((config.lr_cycles * progress) % 1.0))))


class EMA:
    """An exponential moving average of the trained weights (fp32): ema <- d * ema + (1 - d) * w per step."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.params = params
        self.shadow = {k: p.detach().clone().float() for k, p in params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for k, p in self.params.items():
            self.shadow[k].mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the live weights and the averages (call again to swap back)."""
        for k, p in self.params.items():
            live = p.detach().clone()
            p.copy_(self.shadow[k])
            self.shadow[k].copy_(live)


def store_frozen_weights_in(pipe, dtype: torch.dtype) -> None:
    """Mixed precision as diffusers' training examples do it: the frozen weights stored in the compute dtype (half
    the memory, no per-step casts), the trained ones kept in fp32 for the optimizer."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            for p in module.parameters():
                if not p.requires_grad and p.is_floating_point():
                    p.data = p.data.to(dtype)


def checkpoint_blocks(module: torch.nn.Module) -> None:
    """Gradient checkpointing: diffusers' own where the model supports it, else every block of the model's
    ModuleLists (and its middle block) recomputed in the backward pass."""
    if getattr(module, "_supports_gradient_checkpointing", False):
        module.enable_gradient_checkpointing()
        return
    from torch.utils.checkpoint import checkpoint

    def wrap(block: torch.nn.Module) -> None:
        inner = block.forward

        def forward(*args, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(inner, *args, use_reentrant=False, **kwargs)
            return inner(*args, **kwargs)

        block.forward = forward

    wrapped = 0
    for child in module.children():
        blocks = list(child) if isinstance(child, torch.nn.ModuleList) else []
        for block in blocks:
            wrap(block)
            wrapped += 1
    middle = getattr(module, "middle_block", None)
    if middle is not None:
        wrap(middle)
        wrapped += 1
    if not wrapped:
        raise ConfigError(f"gradient_checkpointing: {type(module).__name__} has no blocks to checkpoint")


class StopRequest:
    """Ctrl-C during training: the first one finishes the current step, saves a checkpoint and stops; a second
    one stops at once."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self.previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step, saving a checkpoint, then stopping (Ctrl-C again to stop at once)")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


class Logger:
    """JSON lines in <output_dir>/logs/train.jsonl, and TensorBoard event files there when tensorboard is
    installed (main process only)."""

    def __init__(self, folder: Path, enabled: bool):
        self.enabled, self.tb = enabled, None
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "train.jsonl"
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(folder))
        except ImportError:
            self.tb = None

    def log(self, step: int, values: dict[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Trainer:
    """One run: builds everything from the config, then `run()`."""

    def __init__(self, config: TrainConfig, pipe=None):
        """`pipe`: a pipeline built in Python to train instead of `load_pipeline(config.base, config.weights)`
        (LoRA unfused, fp32; e.g. the benchmark's full-size random-weight model)."""
        try:
            from accelerate import Accelerator
        except ImportError as err:
            raise ImportError(TRAIN_EXTRA_HINT) from err
        self.config = config
        cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
        # cpu=True also for a CPU run under `accelerate launch --multi_gpu` (gloo): without it, each process
        # would believe it is alone
        self.accelerator = Accelerator(cpu=cpu)
        self.device = self.accelerator.device
        self.output_dir = Path(config.output_dir)
        self.is_main = self.accelerator.is_main_process
        torch.manual_seed(config.seed)
        self._build_data()  # (an empty or missing image folder fails before the model loads)
        self._build_model(pipe)
        self._build_optimizers()
        self.logger = Logger(self.output_dir / "logs", self.is_main)

    # ------------------------------------------------------------------ building

    def _build_model(self, pipe=None) -> None:
        from ..pipelines.methods import load_pipeline
        from .objectives import get_objective
        from .objectives.regression import build_perceptual

        c = self.config
        objective_cls = get_objective(c.objective)
        # the perceptual backbone first: a missing file is reported before the (long) model load
        perceptual = None
        if objective_cls.perceptual_loss:
            perceptual = build_perceptual(c, [Path(c.base).parent, Path(c.weights).parent])
        if perceptual is not None:
            perceptual.to(self.device)
        options = {"embeddings": c.embeddings} if c.embeddings else {}
        if pipe is None and not c.weights:
            pipe = objective_cls.initial_pipeline(c, self.device)  # (D3SR: from the base alone)
        if pipe is None:
            method = c.method or objective_cls.method  # (TAD-SR: the student starts as the ResShift teacher file)
            pipe = load_pipeline(
                c.base, c.weights, dtype="fp32", device=self.device, fuse_lora=False, method=method, **options
            )
        pipe.to(self.device)  # (a pipeline built in Python comes wherever it was made)
        pipe.set_progress_bar_config(disable=True)
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
        self.pipe = pipe
        self.method = pipe.sr_method
        self.objective = objective_cls(pipe, c, perceptual)
        self.phases = self.objective.phases
        for phase in self.phases:
            for p in phase.parameters.values():
                p.requires_grad_(True)
        if c.gradient_checkpointing:
            for module in self.objective.modules():
                checkpoint_blocks(module)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(c.mixed_precision)
        if self.autocast_dtype is not None:
            store_frozen_weights_in(pipe, self.autocast_dtype)
        self.trainable = {f"{ph.name}/{k}": p for ph in self.phases for k, p in ph.parameters.items()}
        averaged = {f"{ph.name}/{k}": p for ph in self.phases if ph.ema for k, p in ph.parameters.items()}
        self.ema = EMA(averaged, c.ema_decay) if c.ema_decay > 0 else None

    def _build_optimizers(self) -> None:
        c = self.config
        self.optimizers, self.schedulers = {}, {}
        for phase in self.phases:
            with warnings.catch_warnings():  # a parameter listed twice is the recipe's (Phase.optimizer_list)
                warnings.filterwarnings("ignore", message=".*duplicate parameters.*")
                opt = torch.optim.AdamW(
                    phase.optimizer_params(),
                    lr=phase.learning_rate,
                    betas=(c.adam_beta1, c.adam_beta2),
                    eps=c.adam_epsilon,
                    weight_decay=c.weight_decay,
                    foreach=False if phase.has_repeats else None,
                )
            self.optimizers[phase.name] = opt
            factor = phase.lr_factor or (lambda s: lr_factor(c, s))
            self.schedulers[phase.name] = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        fp16 = c.mixed_precision == "fp16"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=True) if fp16 else None

    def _build_data(self) -> None:
        from .data.datasets import TrainImages

        c = self.config
        self.dataset = TrainImages(c.train_data, c.crop_size, c.seed, c.train_lq_data, c.scale)

    def _loader(self, start_step: int):
        from .data.datasets import PositionSampler, collate

        c, state = self.config, self.accelerator.state
        sampler = PositionSampler(
            start_step, c.batch_size, c.gradient_accumulation_steps, state.num_processes, state.process_index
        )
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=c.batch_size, sampler=sampler, num_workers=c.num_workers, collate_fn=collate
        )
        return iter(loader)

    # ------------------------------------------------------------------ one step

    def _prepare(self, batch: dict) -> dict:
        from .data.degradation import degrade_samples

        hq = batch["hq"].to(self.device)
        if batch["lq"] is not None:
            lq = batch["lq"].to(self.device)
        else:
            resize_back = self.objective.lq_at_hq_size
            hq, lq = degrade_samples(hq, batch["degradation"], batch["seed"], self.config.scale, resize_back)
        return {**batch, "hq": hq, "lq": lq}

    def _sync_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Average gradients over processes (one flat all-reduce)."""
        if self.accelerator.num_processes == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = self.accelerator.reduce(flat, reduction="mean")
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def autocast(self):
        """The run's precision for any forward of the trained model (training steps, validation, your own calls
        to `trainer.pipe`): autocast to bf16/fp16, or nothing for fp32."""
        dtype = self.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def train_step(self, micro_batches: list[dict]) -> dict[str, float]:
        logged: dict[str, float] = {}
        for phase in self.phases:
            self.optimizers[phase.name].zero_grad(set_to_none=True)
            for batch in micro_batches:
                with self.autocast():
                    losses = self.objective.losses(phase.name, batch)
                loss = losses["loss"].float() / len(micro_batches)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{phase.name}: the loss became {loss.item()} (check the learning rate)")
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
                for k, v in losses.items():
                    key = f"{phase.name}/{k}" if len(self.phases) > 1 else k
                    logged[key] = logged.get(key, 0.0) + v.detach().float().item() / len(micro_batches)
            self._sync_gradients(list(phase.parameters.values()))
            logged.update(self.apply_gradients(phase))
        self.objective.after_step()
        if self.ema is not None:
            self.ema.update()
        return logged

    def apply_gradients(self, phase) -> dict[str, float]:
        """The phase's update from the gradients its parameters hold: fp16 unscale, clipping, the optimizer and
        LR-schedule step (what follows the backward passes of a step)."""
        opt, logged = self.optimizers[phase.name], {}
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        if self.config.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(phase.optimizer_params(), self.config.max_grad_norm)
            logged[f"{phase.name}/grad_norm"] = float(norm)
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        self.schedulers[phase.name].step()
        logged[f"{phase.name}/lr"] = self.schedulers[phase.name].get_last_lr()[0]
        return logged

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, step: int) -> Path:
        final = ckpt.checkpoint_dir(self.output_dir, step)
        tmp = final.with_name(final.name + ".tmp")
        self.accelerator.wait_for_everyone()
        if self.is_main:
            if tmp.exists():  # left by a crash during an earlier save
                shutil.rmtree(tmp)
            ckpt.save_main(
                tmp,
                step,
                self.config.to_dict(),
                self.trainable,
                self.ema.shadow if self.ema else None,
                self.optimizers,
                self.schedulers,
                self.scaler,
                self.objective.buffers(),
            )
        self.accelerator.wait_for_everyone()
        ckpt.save_rank_rng(tmp, self.accelerator.process_index)
        self.accelerator.wait_for_everyone()
        if self.is_main:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            ckpt.prune(self.output_dir, self.config.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        return final

    def load_checkpoint(self, folder: Path) -> int:
        step = ckpt.load_main(
            folder,
            self.trainable,
            self.ema.shadow if self.ema else None,
            self.optimizers,
            self.schedulers,
            self.scaler,
            self.objective.buffers(),
        )
        if not ckpt.load_rank_rng(folder, self.accelerator.process_index):
            print(f"{folder}: no RNG state for process {self.accelerator.process_index} (process count changed?)")
        return step

    # ------------------------------------------------------------------ validation and export

    @torch.no_grad()
    def validate(self, step: int) -> dict[str, float] | None:
        from .validation import run_validation

        c = self.config
        if c.val_data is None:
            return None
        self.accelerator.wait_for_everyone()
        metrics = None
        if self.is_main:
            if self.ema is not None:
                self.ema.swap()
            try:
                with self.autocast():
                    folder = self.output_dir / "validation" / f"step-{step:08d}"
                    metrics = run_validation(self.pipe, c, step, folder, self.objective.perceptual)
            finally:
                if self.ema is not None:
                    self.ema.swap()
            self.logger.log(step, metrics, kind="validation")
        self.accelerator.wait_for_everyone()
        return metrics

    def export(self) -> dict[str, Path]:
        """The method's own weights (EMA when enabled) and a converted diffusers folder, under <output_dir>/final."""
        from ..pipelines.methods import convert_to_diffusers

        out: dict[str, Path] = {}
        self.accelerator.wait_for_everyone()
        if self.is_main:
            final = self.output_dir / "final"
            if self.ema is not None:
                self.ema.swap()
            try:
                weights = self.method.write_weights(self.pipe, final / self.method.default_weights)
            finally:
                if self.ema is not None:
                    self.ema.swap()
            out["weights"] = Path(weights)  # (TSD-SR's folder holds its embeddings too)
            out["diffusers"] = convert_to_diffusers(self.config.base, weights, final / "diffusers")
            (final / "README.txt").write_text(
                f"Trained with onestep-sr ({self.config.objective} objective) from "
                f"{self.config.weights or self.config.base + ' (the base alone)'}.\n"
                f"{out['weights'].name}: {self.method.display_name} weights in the method's own format; load with "
                f"load_pipeline(base, '{out['weights'].name}').\ndiffusers/: the same model as a diffusers folder "
                "(load_converted or the pipeline class's from_pretrained).\n"
            )
        self.accelerator.wait_for_everyone()
        return out

    # ------------------------------------------------------------------ the run

    def run(self, stop_at: int | None = None) -> TrainResult:
        """Train to `max_steps` (or stop after step `stop_at`, saving a checkpoint, as Ctrl-C does)."""
        from tqdm.auto import tqdm

        c = self.config
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(json.dumps(c.to_dict(), indent=1))
        start = 0
        resume = ckpt.resolve_resume(c.resume, self.output_dir)
        if resume is not None:
            start = self.load_checkpoint(resume)
            if self.is_main:
                print(f"resumed from {resume} at step {start}")
        data = self._loader(start)
        bar = tqdm(total=c.max_steps, initial=start, disable=not self.is_main, desc="training", dynamic_ncols=True)
        last_checkpoint, step, interrupted = None, start, False
        with StopRequest() as stop:
            while step < c.max_steps:
                micro = [self._prepare(next(data)) for _ in range(c.gradient_accumulation_steps)]
                logged = self.train_step(micro)
                step += 1
                logged = {
                    k: float(self.accelerator.reduce(torch.tensor(v, device=self.device), "mean"))
                    for k, v in logged.items()
                }
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in logged.items() if not k.endswith("lr")}, refresh=False)
                if c.log_every and (step % c.log_every == 0 or step == c.max_steps):
                    self.logger.log(step, logged)
                stop_now = self._any_process(stop.requested) or step == stop_at
                if (c.checkpoint_every and step % c.checkpoint_every == 0) or stop_now:
                    last_checkpoint = self.save_checkpoint(step)
                if c.val_every and step % c.val_every == 0 and step != c.max_steps:
                    self.validate(step)
                if stop_now:
                    interrupted = True
                    break
        bar.close()
        exported: dict[str, Path] = {}
        if not interrupted:
            if last_checkpoint is None or ckpt.read_state(last_checkpoint)["step"] != step:
                last_checkpoint = self.save_checkpoint(step)
            self.validate(step)
            if c.export:
                exported = self.export()
        self.logger.close()
        return TrainResult(step, self.output_dir, last_checkpoint, exported, interrupted)

    def _any_process(self, flag: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return flag
        return bool(self.accelerator.reduce(torch.tensor(float(flag), device=self.device), "sum") > 0)


def train(config: TrainConfig) -> TrainResult:
    return Trainer(config).run()
