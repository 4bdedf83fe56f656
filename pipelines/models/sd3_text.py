"""SD3 text conditioning from its three text encoders (docs: methods-tsdsr.md section 3).

Sequence: CLIP-L and CLIP-G penultimate hidden states side by side on the channel axis, zero-padded to
the transformer's joint dim, followed by T5's last hidden state (256 tokens; 256 zero tokens when
the folder has no T5). Pooled: both CLIPs' projected text embeddings side by side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

T5_TOKENS = 256


def _tokens(tokenizer, prompt: str, max_length: int) -> torch.Tensor:
    return tokenizer(
        prompt, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_sd3_prompt(
    prompt: str,
    clip_encoders: list[tuple[torch.nn.Module, object]],
    t5: tuple[torch.nn.Module, object] | None,
    joint_dim: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (1, 77 + 256, joint_dim), pooled (1, sum of CLIP projection dims))."""
    hidden, pooled = [], []
    for encoder, tokenizer in clip_encoders:
        ids = _tokens(tokenizer, prompt, tokenizer.model_max_length).to(encoder.device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2].float())
        pooled.append(out.text_embeds.float())
    clip = torch.cat(hidden, dim=-1)
    if clip.shape[-1] > joint_dim:
        raise ValueError(
            f"the CLIP text encoders give {clip.shape[-1]} channels, more than the transformer's {joint_dim}"
        )
    clip = F.pad(clip, (0, joint_dim - clip.shape[-1]))
    if t5 is None:
        t5_states = torch.zeros(1, T5_TOKENS, joint_dim, device=clip.device)
    else:
        encoder, tokenizer = t5
        t5_states = encoder(_tokens(tokenizer, prompt, T5_TOKENS).to(encoder.device))[0].float().to(clip.device)
    embeds = torch.cat([clip, t5_states], dim=1)
    return embeds.to(device, dtype), torch.cat(pooled, dim=-1).to(device, dtype)
