"""Model classes of our own (diffusers-style: ModelMixin + ConfigMixin), for parts diffusers does not have."""

from .prompt_embedding import PromptEmbedding
from .ram_tagger import RAMTagger
from .resshift_unet import ResShiftUNet

__all__ = ["PromptEmbedding", "RAMTagger", "ResShiftUNet"]
