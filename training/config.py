"""The training config: one typed dataclass, read from a YAML or TOML file plus `key=value` overrides.

Every key, its type and its meaning is below (README "Training" lists them too). Unknown keys, wrong types and
out-of-range values are errors naming the key, before any model is loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

PERCEPTUAL_LOSSES = ("lpips-vgg", "lpips-alex", "dists", "ea-dists", "none")
LR_SCHEDULES = ("constant", "linear", "cosine", "cosine_with_restarts")
PRECISIONS = ("no", "bf16", "fp16")


class ConfigError(ValueError):
    """A training config that cannot run: says which key, what was wrong and what is expected."""


@dataclass
class TrainConfig:
    # -- what is trained
    objective: str = "regression"  # a module in training/objectives/ ("regression": MSE + perceptual, no teacher)
    base: str = ""  # the method's base model (SD2.1-base folder/file, SD3 folder/file, or the VQGAN-f4 .pth)
    # the method's weights to start from (osediff.pkl, a TSD-SR folder, a ResShift-family .pth); objectives that
    # start from the base alone (d3sr) take none
    weights: str = ""
    method: str | None = None  # a registered method id, to skip detection
    embeddings: str | None = None  # TSD-SR prompt embeddings, when not beside the weights
    prompt: str = ""  # the prompt the generator is conditioned on (methods with text encoders)
    # -- data
    train_data: str = ""  # a folder of HQ images (searched recursively); LQ made on the fly by `degradation`
    train_lq_data: str | None = None  # a folder of LQ images paired with train_data by relative path (no degradation)
    crop_size: int = 512  # HQ crop size in pixels (a multiple of the method's grid, e.g. 8 or 256 for ResShift)
    degradation: Literal["realesrgan", "none"] = "realesrgan"  # how LQ is made from HQ when no LQ folder is given
    scale: int = 4  # HQ / LQ size ratio of the data
    num_workers: int = 0  # data-loading worker processes per training process
    # -- losses (the regression objective)
    mse_weight: float = 1.0
    perceptual: str = "lpips-vgg"  # one of PERCEPTUAL_LOSSES
    perceptual_weight: float = 2.0  # OSEDiff's lambda_lpips
    perceptual_weights: str | None = None  # torchvision backbone file or a folder holding it (vgg16-397923af.pth ...)
    # -- optimisation
    batch_size: int = 1  # per process and micro-step
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000  # optimizer steps
    learning_rate: float = 5e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    lr_schedule: str = "constant"  # one of LR_SCHEDULES
    lr_warmup_steps: int = 0
    lr_cycles: int = 1  # cosine_with_restarts: number of restarts
    max_grad_norm: float = 1.0  # 0 disables clipping
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" (autocast; the trained weights stay fp32)
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0  # 0: no EMA; e.g. 0.999 keeps an EMA of the trained weights (exported when set)
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda" (under accelerate launch each process takes its own GPU)
    # -- outputs
    output_dir: str = "train_out"
    checkpoint_every: int = 500  # steps; 0: only at the end (and on Ctrl-C)
    keep_checkpoints: int = 3  # keep the last K checkpoints (0 keeps all)
    resume: str | None = None  # "latest", or a checkpoint folder
    log_every: int = 10  # steps between log lines
    val_data: str | None = None  # a folder with lq/ and hq/ (same file names)
    val_every: int = 0  # steps; 0: no validation during training (it still runs at the end when val_data is set)
    val_samples: int = 4  # validation images saved as PNG each time
    val_crop_border: int | None = None  # pixels cropped before PSNR/SSIM (default: the scale)
    export: bool = True  # write the method's own weights and a diffusers folder at the end
    extra: dict[str, Any] = field(default_factory=dict)  # objective-specific settings (see each objective)

    # ------------------------------------------------------------------ reading

    @classmethod
    def from_file(cls, path: str | os.PathLike | None, overrides: list[str] | None = None) -> TrainConfig:
        values: dict[str, Any] = {}
        if path is not None:
            values = read_config_file(path)
        for item in overrides or []:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"override {item!r}: expected key=value")
            values[key.strip()] = parse_value(raw)
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any], check_paths: bool = True) -> TrainConfig:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = [k for k in values if k not in fields]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, fields, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"unknown config key(s) {', '.join(hints)}; valid keys: {', '.join(fields)}")
        hints = typing.get_type_hints(cls)
        converted = {k: coerce(k, v, hints[k]) for k, v in values.items()}
        config = cls(**converted)
        config.validate(check_paths)
        return config

    def validate(self, check_paths: bool = True) -> None:
        """Every value in range (and, with `check_paths`, every path existing): a ConfigError naming the key."""

        def need(ok: bool, key: str, expected: str) -> None:
            if not ok:
                raise ConfigError(f"{key} = {getattr(self, key)!r}: expected {expected}")

        from .objectives import get_objective, objective_names

        need(self.objective in objective_names(), "objective", f"one of {objective_names()}")
        if check_paths:
            need(bool(self.base), "base", "the base model path (required)")
            from_base = get_objective(self.objective).starts_from_base
            need(bool(self.weights) or from_base, "weights", "the method's weights to start from (required)")
            need(bool(self.train_data), "train_data", "a folder of training images (required)")
        need(self.perceptual in PERCEPTUAL_LOSSES, "perceptual", f"one of {PERCEPTUAL_LOSSES}")
        need(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"one of {LR_SCHEDULES}")
        need(self.mixed_precision in PRECISIONS, "mixed_precision", f"one of {PRECISIONS}")
        need(self.degradation in ("realesrgan", "none"), "degradation", "'realesrgan' or 'none'")
        need(
            self.degradation != "none" or self.train_lq_data is not None,
            "degradation",
            "'realesrgan' unless train_lq_data gives paired LQ images",
        )
        for key in ("crop_size", "batch_size", "gradient_accumulation_steps", "max_steps", "scale", "lr_cycles"):
            need(getattr(self, key) >= 1, key, "a whole number >= 1")
        for key in (
            "num_workers",
            "lr_warmup_steps",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "val_every",
            "val_samples",
        ):
            need(getattr(self, key) >= 0, key, "a whole number >= 0")
        need(self.crop_size % self.scale == 0, "crop_size", f"a multiple of scale ({self.scale})")
        need(self.learning_rate > 0, "learning_rate", "> 0")
        need(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "adam_beta1", "betas in [0, 1)")
        need(self.max_grad_norm >= 0, "max_grad_norm", ">= 0 (0 disables clipping)")
        need(0 <= self.ema_decay < 1, "ema_decay", "in [0, 1) (0 disables EMA)")
        need(self.mse_weight >= 0 and self.perceptual_weight >= 0, "mse_weight", "loss weights >= 0")
        if not check_paths:
            return
        need(
            self.resume is None or self.resume == "latest" or Path(self.resume).is_dir(),
            "resume",
            "'latest' or an existing checkpoint folder",
        )
        for key in ("base", "weights", "train_data"):
            need((key == "weights" and not self.weights) or Path(getattr(self, key)).exists(), key, "an existing path")
        for key in ("train_lq_data", "val_data", "embeddings", "perceptual_weights"):
            value = getattr(self, key)
            need(value is None or Path(value).exists(), key, "an existing path (or leave it unset)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError as err:  # Python 3.10
            raise ConfigError(f"{path}: TOML configs need Python >= 3.11; use YAML") from err
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from err
    elif path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
    else:
        raise ConfigError(f"{path}: config files are .yaml, .yml or .toml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    return data


def parse_value(raw: str) -> Any:
    """A command-line value as YAML reads it (numbers, true/false, null, lists), else the string."""
    import yaml

    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def coerce(key: str, value: Any, hint: Any) -> Any:
    """`value` checked against the field's type: ints as floats are fine, nothing else is converted silently."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(key, value, inner[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} = {value!r}: expected one of {args}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r}: expected a whole number")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r}: expected a number")
        return float(value)
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r}: expected text")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} = {value!r}: expected a mapping")
        return value
    return value
