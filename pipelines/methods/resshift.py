"""The ResShift family on one implementation: TAD-SR and SinSR (one step at t = T - 1) and ResShift v1/v2 (15 steps)
and v3 (4 steps). Their checkpoints share one format key for key (parity README section 2): a `UNetModelSwin`
state dict (raw, or under 'state_dict'; `module.` / `_orig_mod.` prefixes stripped), with the Swin buffers
`relative_position_index` / `attn_mask` stored (accepted and checked, not required). The base is ResShift's
VQGAN-f4 `autoencoder_vq_f4.pth`. Which schedule a file uses comes from its official name (or `method=`).

Licences: SinSR CC BY-NC-SA 4.0; ResShift NTU S-Lab License 1.0 (non-commercial); TAD-SR code Apache-2.0 with no
public weights. The VQGAN comes from ResShift (S-Lab licence).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..loading.bases import _strip_wrappers, load_vq_f4
from ..loading.files import CheckpointError, MappedPages, WeightsProbe
from ..loading.lean import build_with_weights
from ..models.resshift_unet import ResShiftUNet, resshift_unet_config
from ..options import TileDefaults
from ..pipeline_onestep_sr_resshift import OneStepSRResShiftPipeline
from .registry import BaseModel, BuildOptions, Method, WeightFile, register

RECOMPUTED_BUFFERS = ("relative_position_index", "attn_mask")
VQ_BASE = BaseModel(
    name="ResShift VQGAN-f4",
    folder="autoencoder_vq_f4.pth",
    single_files=("autoencoder_vq_f4.pth",),
    hint="autoencoder_vq_f4.pth from zsyOAOA/ResShift (release v2.0), beside the UNet file or passed as the base",
)
# The latent has the LR's size; official chops are 512 LR px. Latent tiles of 256 (multiples of 64) here.
DEFAULTS = TileDefaults(color_fix="none", tile_size=256, tile_overlap=32)
# (steps, min_noise_level, clamp the first eta at sqrt(0.001), inference steps): TAD-SR / SinSR configs and
# ResShift's realsr_swinunet_realesrgan256(_journal).yaml
SCHEDULES = {
    "tadsr": (15, 0.04, True, 1),
    "sinsr": (15, 0.04, True, 1),
    "resshift-v1": (15, 0.04, False, 15),
    "resshift-v3": (4, 0.2, False, 4),
}
NON_COMMERCIAL = "non-commercial licence: check it before any commercial use"


def unet_state(state: dict) -> dict[str, torch.Tensor]:
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return {_strip_wrappers(k): v for k, v in state.items() if isinstance(k, str)}


def is_resshift_unet(keys) -> bool:
    keys = {_strip_wrappers(k.removeprefix("state_dict.")) for k in keys}
    return "input_blocks.0.0.weight" in keys and "middle_block.1.patch_embed.proj.weight" in keys


def _detector(*name_parts: str):
    def detect(probe: WeightsProbe) -> bool:
        if probe.is_dir:
            return False
        name = probe.path.name.lower()
        if name_parts and not any(part in name for part in name_parts):
            return False
        state = probe.state()
        keys = state["state_dict"].keys() if isinstance(state.get("state_dict"), dict) else state.keys()
        return is_resshift_unet(keys)

    return detect


def load_resshift_unet(state: dict, path: str | os.PathLike, dtype: torch.dtype) -> ResShiftUNet:
    state = unet_state(state)
    try:
        config = resshift_unet_config(state)
    except (KeyError, ValueError, IndexError) as err:
        raise CheckpointError(f"{path}: not a ResShift-family UNet (missing or malformed {err})") from err
    buffers = {k: v for k, v in state.items() if k.endswith(RECOMPUTED_BUFFERS)}
    weights = {k: v for k, v in state.items() if k not in buffers}
    unet = build_with_weights(lambda: ResShiftUNet(**config), weights, dtype, path, "UNet", MappedPages(path))
    ours = dict(unet.named_buffers())
    for name, stored in buffers.items():  # accepted and checked, not required
        mine = ours.get(name)
        if mine is None or mine.shape != stored.shape or not torch.equal(mine, stored.to(mine.dtype)):
            raise CheckpointError(
                f"{path}: the stored Swin buffer {name} does not match the one this UNet builds (training size "
                f"{config['image_size']}, window {config['window_size']}); wrong or edited checkpoint?"
            )
    return unet


def _builder(method_id: str):
    steps, min_noise, clamp, inference_steps = SCHEDULES[method_id]

    def build(base: str | os.PathLike, probe: WeightsProbe, options: BuildOptions) -> OneStepSRResShiftPipeline:
        unet = load_resshift_unet(probe.state(), probe.path, options.dtype)
        base_path = base if base is not None else probe.file(VQ_BASE.folder)
        vae = load_vq_f4(base_path, options.dtype)
        if vae.config.latent_channels != unet.config.in_channels:
            raise CheckpointError(
                f"{base_path}: the autoencoder's {vae.config.latent_channels}-channel latent does not fit the UNet's "
                f"{unet.config.in_channels} input channels; wrong autoencoder for these weights?"
            )
        return OneStepSRResShiftPipeline(
            vae=vae, unet=unet, num_train_steps=steps, min_noise_level=min_noise, clamp_etas_start=clamp,
            num_inference_steps=inference_steps, method=method_id,
        )  # fmt: skip

    return build


def trainable(pipe: OneStepSRResShiftPipeline) -> dict[str, torch.nn.Parameter]:
    """The ResShift family trains its whole UNet (the VQGAN stays frozen)."""
    return {f"unet.{name}": p for name, p in pipe.unet.named_parameters()}


def write_weights(pipe: OneStepSRResShiftPipeline, path: str | os.PathLike) -> Path:
    """The official UNet file as the official trainers save it: `{"state_dict": ...}` with the official key names
    and the Swin buffers (`relative_position_index`, `attn_mask`) the official model stores, readable with
    weights_only=True. The file name picks the schedule at load time (see the detectors): name it as the method
    it is (e.g. TAD-SR.pth for the one-step computation). Written to a temporary name, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().clone() for k, v in pipe.unet.state_dict().items()}
    for name, buffer in pipe.unet.named_buffers():
        if name.endswith(RECOMPUTED_BUFFERS):
            stored = buffer.detach().cpu().clone()
            state[name] = stored if name.endswith("relative_position_index") else stored.float()
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": state}, tmp)
    tmp.replace(path)
    return path


