"""A fixed or learned prompt embedding, for one-step SR models that need no text encoder (D3SR/DFOSD style)."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


class PromptEmbedding(ModelMixin, ConfigMixin):
    """Holds `embeds` of shape (1, num_tokens, dim); saved and loaded like any diffusers model."""

    @register_to_config
    def __init__(self, num_tokens: int = 77, dim: int = 1024):
        super().__init__()
        self.embeds = torch.nn.Parameter(torch.zeros(1, num_tokens, dim))

    def forward(self, batch_size: int = 1) -> torch.Tensor:
        return self.embeds.expand(batch_size, -1, -1)

    @classmethod
    def from_tensor(cls, embeds: torch.Tensor) -> "PromptEmbedding":
        if embeds.ndim == 2:
            embeds = embeds[None]
        if embeds.ndim != 3 or embeds.shape[0] != 1:
            raise ValueError(f"a prompt embedding must be (tokens, dim) or (1, tokens, dim), got {tuple(embeds.shape)}")
        module = cls(num_tokens=embeds.shape[1], dim=embeds.shape[2])
        with torch.no_grad():
            module.embeds.copy_(embeds.float())
        return module
