"""The DAPE / RAM image tagger: OSEDiff's prompt extractor (shared docs research-wave2.md 1.1-1.4).

Swin image encoder -> `image_proj` -> a tagging head of cross-attention-only BERT layers whose queries are
the 4585 label embeddings (`relu(wordvec_proj(label_embed))`) -> `fc` -> one logit per tag. A tag fires when
sigmoid(logit) is strictly above its own threshold; tags are listed in tag-list order, joined with ", ",
and the OSEDiff prompt is f"{tags}, {user_prompt},". Parameter names follow the official checkpoint.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .swin import SwinTransformer

DATA = Path(__file__).parent / "data"
TAG_LIST_FILE, THRESHOLD_FILE = DATA / "ram_tag_list.txt", DATA / "ram_tag_list_threshold.txt"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TAG_SEPARATOR = ", "


@cache
def tag_list() -> tuple[str, ...]:
    return tuple(TAG_LIST_FILE.read_text(encoding="utf-8").splitlines())


@cache
def tag_list_sha256() -> str:
    return hashlib.sha256(TAG_LIST_FILE.read_bytes()).hexdigest()


def official_thresholds() -> torch.Tensor:
    # RAM: v if v > 0.9 else min(v + 0, 0.9), i.e. the file values unchanged
    values = [float(v) for v in THRESHOLD_FILE.read_text(encoding="utf-8").split()]
    return torch.tensor([v if v > 0.9 else min(v, 0.9) for v in values], dtype=torch.float32)


def official_prompt(tags: str, user_prompt: str = "") -> str:
    """The prompt string OSEDiff's test script builds from the tags (with a trailing comma, as upstream)."""
    return f"{tags}, {user_prompt},"


class TaggingCrossAttention(nn.Module):
    """`crossattention.self`: queries from the label queries, keys/values from the image embeddings."""

    def __init__(self, hidden: int, encoder_width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(encoder_width, hidden)
        self.value = nn.Linear(encoder_width, hidden)

    def forward(self, h: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        def split(x):
            return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

        q, k, v = split(self.query(h)), split(self.key(image)), split(self.value(image))
        scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)  # the mask is all ones: nothing added
        out = scores.softmax(dim=-1) @ v
        return out.transpose(1, 2).reshape(h.shape)


class DenseLayerNorm(nn.Module):
    """BERT's `dense` + residual + `LayerNorm` (eps 1e-12)."""

    def __init__(self, inputs: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(inputs, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class TaggingLayer(nn.Module):
    def __init__(self, hidden: int, encoder_width: int, heads: int, intermediate: int):
        super().__init__()
        self.crossattention = nn.Module()
        self.crossattention.self = TaggingCrossAttention(hidden, encoder_width, heads)
        self.crossattention.output = DenseLayerNorm(hidden, hidden)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(hidden, intermediate)
        self.output = DenseLayerNorm(intermediate, hidden)

    def forward(self, h: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.crossattention.output(self.crossattention.self(h, image), h)
        return self.output(F.gelu(self.intermediate.dense(h)), h)


class RAMTagger(ModelMixin, ConfigMixin):
    r"""DAPE/RAM tagger (tagging parts only). Dims come from the config, so the real Swin-L and tiny test models
    share this code. The tag list and thresholds are the official files shipped with the package.

    API: `preprocess(images)`, `logits(pixel_values)`, `tags(images)`, `prompt(images, user_prompt)`.
    """

    validates_on_load = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """A local folder (`convert_tagger`), validated first: keys and shapes against the config, float dtypes,
        safetensors only, finite weights (see loading/validation.py). Never downloads."""
        from ..loading.validation import load_component

        return load_component(cls, pretrained_model_name_or_path, loader=super().from_pretrained, **kwargs)

    @register_to_config
    def __init__(
        self,
        image_size: int = 384,
        patch_size: int = 4,
        embed_dim: int = 192,
        depths: tuple[int, ...] = (2, 2, 18, 2),
        num_heads: tuple[int, ...] = (6, 12, 24, 48),
        window_size: int = 12,
        mlp_ratio: float = 4.0,
        image_embed_dim: int = 512,
        label_embed_dim: int = 512,
        num_tags: int = 4585,
        head_hidden: int = 768,
        head_layers: int = 2,
        head_heads: int = 4,
        head_intermediate: int = 3072,
        antialias: bool = False,
        tag_list_sha256: str | None = None,
    ):
        super().__init__()
        self.visual_encoder = SwinTransformer(
            image_size, patch_size, embed_dim, depths, num_heads, window_size, mlp_ratio
        )
        vision_width = embed_dim * 2 ** (len(depths) - 1)
        self.image_proj = nn.Linear(vision_width, image_embed_dim)
        self.label_embed = nn.Parameter(torch.zeros(num_tags, label_embed_dim))
        self.wordvec_proj = nn.Linear(label_embed_dim, head_hidden)
        self.tagging_head = nn.Module()
        self.tagging_head.encoder = nn.Module()
        self.tagging_head.encoder.layer = nn.ModuleList(
            TaggingLayer(head_hidden, image_embed_dim, head_heads, head_intermediate) for _ in range(head_layers)
        )
        self.fc = nn.Linear(head_hidden, 1)
        # a plain float32 attribute, as upstream: a buffer would be cast with the model (0.65 is 0.6484 in bf16)
        self.class_threshold = official_thresholds()[:num_tags]

    # ------------------------------------------------------------------ the API

    def preprocess(self, images: Any) -> torch.Tensor:
        """(N, 3, S, S) float32: a bilinear resize of each image to S x S (antialiased only if the config says so;
        the official pinned torchvision did not) and ImageNet normalisation. `images` as the pipelines take them."""
        from ..images import load_images

        size = self.config.image_size
        resized = [
            F.interpolate(
                lq.rgb, size=(size, size), mode="bilinear", align_corners=False, antialias=self.config.antialias
            )
            for lq in load_images(images)
        ]
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (torch.cat(resized) - mean) / std

    @torch.no_grad()
    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, num_tags) float32 logits for preprocessed images."""
        dtype, device = self.dtype, self.device
        image = self.image_proj(self.visual_encoder(pixel_values.to(device, dtype)))
        queries = F.relu(self.wordvec_proj(self.label_embed))[None].expand(image.shape[0], -1, -1)
        h = queries
        for layer in self.tagging_head.encoder.layer:
            h = layer(h, image)
        return self.fc(h).squeeze(-1).float()

    def tags(self, images: Any) -> list[str]:
        """Per image: the tags whose sigmoid score is strictly above their threshold, in tag-list order."""
        scores = self.logits(self.preprocess(images)).sigmoid().cpu()
        names = tag_list()
        fired = scores > self.class_threshold
        return [TAG_SEPARATOR.join(names[i] for i in row.nonzero().flatten().tolist()) for row in fired]

    def prompt(self, images: Any, user_prompt: str = "") -> list[str]:
        """Per image: exactly OSEDiff's prompt, f"{tags}, {user_prompt},"."""
        return [official_prompt(tags, user_prompt) for tags in self.tags(images)]
