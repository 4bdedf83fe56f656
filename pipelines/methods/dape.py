"""DAPE (OSEDiff's prompt extractor): RAM's `ram_swin_large_14m.pth` plus the LoRA-only `DAPE.pth`, merged.

Not an SR method (it registers no `Method`): a model with its own files, detectors and loader, used as the
`tagger` component of pipelines that take one. Formats (shared docs research-wave2.md 1.2, parity README 4-5):
- base: `torch.save({"model": state_dict})`; only the tagging parts are read (visual_encoder, image_proj,
  label_embed, wordvec_proj, tagging_head, fc); the captioning BERTs (tag_encoder, text_decoder) and the
  recomputable Swin buffers (relative_position_index, attn_mask) are dropped.
- LoRA: a flat dict of loralib tensors `<module>.lora_A` / `.lora_B` (r = 8, lora_alpha 1, so scale 1/8). The Swin
  qkv is a MergedLinear with LoRA on q and v only; the tagging head has LoRA on cross-attention query and key.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from ..loading.bases import quiet_diffusers
from ..loading.devices import resolve_device, resolve_dtype
from ..loading.files import CheckpointError, MappedPages, read_weights
from ..loading.lean import build_with_weights
from ..loading.validation import checkpoint_errors, read_json
from ..models.ram_tagger import RAMTagger, tag_list_sha256
from .registry import WeightFile

RAM_FILE = WeightFile("ram_swin_large_14m.pth", "xinyu1205/recognize_anything_model, ram_swin_large_14m.pth")
DAPE_FILE = WeightFile("DAPE.pth", "cswry/OSEDiff, preset/models/DAPE.pth")
TAGGER_FILES = (RAM_FILE, DAPE_FILE)
LICENCE = "RAM: Apache-2.0 (xinyu1205/recognize-anything); DAPE: Apache-2.0 (cswry/SeeSR README)."
# loralib's default lora_alpha, which DAPE never overrides: scale = 1 / r = 1/8
LORA_ALPHA = 1.0
TAGGING_PREFIXES = ("visual_encoder.", "image_proj.", "label_embed", "wordvec_proj.", "tagging_head.", "fc.")
UNUSED_PREFIXES = ("tag_encoder.", "text_decoder.")
RECOMPUTED_BUFFERS = ("relative_position_index", "attn_mask")
# RAM's q2l_config.json: 4 heads in the tagging head (head count is not visible in the weights' shapes)
HEAD_HEADS = 4


def is_ram_base(keys) -> bool:
    return any(k.startswith("visual_encoder.") and k.endswith("attn.qkv.weight") for k in keys)


def is_lora_only(keys) -> bool:
    keys = [k for k in keys if isinstance(k, str)]
    return bool(keys) and all(".lora_" in k for k in keys)


def config_from_state(state: dict[str, torch.Tensor], path: str | os.PathLike) -> dict[str, Any]:
    """The tagger's dims, read from the weights' shapes (so one loader serves the real Swin-L and tiny models)."""
    try:
        proj = state["visual_encoder.patch_embed.proj.weight"]
        stages = sorted({int(m.group(1)) for k in state if (m := re.match(r"visual_encoder\.layers\.(\d+)\.", k))})
        depths = [
            len({k.split(".")[4] for k in state if k.startswith(f"visual_encoder.layers.{s}.blocks.")}) for s in stages
        ]
        tables = [state[f"visual_encoder.layers.{s}.blocks.0.attn.relative_position_bias_table"] for s in stages]
        window = (round(tables[0].shape[0] ** 0.5) + 1) // 2
        layers = {int(m.group(1)) for k in state if (m := re.match(r"tagging_head\.encoder\.layer\.(\d+)\.", k))}
        fc1 = state["visual_encoder.layers.0.blocks.0.mlp.fc1.weight"]
        return dict(
            patch_size=proj.shape[-1],
            embed_dim=proj.shape[0],
            depths=tuple(depths),
            num_heads=tuple(t.shape[1] for t in tables),
            window_size=window,
            mlp_ratio=fc1.shape[0] / proj.shape[0],
            image_embed_dim=state["image_proj.weight"].shape[0],
            label_embed_dim=state["label_embed"].shape[1],
            num_tags=state["label_embed"].shape[0],
            head_hidden=state["wordvec_proj.weight"].shape[0],
            head_layers=len(layers),
            head_heads=HEAD_HEADS,
            head_intermediate=state["tagging_head.encoder.layer.0.intermediate.dense.weight"].shape[0],
        )
    except (KeyError, IndexError, AttributeError) as err:
        raise CheckpointError(f"{path}: not a RAM tagger checkpoint (missing or malformed {err})") from err


def tagging_state(state: dict[str, Any], path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tagging parts of an official RAM checkpoint (dict with "model", or the state dict itself)."""
    if isinstance(state.get("model"), dict):
        state = state["model"]
    keys = [k for k in state if isinstance(k, str)]
    if is_lora_only(keys):
        raise CheckpointError(
            f"{path}: this file holds only LoRA weights (like DAPE.pth), not the RAM base model; pass it as the "
            f"tagger LoRA and the RAM base ({RAM_FILE.name}) as the base. (Used as a base it would leave the tagger "
            "randomly initialised, the cause of the 'baseball glove' tags users report.)"
        )
    if not is_ram_base(keys):
        raise CheckpointError(
            f"{path}: not a RAM checkpoint (no visual_encoder.*.attn.qkv.weight); expected {RAM_FILE.name} "
            f"({RAM_FILE.source}) or a converted tagger"
        )
    return {
        k: v
        for k, v in state.items()
        if k.startswith(TAGGING_PREFIXES) and not k.endswith(RECOMPUTED_BUFFERS) and isinstance(v, torch.Tensor)
    }


