"""A fixed or learned prompt embedding, for one-step SR models that run without text encoders.

D3SR/DFOSD learn one; TSD-SR ships fixed SD3 embeddings (a sequence plus a pooled vector).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


class PromptEmbedding(ModelMixin, ConfigMixin):
    """`embeds` (1, num_tokens, dim) and, when pooled_dim > 0, `pooled` (1, pooled_dim); saved like any diffusers
    model."""

    @register_to_config
    def __init__(self, num_tokens: int = 77, dim: int = 1024, pooled_dim: int = 0):
        super().__init__()
        self.embeds = torch.nn.Parameter(torch.zeros(1, num_tokens, dim))
        self.pooled = torch.nn.Parameter(torch.zeros(1, pooled_dim)) if pooled_dim > 0 else None

    def to_conditioning(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The embedding as the denoiser's conditioning (differentiable: D3SR trains it; inference runs it under
        no_grad)."""
        pooled = None if self.pooled is None else self.pooled.to(device, dtype)
        return self.embeds.to(device, dtype), pooled

    @classmethod
    def from_tensors(cls, embeds: torch.Tensor, pooled: torch.Tensor | None = None) -> PromptEmbedding:
        if embeds.ndim == 2:
            embeds = embeds[None]
        if embeds.ndim != 3 or embeds.shape[0] != 1:
            raise ValueError(f"a prompt embedding must be (tokens, dim) or (1, tokens, dim), got {tuple(embeds.shape)}")
        if pooled is not None:
            pooled = pooled.reshape(1, -1)
        module = cls(
            num_tokens=embeds.shape[1], dim=embeds.shape[2], pooled_dim=0 if pooled is None else pooled.shape[1]
        )
        with torch.no_grad():
            module.embeds.copy_(embeds.float())
            if pooled is not None:
                module.pooled.copy_(pooled.float())
        return module