def _method(method_id: str, display: str, files: tuple[WeightFile, ...], detect, licence: str) -> Method:
    return register(
        Method(
            id=method_id,
            display_name=display,
            pipeline_class=OneStepSRResShiftPipeline,
            detect=detect,
            build=_builder(method_id),
            weight_files=files,
            base=VQ_BASE,
            defaults=DEFAULTS,
            licence=licence,
            aliases=(display, "ResShift", "Swin-UNet"),
            trainable=trainable,
            write_weights=write_weights,
        )
    )


# Name-specific detectors first: a file with another name falls through to the default, one-step TAD-SR.
RESSHIFT_V3 = _method(
    "resshift-v3",
    "ResShift v3 (4 steps)",
    (WeightFile("resshift_realsrx4_s4_v3.pth", "zsyOAOA/ResShift release v2.0"),),
    _detector("s4_v3"),
    f"ResShift: NTU S-Lab License 1.0, {NON_COMMERCIAL}.",
)
RESSHIFT_V1 = _method(
    "resshift-v1",
    "ResShift v1/v2 (15 steps)",
    (WeightFile("resshift_realsrx4_s15_v1.pth", "zsyOAOA/ResShift release v2.0 (or _s15_v2)"),),
    _detector("s15_v1", "s15_v2"),
    f"ResShift: NTU S-Lab License 1.0, {NON_COMMERCIAL}.",
)
SINSR = _method(
    "sinsr",
    "SinSR",
    (WeightFile("SinSR_v1.pth", "wyf0912/SinSR release"),),
    _detector("sinsr"),
    f"SinSR: CC BY-NC-SA 4.0, {NON_COMMERCIAL}.",
)
TADSR = _method(
    "tadsr",
    "TAD-SR",
    (WeightFile("TAD-SR.pth", "LearningHx/TAD-SR (no public download); same format as SinSR/ResShift"),),
    _detector(),
    "TAD-SR code: Apache-2.0 (LearningHx/TAD-SR); no public weights. The VQGAN base: ResShift's S-Lab licence "
    f"({NON_COMMERCIAL}).",
)