def head_count(head_config: str | os.PathLike | dict | None) -> int | None:
    """num_attention_heads from a q2l_config.json path or a dict of its values (None: not given)."""
    if head_config is None:
        return None
    values = head_config if isinstance(head_config, dict) else read_json(Path(head_config))
    heads = values.get("num_attention_heads")
    if isinstance(heads, bool) or not isinstance(heads, int) or not 1 <= heads <= 1024:
        raise CheckpointError(f"{head_config}: num_attention_heads={heads!r}; expected a whole number 1..1024")
    return heads


def build_tagger(state: dict[str, torch.Tensor], path: str | os.PathLike, **config: Any) -> RAMTagger:
    for name, t in state.items():
        if not t.is_floating_point():
            raise CheckpointError(f"{path}: {name} is {t.dtype}; tagger weights must be floating point")
    dims = {**config_from_state(state, path), **config}
    if dims["head_hidden"] % dims["head_heads"]:
        raise CheckpointError(
            f"{path}: the tagging head's width {dims['head_hidden']} is not divisible by {dims['head_heads']} heads"
        )
    # float32 first: the DAPE LoRA merges in float32, as upstream, and the cast comes after
    return build_with_weights(lambda: RAMTagger(**dims), state, torch.float32, path, "tagger", MappedPages(path))


def merge_dape_lora(tagger: RAMTagger, lora: dict[str, Any], path: str | os.PathLike) -> int:
    """W += (B @ A) / r for every DAPE LoRA pair (float64 sums); returns how many layers changed."""
    modules = dict(tagger.named_modules())
    head_layers = tagger.config.head_layers
    merged = 0
    for key in sorted(k for k in lora if isinstance(k, str) and k.endswith(".lora_A")):
        name = key[: -len(".lora_A")]
        a, b = lora[key], lora.get(name + ".lora_B")
        if b is None:
            raise CheckpointError(f"{path}: {key} has no matching {name}.lora_B; the file looks truncated")
        target = name
        tied = re.match(r"tag_encoder\.encoder\.layer\.(\d+)\.crossattention\.self\.(query|key)$", name)
        if tied and int(tied.group(1)) < head_layers:
            # these layers share the tagging head's weight upstream, and eval() merges their LoRA into it too
            target = f"tagging_head.encoder.layer.{tied.group(1)}.crossattention.self.{tied.group(2)}"
        elif name.startswith(UNUSED_PREFIXES):
            continue  # the captioning BERTs are not part of the tagger
        module = modules.get(target)
        if not isinstance(module, torch.nn.Linear):
            raise CheckpointError(f"{path}: LoRA {name!r} fits no linear layer of the tagger; is this a DAPE file?")
        _merge(module, a, b, name.startswith("visual_encoder.") and name.endswith("attn.qkv"), path, name)
        merged += 1
    if merged == 0:
        raise CheckpointError(f"{path}: no LoRA for the tagger found (keys like visual_encoder.*.attn.qkv.lora_A)")
    return merged


