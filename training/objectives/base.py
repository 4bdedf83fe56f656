"""What every objective gives the loop."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from ..config import ConfigError


@dataclass
class Phase:
    """Parameters stepped by one optimizer; the loop runs an objective's phases in their order every step."""

    name: str
    parameters: dict[str, torch.nn.Parameter]
    learning_rate: float
    # the list the optimizer and the clipping see, when it is not `parameters` in order (an official recipe's
    # order, or a parameter listed twice on purpose: then the optimizer runs its deterministic for-loop)
    optimizer_list: list[torch.nn.Parameter] | None = None

    def optimizer_params(self) -> list[torch.nn.Parameter]:
        return list(self.parameters.values()) if self.optimizer_list is None else self.optimizer_list

    @property
    def has_repeats(self) -> bool:
        params = self.optimizer_params()
        return len({id(p) for p in params}) != len(params)


class Objective(abc.ABC):
    """One method's training objective over a pipeline built for training (LoRA unfused, fp32 weights)."""

    name: str = ""

    @property
    @abc.abstractmethod
    def phases(self) -> list[Phase]: ...

    @abc.abstractmethod
    def losses(self, phase: str, batch: dict) -> dict[str, torch.Tensor]:
        """The losses of `phase` on a batch ({"hq", "lq", "seed", ...} on the device); "loss" is backpropagated."""

    def modules(self) -> list[torch.nn.Module]:
        """Modules to checkpoint for memory (gradient checkpointing)."""
        return []

    def after_step(self) -> None:
        """Called after every phase of an optimizer step ran (e.g. to put the pipeline back as inference uses
        it before validation or export)."""
        return None


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
