"""What every objective gives the loop."""

from __future__ import annotations

import abc
import dataclasses
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import ConfigError, coerce


@dataclass
class Phase:
    """Parameters stepped by one optimizer; the loop runs an objective's phases in their order every step."""

    name: str
    parameters: dict[str, torch.nn.Parameter]
    learning_rate: float
    # the list the optimizer and the clipping see, when it is not `parameters` in order (an official recipe's
    # order, or a parameter listed twice on purpose: then the optimizer runs its deterministic for-loop)
    optimizer_list: list[torch.nn.Parameter] | None = None
    # the LR multiplier at scheduler step s, when not the config's schedule (an official recipe's own)
    lr_factor: Callable[[int], float] | None = None
    ema: bool = True  # averaged by the config's EMA (a discriminator is not: only what is exported is)

    def optimizer_params(self) -> list[torch.nn.Parameter]:
        return list(self.parameters.values()) if self.optimizer_list is None else self.optimizer_list

    @property
    def has_repeats(self) -> bool:
        params = self.optimizer_params()
        return len({id(p) for p in params}) != len(params)


class Objective(abc.ABC):
    """One method's training objective over a pipeline built for training (LoRA unfused, fp32 weights)."""

    name: str = ""
    method: str | None = None  # the method the pipeline is built as when the config names none
    perceptual_loss = True  # False: the config's `perceptual` backbone is not built (no such term)
    starts_from_base = False  # True: `weights` may be empty, `initial_pipeline` builds the untrained model
    trace: dict[str, torch.Tensor] | None = None  # a dict: intermediates kept by name (tests, debugging)

    @classmethod
    def initial_pipeline(cls, config, device: torch.device):
        """The pipeline to train when the config names no weights (objectives with `starts_from_base`)."""
        raise NotImplementedError

    @property
    @abc.abstractmethod
    def phases(self) -> list[Phase]: ...

    @abc.abstractmethod
    def losses(self, phase: str, batch: dict) -> dict[str, torch.Tensor]:
        """The losses of `phase` on a batch ({"hq", "lq", "seed", ...} on the device); "loss" is backpropagated."""

    def modules(self) -> list[torch.nn.Module]:
        """Modules to checkpoint for memory (gradient checkpointing)."""
        return []

    def keep(self, **tensors: torch.Tensor) -> None:
        """Keep intermediates (detached copies) in `trace` when it is a dict."""
        if self.trace is not None:
            self.trace.update({k: v.detach().clone() for k, v in tensors.items()})

    def buffers(self) -> dict[str, torch.Tensor]:
        """State that is not a trained parameter but changes while training (e.g. spectral norm's power-iteration
        vectors): training checkpoints store it so a resume continues exactly. Loaded back in place."""
        return {}

    def after_step(self) -> None:
        """Called after every phase of an optimizer step ran (e.g. to put the pipeline back as inference uses
        it before validation or export)."""
        return None


class SampleDraws:
    """An objective's random draws by name, each sample's from its own seed (the loop's seed of the sample's
    position in the data stream), one stream per name: they do not depend on the batch size, the number of
    processes or a resume. Parity tests inject an official run's recorded draws by replacing this object."""

    def __init__(self, streams: tuple[str, ...]):
        self.streams = {name: i + 1 for i, name in enumerate(streams)}
        self.seeds: list[int] = []

    def start(self, seeds: list[int]) -> None:
        """The samples of the batch about to be drawn for."""
        self.seeds = list(seeds)

    def _generators(self, name: str, count: int) -> list[torch.Generator]:
        if len(self.seeds) != count:
            raise RuntimeError(f"draws for {count} samples, seeds for {len(self.seeds)}")
        stream = self.streams[name]
        return [torch.Generator().manual_seed((seed * 16 + stream) % 2**63) for seed in self.seeds]

    def normal(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like `like` (float32, on its device)."""
        rows = [torch.randn(like.shape[1:], generator=g) for g in self._generators(name, like.shape[0])]
        return torch.stack(rows).to(like.device)

    def uniform(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """Uniform [0, 1) noise shaped like `like` (float32, on its device)."""
        rows = [torch.rand(like.shape[1:], generator=g) for g in self._generators(name, like.shape[0])]
        return torch.stack(rows).to(like.device)

    def timesteps(self, name: str, low: int, high: int, count: int, device: torch.device) -> torch.Tensor:
        """`randint(low, high)` per sample."""
        rows = [torch.randint(low, high, (1,), generator=g) for g in self._generators(name, count)]
        return torch.cat(rows).to(device)


def require_method(pipe, objective: str, method_id: str, what: str, hint: str = ""):
    """The pipeline's registered method when it is `method_id` (what the objective trains), else a ConfigError."""
    method = pipe.sr_method
    if method is None or method.id != method_id:
        message = f"objective = {objective} trains {what}, got method {getattr(method, 'id', None)}"
        raise ConfigError(f"{message}: {hint}" if hint else message)
    return method


def keep_trained_flags(model: torch.nn.Module, trained: set[int]) -> None:
    """peft's adapter switching turns requires_grad on and off; put it back to what the loop trains."""
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)


def add_adapter(model: torch.nn.Module, config, name: str, prefix: str) -> dict[str, torch.nn.Parameter]:
    """Add a peft LoRA adapter `name` beside the model's others (an objective's second or third model on one
    frozen base) and return its LoRA factors by `prefix.<parameter name>`."""
    with warnings.catch_warnings():  # peft warns about several adapters on one model: that is the point here
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        model.add_adapter(config, adapter_name=name)
    return {
        f"{prefix}.{key}": p
        for key, p in model.named_parameters()
        if f".lora_A.{name}." in key or f".lora_B.{name}." in key
    }


def settings_from_extra(cls, extra: dict, objective: str, choices: dict[str, tuple[str, ...]] | None = None):
    """An objective's settings dataclass from the config's `extra:` mapping: unknown keys and wrong types are
    ConfigErrors naming the key; fields ending in `timesteps` are [low, high] randint ranges within [0, 1000];
    `choices` names the fields that take one of a few words."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(extra) - fields)
    if unknown:
        raise ConfigError(f"extra: unknown {objective} setting(s) {unknown}; valid: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in extra.items():
        if key.endswith("timesteps"):
            ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(type(v) is int for v in value)
            if not ok or not 0 <= value[0] < value[1] <= 1000:
                raise ConfigError(f"extra.{key} = {value!r}: expected [low, high] with 0 <= low < high <= 1000")
            values[key] = (value[0], value[1])
        else:
            values[key] = coerce(f"extra.{key}", value, hints[key])
    settings = cls(**values)
    for key, allowed in (choices or {}).items():
        if getattr(settings, key) not in allowed:
            raise ConfigError(f"extra.{key} = {getattr(settings, key)!r}: expected one of {allowed}")
    return settings


_OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    _OBJECTIVES[cls.name] = cls
    return cls


def objective_names() -> list[str]:
    return sorted(_OBJECTIVES)


def get_objective(name: str) -> type[Objective]:
    if name not in _OBJECTIVES:
        raise ConfigError(f"objective = {name!r}: expected one of {objective_names()}")
    return _OBJECTIVES[name]