def _merge(module: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor, qkv: bool, path, name: str) -> None:
    w = module.weight
    if qkv:  # loralib MergedLinear(enable_lora=[q, -, v]): A is (2r, C), B is (2C, r); k rows unchanged
        c = w.shape[1]
        r = a.shape[0] // 2
        if a.shape != (2 * r, c) or b.shape != (2 * c, r) or w.shape[0] != 3 * c:
            raise CheckpointError(
                f"{path}: {name} LoRA A {tuple(a.shape)} B {tuple(b.shape)} does not fit qkv {tuple(w.shape)}"
            )
        delta = torch.zeros(w.shape, dtype=torch.float64)
        delta[:c] = b[:c].double() @ a[:r].double()
        delta[2 * c :] = b[c:].double() @ a[r:].double()
    else:
        r = a.shape[0]
        if a.shape != (r, w.shape[1]) or b.shape != (w.shape[0], r):
            raise CheckpointError(
                f"{path}: {name} LoRA A {tuple(a.shape)} B {tuple(b.shape)} does not fit {tuple(w.shape)}"
            )
        delta = b.double() @ a.double()
    with torch.no_grad():
        w.copy_((w.double() + delta * (LORA_ALPHA / r)).to(w.dtype))


def load_tagger(
    base: str | os.PathLike,
    lora: str | os.PathLike | None = None,
    dtype: Any = None,
    device: Any = None,
    antialias: bool = False,
    head_config: str | os.PathLike | dict | None = None,
) -> RAMTagger:
    """The DAPE tagger from the official RAM base (+ the DAPE LoRA, merged), or from a converted folder or file.

    Args:
        base: `ram_swin_large_14m.pth` (dict with "model"), or a folder/`.safetensors` written by `convert_tagger`.
        lora: `DAPE.pth` (loralib LoRA, merged into the weights at load). Without it the plain RAM tagger is used.
        dtype / device: as `load_pipeline` (None: fp32 on the CPU).
        antialias: resize with antialiasing in `preprocess` (better on large inputs; differs from the official
            output, which resized without it). Stored in the tagger's config.
        head_config: the tagging head's BERT config, which the weights cannot show its attention head count: the
            official `q2l_config.json` (a path) or its values (`{"num_attention_heads": 4}`). Default: the released
            RAM's 4 heads. (A converted folder records its own.)
    """
    path = Path(base)
    heads = head_count(head_config)
    with checkpoint_errors(path, "a RAM tagger"):
        if path.is_dir():
            tagger = _load_converted_folder(path)
        else:
            extra = {} if heads is None else {"head_heads": heads}
            tagger = build_tagger(tagging_state(read_weights(path), path), path, **extra)
    if lora is not None:
        with checkpoint_errors(lora, "a DAPE LoRA"):
            lora_state = read_weights(lora)
            if not is_lora_only(lora_state):
                raise CheckpointError(f"{lora}: not a LoRA-only file like {DAPE_FILE.name} (it has non-LoRA keys)")
            merge_dape_lora(tagger, lora_state, lora)
    tagger.register_to_config(antialias=bool(antialias))
    device = resolve_device(device) if device is not None else torch.device("cpu")
    with quiet_diffusers():
        return tagger.to(device=device, dtype=resolve_dtype(dtype, device)).eval()


def _load_converted_folder(folder: Path) -> RAMTagger:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder}: not a converted tagger folder (no config.json)")
    config = read_json(config_file)
    if config.get("_class_name") != RAMTagger.__name__:
        raise CheckpointError(f"{folder}: config.json is for {config.get('_class_name')!r}, not a {RAMTagger.__name__}")
    if config.get("tag_list_sha256") not in (None, tag_list_sha256()):
        raise CheckpointError(
            f"{folder}: converted with another tag list (sha256 {config['tag_list_sha256']}); this package ships "
            f"{tag_list_sha256()}. Convert the tagger again with this version."
        )
    return RAMTagger.from_pretrained(folder)  # validated there (keys, shapes, dtypes, finite)


def convert_tagger(
    base: str | os.PathLike, lora: str | os.PathLike | None, out_dir: str | os.PathLike, dtype: Any = "fp16"
) -> Path:
    """Write the tagger (LoRA merged) as a diffusers-style folder (config.json + safetensors) in fp16 or fp32."""
    tagger = load_tagger(base, lora, dtype=dtype)
    tagger.register_to_config(tag_list_sha256=tag_list_sha256())
    out_dir = Path(out_dir)
    tagger.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def find_tagger_files(folder: Path) -> tuple[Path, Path | None] | None:
    """(RAM base, DAPE LoRA or None) under their official names in `folder`, if the base is there."""
    base = folder / RAM_FILE.name
    if not base.is_file():
        return None
    dape = folder / DAPE_FILE.name
    return base, dape if dape.is_file() else None
