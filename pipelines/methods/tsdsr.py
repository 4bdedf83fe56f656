"""TSD-SR (Microtreei/TSD-SR): SD3-medium transformer + VAE encoder with LoRA, one flow step at sigma = 1.

Weights: a folder with `transformer.safetensors` and `vae.safetensors` (peft LoRA keys, both behind a
`transformer.` prefix — the VAE file too, an upstream quirk; lora_alpha = rank, so scale 1) and the
fixed prompt embeddings `prompt_embeds.pt` (333 x 4096) and `pool_embeds.pt` (2048).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..loading.bases import load_sd3_base
from ..loading.files import CheckpointError, MappedPages, WeightsProbe, read_weight_keys, read_weights
from ..loading.lora import LoRAWeights, apply_lora, collect_lora_factors
from ..models.prompt_embedding import PromptEmbedding
from ..options import TileDefaults
from ..pipeline_onestep_sr_sd3 import OneStepSRSD3Pipeline
from .registry import BaseModel, BuildOptions, Method, WeightFile, register

TRANSFORMER_FILE, VAE_FILE = "transformer.safetensors", "vae.safetensors"
EMBEDDING_FILES = ("prompt_embeds.pt", "pool_embeds.pt")
EMBEDDINGS_SAFETENSORS = "embeddings.safetensors"
TIMESTEP = 1000.0  # sigma = 1


def _lora_keys_under(keys: dict[str, tuple[int, ...]], prefix: str) -> bool:
    return bool(keys) and all(k.startswith(prefix) for k in keys) and any(".lora_A." in k for k in keys)


def is_transformer_lora(keys: dict[str, tuple[int, ...]]) -> bool:
    # saved by StableDiffusion3Pipeline.save_lora_weights: peft keys behind a `transformer.` prefix
    return _lora_keys_under(keys, "transformer.") and any(".transformer_blocks." in k for k in keys)


def is_vae_lora(keys: dict[str, tuple[int, ...]]) -> bool:
    # the TSD-SR quirk: the VAE-encoder LoRA file carries the `transformer.` prefix too
    return _lora_keys_under(keys, "transformer.") and all(
        k.startswith(("transformer.encoder.", "transformer.quant_conv.")) for k in keys
    )


def detect(probe: WeightsProbe) -> bool:
    if probe.is_dir:
        return probe.file(TRANSFORMER_FILE) is not None or probe.file(VAE_FILE) is not None
    keys = probe.keys()
    return is_transformer_lora(keys) or is_vae_lora(keys)


def parse_tsdsr_lora(state: dict[str, torch.Tensor], path: str | os.PathLike = "<weights>") -> LoRAWeights:
    """TSD-SR LoRA (transformer or VAE file): prefix `transformer.` stripped; lora_alpha = r, so scale 1."""
    stripped = {k[len("transformer.") :]: v for k, v in state.items()}
    return LoRAWeights(collect_lora_factors(stripped, path), 1.0)


def lora_files(probe: WeightsProbe) -> tuple[Path, Path]:
    """(transformer file, VAE file) from the folder or the transformer file the user gave."""
    path = probe.path
    if path.is_dir():
        missing = [name for name in (TRANSFORMER_FILE, VAE_FILE) if probe.file(name) is None]
        if missing:
            raise CheckpointError(
                f"{path}: a weights folder must hold the TSD-SR LoRA files {(TRANSFORMER_FILE, VAE_FILE)}; "
                f"missing {missing}. (Methods whose weights are one file take that file itself.)"
            )
        return path / TRANSFORMER_FILE, path / VAE_FILE
    if is_vae_lora(probe.keys()):
        raise CheckpointError(
            f"{path}: this is the TSD-SR VAE LoRA; pass the folder holding {TRANSFORMER_FILE} and "
            f"{VAE_FILE}, or the transformer file (with {VAE_FILE} beside it)"
        )
    vae_path = path.parent / VAE_FILE
    if not vae_path.is_file():
        raise CheckpointError(f"{path}: TSD-SR needs its VAE-encoder LoRA too; expected {vae_path}")
    if not is_vae_lora(probe.keys(vae_path)):
        raise CheckpointError(f"{vae_path}: not a TSD-SR VAE LoRA (keys transformer.encoder.*.lora_A.weight expected)")
    return path, vae_path


def read_tsdsr_embeddings(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled) from a folder with prompt_embeds.pt + pool_embeds.pt, or a safetensors file with both."""
    path = Path(path)
    if path.is_dir():
        pt = tuple(path / name for name in EMBEDDING_FILES)
        if all(p.is_file() for p in pt):
            embeds, pooled = (read_weights(p, allow_tensor=True) for p in pt)
        else:
            files = sorted(path.glob("*.safetensors"))
            found = [f for f in files if {"prompt_embeds", "pool_embeds"} <= set(read_weight_keys(f))]
            if not found:
                raise CheckpointError(
                    f"{path}: no TSD-SR embeddings found; expected prompt_embeds.pt and pool_embeds.pt "
                    "(or a .safetensors file with tensors prompt_embeds and pool_embeds)"
                )
            state = read_weights(found[0])
            embeds, pooled = state["prompt_embeds"], state["pool_embeds"]
    else:
        state = read_weights(path)
        if not {"prompt_embeds", "pool_embeds"} <= state.keys():
            raise CheckpointError(
                f"{path}: expected tensors 'prompt_embeds' and 'pool_embeds', found {sorted(state)[:6]}"
            )
        embeds, pooled = state["prompt_embeds"], state["pool_embeds"]
    for name, t, ndim in (("prompt_embeds", embeds, 3), ("pool_embeds", pooled, 2)):
        if not isinstance(t, torch.Tensor) or t.ndim not in (ndim - 1, ndim):
            raise CheckpointError(
                f"{path}: {name} must be a tensor of {ndim - 1} or {ndim} dims, got {getattr(t, 'shape', t)}"
            )
    return embeds, pooled


