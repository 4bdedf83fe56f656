"""Write a diffusers SD2-style folder as an original (LDM / A1111 / ComfyUI) single-file checkpoint.

Test-only: it produces tiny `model.diffusion_model.*` / `first_stage_model.*` / `cond_stage_model.model.*`
files so the single-file loader can be checked without real SD weights.
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    sd = unet.state_dict()
    cfg = unet.config
    per_block = cfg.layers_per_block
    out = {}

    def put(diffusers_prefix, ldm_prefix, rename=None):
        for key, value in sd.items():
            if key.startswith(diffusers_prefix + "."):
                rest = key[len(diffusers_prefix) + 1 :]
                for old, new in (rename or {}).items():
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old) :]
                        break
                out[f"model.diffusion_model.{ldm_prefix}.{rest}"] = value

    put("time_embedding.linear_1", "time_embed.0")
    put("time_embedding.linear_2", "time_embed.2")
    put("add_embedding.linear_1", "label_emb.0.0")  # (SDXL's added text/time embedding)
    put("add_embedding.linear_2", "label_emb.0.2")
    put("conv_in", "input_blocks.0.0")
    put("conv_norm_out", "out.0")
    put("conv_out", "out.2")
    for i, _ in enumerate(cfg.down_block_types):
        for j in range(per_block):
            index = 1 + i * (per_block + 1) + j
            put(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{index}.0", RESNET)
            put(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{index}.1")
        put(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * (per_block + 1)}.0.op")
    put("mid_block.resnets.0", "middle_block.0", RESNET)
    put("mid_block.attentions.0", "middle_block.1")
    put("mid_block.resnets.1", "middle_block.2", RESNET)
    for i, block_type in enumerate(cfg.up_block_types):
        has_attention = "CrossAttn" in block_type
        for j in range(per_block + 1):
            index = i * (per_block + 1) + j
            put(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{index}.0", RESNET)
            put(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{index}.1")
        last = i * (per_block + 1) + per_block
        put(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{last}.{2 if has_attention else 1}.conv")
    assert len(out) == len(sd), "every UNet weight must be mapped"
    return out


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    sd = vae.state_dict()
    n = len(vae.config.block_out_channels)
    out = {}
    for key, value in sd.items():
        k = key
        for side in ("encoder", "decoder"):
            k = k.replace(f"{side}.conv_norm_out", f"{side}.norm_out")
            k = k.replace(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1")
            k = k.replace(f"{side}.mid_block.resnets.1", f"{side}.mid.block_2")
            if k.startswith(f"{side}.mid_block.attentions.0."):
                rest = k[len(f"{side}.mid_block.attentions.0.") :]
                for old, new in VAE_ATTN.items():
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old) :]
                        break
                k = f"{side}.mid.attn_1.{rest}"
                if value.ndim == 2:  # LDM uses 1x1 convs for the VAE attention projections
                    value = value[:, :, None, None]
        for i in range(n):
            k = k.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            k = k.replace(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")
            k = k.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block.")
            k = k.replace(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{n - 1 - i}.upsample.conv")
        k = k.replace(".conv_shortcut.", ".nin_shortcut.")
        out[f"first_stage_model.{k}"] = value
    return out


def openclip_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    # transformers 5 drops the `text_model.` level from CLIPTextModel's keys; 4.x has it
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    prefix = "cond_stage_model.model."
    out = {
        prefix + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": sd["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": sd["final_layer_norm.weight"],
        prefix + "ln_final.bias": sd["final_layer_norm.bias"],
    }
    for i in range(text_encoder.config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([sd[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[dst + f"attn.out_proj.{kind}"] = sd[src + f"self_attn.out_proj.{kind}"]
            out[dst + f"ln_1.{kind}"] = sd[src + f"layer_norm1.{kind}"]
            out[dst + f"ln_2.{kind}"] = sd[src + f"layer_norm2.{kind}"]
            out[dst + f"mlp.c_fc.{kind}"] = sd[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.c_proj.{kind}"] = sd[src + f"mlp.fc2.{kind}"]
    return out


def write_sd2_single_file(base_dir: Path, path: Path) -> Path:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(base_dir, subfolder="vae", local_files_only=True)
    text = CLIPTextModel.from_pretrained(base_dir, subfolder="text_encoder", local_files_only=True)
    state = {**unet_to_ldm(unet), **vae_to_ldm(vae), **openclip_to_ldm(text)}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    # SD3 single files store adaLN (shift, scale) where diffusers stores (scale, shift); the swap is its own inverse
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def sd3_transformer_to_ldm(transformer) -> dict[str, torch.Tensor]:
    sd = transformer.state_dict()
    p = "model.diffusion_model."
    out = {
        p + "pos_embed": sd["pos_embed.pos_embed"],
        p + "final_layer.adaLN_modulation.1.weight": _swap_halves(sd["norm_out.linear.weight"]),
        p + "final_layer.adaLN_modulation.1.bias": _swap_halves(sd["norm_out.linear.bias"]),
    }
    renames = {
        "pos_embed.proj": "x_embedder.proj",
        "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "context_embedder": "context_embedder",
        "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
        "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
        "proj_out": "final_layer.linear",
    }
    for src, dst in renames.items():
        for kind in ("weight", "bias"):
            out[f"{p}{dst}.{kind}"] = sd[f"{src}.{kind}"]
    n = transformer.config.num_layers
    for i in range(n):
        b, j = f"transformer_blocks.{i}.", f"{p}joint_blocks.{i}."
        last = i == n - 1
        for kind in ("weight", "bias"):
            out[f"{j}x_block.attn.qkv.{kind}"] = torch.cat([sd[f"{b}attn.to_{x}.{kind}"] for x in "qkv"])
            out[f"{j}context_block.attn.qkv.{kind}"] = torch.cat([sd[f"{b}attn.add_{x}_proj.{kind}"] for x in "qkv"])
            out[f"{j}x_block.attn.proj.{kind}"] = sd[f"{b}attn.to_out.0.{kind}"]
            out[f"{j}x_block.adaLN_modulation.1.{kind}"] = sd[f"{b}norm1.linear.{kind}"]
            context_mod = sd[f"{b}norm1_context.linear.{kind}"]
            out[f"{j}context_block.adaLN_modulation.1.{kind}"] = _swap_halves(context_mod) if last else context_mod
            out[f"{j}x_block.mlp.fc1.{kind}"] = sd[f"{b}ff.net.0.proj.{kind}"]
            out[f"{j}x_block.mlp.fc2.{kind}"] = sd[f"{b}ff.net.2.{kind}"]
            if not last:
                out[f"{j}context_block.attn.proj.{kind}"] = sd[f"{b}attn.to_add_out.{kind}"]
                out[f"{j}context_block.mlp.fc1.{kind}"] = sd[f"{b}ff_context.net.0.proj.{kind}"]
                out[f"{j}context_block.mlp.fc2.{kind}"] = sd[f"{b}ff_context.net.2.{kind}"]
    return out


def write_sd3_single_file(base_dir: Path, path: Path) -> Path:
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(base_dir, subfolder="transformer", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(base_dir, subfolder="vae", local_files_only=True)
    state = {**sd3_transformer_to_ldm(transformer), **vae_to_ldm(vae)}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