def find_tsdsr_embeddings(weights_dir: Path, embeddings: str | os.PathLike | None):
    if embeddings is not None:
        return read_tsdsr_embeddings(embeddings)
    for candidate in (weights_dir, weights_dir / "embeddings"):
        if (candidate / EMBEDDING_FILES[0]).is_file() or (candidate / EMBEDDINGS_SAFETENSORS).is_file():
            return read_tsdsr_embeddings(candidate)
    raise CheckpointError(
        f"TSD-SR prompt embeddings not found beside the weights ({weights_dir} or {weights_dir / 'embeddings'}): "
        "put the official prompt_embeds.pt and pool_embeds.pt there, or pass embeddings=FOLDER_OR_FILE"
    )


def _check_embeddings_fit(embeds: torch.Tensor, pooled: torch.Tensor, transformer, source) -> None:
    cfg = transformer.config
    if embeds.shape[-1] != cfg.joint_attention_dim or pooled.shape[-1] != cfg.pooled_projection_dim:
        raise CheckpointError(
            f"{source}: prompt embeddings {tuple(embeds.shape)} / pooled {tuple(pooled.shape)} do not fit the base "
            f"transformer (joint_attention_dim {cfg.joint_attention_dim}, "
            f"pooled_projection_dim {cfg.pooled_projection_dim})"
        )


def build(base: str | os.PathLike, probe: WeightsProbe, options: BuildOptions) -> OneStepSRSD3Pipeline:
    transformer_file, vae_file = lora_files(probe)
    embeddings = options.extra.get("embeddings")
    embeds, pooled = find_tsdsr_embeddings(transformer_file.parent, embeddings)
    components = load_sd3_base(base, options.base_config, options.dtype)
    for name, file in (("transformer", transformer_file), ("vae", vae_file)):
        lora = parse_tsdsr_lora(probe.state(file), file)
        release = MappedPages(file).release  # (the official rank-64 transformer LoRA is 0.36 GB)
        apply_lora(
            components[name], lora, fuse=options.fuse_lora, adapter_name=ADAPTER, source=str(file), release=release
        )
    _check_embeddings_fit(embeds, pooled, components["transformer"], embeddings or transformer_file.parent)
    # TSD-SR: t = 1000 (sigma 1), latents scaled by 1.5305 WITHOUT the shift factor, as it was trained
    return OneStepSRSD3Pipeline(
        **components,
        prompt_embedding=PromptEmbedding.from_tensors(embeds, pooled),
        timestep=TIMESTEP,
        use_shift_factor=False,
        method=METHOD.id,
    )


ADAPTER = "tsdsr"


def trainable(pipe: OneStepSRSD3Pipeline) -> dict[str, torch.nn.Parameter]:
    """TSD-SR's trainable weights: the transformer and VAE-encoder LoRA factors."""
    params = {
        f"{component}.{name}": p
        for component in ("transformer", "vae")
        for name, p in getattr(pipe, component).named_parameters()
        if f".lora_A.{ADAPTER}." in name or f".lora_B.{ADAPTER}." in name
    }
    if not params:
        raise ValueError("this TSD-SR pipeline holds no LoRA layers: build it with load_pipeline(..., fuse_lora=False)")
    return params


def write_weights(pipe: OneStepSRSD3Pipeline, folder: str | os.PathLike) -> Path:
    """The official folder: transformer.safetensors and vae.safetensors (peft keys without adapter name behind a
    `transformer.` prefix, both files, as the official release), plus the prompt embeddings as one
    embeddings.safetensors (prompt_embeds, pool_embeds)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, torch.Tensor]] = {"transformer": {}, "vae": {}}
    for key, p in trainable(pipe).items():
        component, name = key.split(".", 1)
        official = "transformer." + name.replace(f".{ADAPTER}.", ".")
        files[component][official] = p.detach().float().cpu().contiguous()
    save_file(files["transformer"], str(folder / TRANSFORMER_FILE), metadata={"format": "pt"})
    save_file(files["vae"], str(folder / VAE_FILE), metadata={"format": "pt"})
    embedding = pipe.prompt_embedding
    save_file(
        {"prompt_embeds": embedding.embeds.detach().float().cpu()[0].contiguous(),
         "pool_embeds": embedding.pooled.detach().float().cpu()[0].contiguous()},
        str(folder / EMBEDDINGS_SAFETENSORS),
    )  # fmt: skip
    return folder


METHOD = register(
    Method(
        id="tsdsr",
        display_name="TSD-SR",
        pipeline_class=OneStepSRSD3Pipeline,
        detect=detect,
        build=build,
        weights_layout="folder",
        folder_marker=TRANSFORMER_FILE,
        weight_files=(
            WeightFile(TRANSFORMER_FILE, "Microtreei/TSD-SR, checkpoint/tsdsr/transformer.safetensors"),
            WeightFile(VAE_FILE, "Microtreei/TSD-SR, checkpoint/tsdsr/vae.safetensors"),
            WeightFile(EMBEDDING_FILES[0], "Microtreei/TSD-SR, dataset/default/prompt_embeds.pt"),
            WeightFile(EMBEDDING_FILES[1], "Microtreei/TSD-SR, dataset/default/pool_embeds.pt"),
            WeightFile(EMBEDDINGS_SAFETENSORS, "written by `onestep_sr convert` (both embeddings)", optional=True),
        ),
        base=BaseModel(
            name="SD3-medium",
            folder="stable-diffusion-3-medium-diffusers",
            single_files=("sd3_medium.safetensors",),
            hint="a diffusers folder with transformer/ vae/ scheduler/ (text encoders optional), or the single "
            "file sd3_medium.safetensors",
        ),
        # official: wavelet colour fix (--align_method), latent tiles of 64 with 8 overlap
        defaults=TileDefaults(color_fix="wavelet", tile_size=64, tile_overlap=8),
        licence="TSD-SR code and weights: Apache-2.0 (Microtreei/TSD-SR README). The SD3-medium base model: "
        "Stability AI Community License (stabilityai).",
        extra_options=("embeddings",),
        aliases=("TSD-SR", "target score distillation"),
        trainable=trainable,
        write_weights=write_weights,
    )
)
