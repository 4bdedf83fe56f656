"""Turning user images into model inputs and model outputs back into user images.

Every pipeline shares this: accepted input types, the upsampling that defines the model
input, padding to the VAE/patch grid and cropping it away, alpha handling and output types.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F

# Largest output side we accept; beyond this even a tiled run is unreasonable for one image.
MAX_OUTPUT_SIDE = 32768


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")  # what a folder of inputs holds


class ImageInputError(ValueError):
    """An input image that the pipelines cannot process (shape, dtype, range, NaN ...)."""


@dataclass
class LQImage:
    """One low-quality input: float RGB in [0, 1] as (1, 3, H, W), optional alpha (1, 1, H, W).

    `pil_rgb` keeps the 8-bit image when the input was 8-bit, so upsampling can run in
    Pillow on the very same bytes as the official OSEDiff code (bit-identical model input).
    """

    rgb: torch.Tensor
    alpha: torch.Tensor | None = None
    pil_rgb: PIL.Image.Image | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)"""
        return self.rgb.shape[-2], self.rgb.shape[-1]


def load_images(image: Any) -> list[LQImage]:
    """Accept a PIL image, an HWC numpy array, a CHW/NCHW torch tensor, or a list of them."""
    if isinstance(image, (list, tuple)):
        if len(image) == 0:
            raise ImageInputError("got an empty list of images; pass at least one image")
        out: list[LQImage] = []
        for item in image:
            out.extend(load_images(item))
        return out
    if isinstance(image, PIL.Image.Image):
        return [_from_pil(image)]
    if isinstance(image, np.ndarray):
        return _from_numpy(image)
    if isinstance(image, torch.Tensor):
        return _from_tensor(image)
    raise ImageInputError(
        f"unsupported image type {type(image).__name__}; expected a PIL image, an HWC numpy array, "
        "a CHW/NCHW torch tensor in [0, 1], or a list of them"
    )


def image_sizes(image: Any) -> list[tuple[int, int]] | None:
    sizes = _shape_sizes(image)
    return sizes if sizes and all(h > 0 and w > 0 for h, w in sizes) else None


def _shape_sizes(image: Any) -> list[tuple[int, int]] | None:
    """(height, width) of each image `load_images` would return, from shapes alone (nothing converted), so
    hopeless sizes are refused before a large input is copied; None where the input is not understood (then
    `load_images` gives the error)."""
    if isinstance(image, (list, tuple)):
        sizes = [_shape_sizes(item) for item in image]
        return None if not sizes or any(s is None for s in sizes) else [hw for s in sizes for hw in s]
    if isinstance(image, PIL.Image.Image):
        swap = exif_orientation(image) in SWAPPING_ORIENTATIONS
        return [(image.width, image.height) if swap else (image.height, image.width)]
    if isinstance(image, np.ndarray):
        shape = image.shape
        if image.ndim == 4:
            return [tuple(shape[1:3])] * shape[0]
        return [tuple(shape[:2])] if image.ndim in (2, 3) else None
    if isinstance(image, torch.Tensor):
        shape = tuple(image.shape)
        if image.ndim == 4:
            return [shape[2:4]] * shape[0]
        if image.ndim == 3:
            return [shape[1:3]]
        return [shape] if image.ndim == 2 else None
    return None


# Pillow modes that carry an alpha band (by what the mode is: "LAB" has a band named "A" that is not alpha)
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse)
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
EXIF_ORIENTATION_TAG = 0x0112


def exif_orientation(img: PIL.Image.Image) -> int:
    try:
        value = img.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except (OSError, ValueError, SyntaxError):  # a damaged EXIF block reads as "no orientation"
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _from_pil(img: PIL.Image.Image) -> LQImage:
    if img.width < 1 or img.height < 1:
        raise ImageInputError(f"image has no pixels (size {img.size})")
    frames = getattr(img, "n_frames", 1)
    if getattr(img, "is_animated", False) and frames > 1:
        raise ImageInputError(
            f"animated image with {frames} frames: only still images are upscaled (upscaling the first frame alone "
            "would silently drop the rest); extract the frames (e.g. ImageSequence) and pass them as a list"
        )
    if exif_orientation(img) != 1:
        # upright as every viewer shows it; pass np.asarray(img) to keep the stored orientation
        img = PIL.ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img)
        scale = 1.0 if mode == "F" else 65535.0  # "I" is how Pillow opens 16-bit PNGs
        return _from_float_hwc(arr.astype(np.float64)[..., None] / scale)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode not in ("RGB", "RGBA", "L", "LA"):
        try:
            img = img.convert("RGBA" if mode in ALPHA_MODES else "RGB")
        except ValueError as err:
            raise ImageInputError(
                f"images of mode {mode} cannot be converted to RGB here ({err}); save as RGB"
            ) from None
    alpha = None
    if img.mode in ("RGBA", "LA"):
        alpha = _hwc_to_nchw(np.asarray(img.getchannel("A"), dtype=np.float32)[..., None] / 255.0)
    rgb_img = img.convert("RGB")
    rgb = _hwc_to_nchw(np.asarray(rgb_img, dtype=np.float32) / 255.0)
    return LQImage(rgb=rgb, alpha=alpha, pil_rgb=rgb_img)


def _from_numpy(arr: np.ndarray) -> list[LQImage]:
    if arr.ndim == 4:
        if arr.shape[0] == 0:
            raise ImageInputError("got an empty batch (first dimension 0)")
        return [item for a in arr for item in _from_numpy(a)]
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4):
        raise ImageInputError(
            "numpy images must be HWC with 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 (RGBA) channels, "
            f"got shape {arr.shape}"
        )
    if arr.dtype == np.uint8:
        if arr.shape[-1] == 3:
            return [_from_pil(PIL.Image.fromarray(np.ascontiguousarray(arr), "RGB"))]
        return [_from_float_hwc(arr.astype(np.float64) / 255.0)]
    if arr.dtype == np.uint16:
        return [_from_float_hwc(arr.astype(np.float64) / 65535.0)]
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.floating):
        raise ImageInputError(f"numpy images must be uint8, uint16 or float in [0, 1], got dtype {arr.dtype}")
    return [_from_float_hwc(arr.astype(np.float64))]


def _from_tensor(t: torch.Tensor) -> list[LQImage]:
    if t.device.type == "meta":
        raise ImageInputError("the image tensor is on the meta device (it has a shape but no values)")
    if t.layout != torch.strided:
        raise ImageInputError(f"sparse image tensors ({t.layout}) are not supported: pass tensor.to_dense()")
    t = t.detach().cpu()
    if t.ndim == 4:
        if t.shape[0] == 0:
            raise ImageInputError("got an empty batch (first dimension 0)")
        return [item for x in t for item in _from_tensor(x)]
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3 or t.shape[0] not in (1, 2, 3, 4):
        hint = ""
        if t.ndim == 3 and t.shape[-1] in (1, 3, 4):
            hint = " (this looks channels-last: use tensor.permute(2, 0, 1), or (0, 3, 1, 2) for a ComfyUI IMAGE batch)"
        raise ImageInputError(f"torch images must be CHW or NCHW with 1-4 channels, got shape {tuple(t.shape)}{hint}")
    if t.dtype == torch.uint8:
        t = t.double() / 255.0
    elif not t.is_floating_point():
        raise ImageInputError(f"torch images must be float in [0, 1] or uint8, got dtype {t.dtype}")
    return [_from_float_hwc(t.permute(1, 2, 0).double().numpy())]


def _from_float_hwc(arr: np.ndarray) -> LQImage:
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageInputError(f"image has no pixels (shape {arr.shape})")
    if not np.isfinite(arr).all():
        raise ImageInputError("image contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ImageInputError(
            f"float images must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]"
            + (" (looks like 0-255: divide by 255)" if hi > 1.5 else "")
            + (" (looks like [-1, 1]: use x * 0.5 + 0.5)" if lo < -0.5 else "")
        )
    arr = np.clip(arr, 0, 1).astype(np.float32)
    channels = arr.shape[-1]
    alpha = None
    if channels in (2, 4):
        alpha = _hwc_to_nchw(arr[..., -1:])
        arr = arr[..., :-1]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    levels = arr * 255
    rounded = np.round(levels)
    if np.abs(levels - rounded).max() < 1e-3:
        # 8-bit data in float form (e.g. a ComfyUI IMAGE from LoadImage): keep the 8-bit path, so the
        # upsampled model input is bit-identical to what the official code computes from the file
        pil = PIL.Image.fromarray(rounded.astype(np.uint8), "RGB")
        return LQImage(rgb=_hwc_to_nchw(rounded.astype(np.float32) / 255), alpha=alpha, pil_rgb=pil)
    return LQImage(rgb=_hwc_to_nchw(arr), alpha=alpha)


def _hwc_to_nchw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1)[None].contiguous()


def check_upscale(upscale: Any, size: tuple[int, int]) -> int:
    """The factor as an int, refused when it is not a positive integer or the (height, width) input would exceed
    the largest output side."""
    if isinstance(upscale, bool) or not isinstance(upscale, (int, np.integer)) or upscale < 1:
        raise ValueError(f"upscale must be a positive integer, got {upscale!r}")
    h, w = size
    if max(h, w) * upscale > MAX_OUTPUT_SIDE:
        raise ImageInputError(
            f"output would be {w * upscale}x{h * upscale} pixels; the largest side supported is {MAX_OUTPUT_SIDE}"
        )
    return int(upscale)


def input_size_for_long_side(size: tuple[int, int], upscale: int, long_side: int) -> tuple[int, int]:
    """The (height, width) an input of `size` is resized to first so that `upscale` times it has the long side
    `long_side`, aspect ratio kept. The model output stays exactly `upscale` x its input, so the output's long side
    is `long_side` rounded to the nearest multiple of `upscale`."""
    upscale = check_upscale(upscale, (1, 1))
    if isinstance(long_side, bool) or not isinstance(long_side, (int, np.integer)) or long_side < upscale:
        raise ValueError(f"target long side must be a whole number of pixels >= upscale ({upscale}), got {long_side!r}")
    if long_side > MAX_OUTPUT_SIDE:
        raise ImageInputError(f"target long side {long_side} exceeds the largest side supported, {MAX_OUTPUT_SIDE}")
    h, w = size
    scale = max(1, round(long_side / upscale)) / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def resize_to_long_side(image: Any, upscale: int, long_side: int) -> torch.Tensor:
    """One image (anything `load_images` takes) resized for a target output long side (input_size_for_long_side):
    a float (3 or 4, H, W) tensor in [0, 1], alpha kept, ready for a pipeline's __call__."""
    (lq,) = load_images(image)
    size = input_size_for_long_side(lq.size, upscale, long_side)
    planes = lq.rgb if lq.alpha is None else torch.cat([lq.rgb, lq.alpha], dim=1)
    return resize_planes(planes.float(), size)[0]


def resize_planes(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) float images in [0, 1] resized to (height, width) with Pillow's bicubic filter per plane
    (antialiased when shrinking), in float32 so no precision is lost."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return torch.cat([_pil_float_resize(item[None], (size[1], size[0])) for item in x]).to(x.dtype)


def upsample_pil_bicubic(image: LQImage, upscale: int) -> LQImage:
    """Upsample as the official OSEDiff code does: Pillow's BICUBIC filter.

    8-bit inputs are resized as 8-bit RGB (bit-identical to upstream); other inputs are resized
    per channel as 32-bit float images with the same filter, so no precision is lost.
    """
    if upscale == 1:
        return image
    h, w = image.size
    size = (w * upscale, h * upscale)
    if image.pil_rgb is not None:
        up = image.pil_rgb.resize(size, PIL.Image.BICUBIC)
        rgb = _hwc_to_nchw(np.asarray(up, dtype=np.float32) / 255.0)
    else:
        rgb = _pil_float_resize(image.rgb, size)
    alpha = None if image.alpha is None else _pil_float_resize(image.alpha, size)
    return LQImage(rgb=rgb, alpha=alpha)


def upsample_torch_bicubic(image: LQImage, upscale: int) -> LQImage:
    """Upsample with torch's bicubic interpolation (align_corners=False), then clamp to [0, 1]."""
    if upscale == 1:
        return image

    def resize(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=upscale, mode="bicubic", align_corners=False).clamp(0, 1)

    return LQImage(rgb=resize(image.rgb), alpha=None if image.alpha is None else resize(image.alpha))


def _pil_float_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    channels = []
    for c in range(x.shape[1]):
        plane = PIL.Image.fromarray(x[0, c].float().numpy(), mode="F").resize(size, PIL.Image.BICUBIC)
        channels.append(np.asarray(plane, dtype=np.float32))
    return torch.from_numpy(np.stack(channels))[None].clamp(0, 1)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad bottom/right to a multiple (reflect where the image is large enough, else replicate)."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h == 0 and pad_w == 0:
        return x, (h, w)
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode), (h, w)


def postprocess(images: Sequence[torch.Tensor], output_type: str) -> Any:
    """Images are (1, C, H, W) float in [0, 1]; C is 3, or 4 when an alpha channel was carried through."""
    if output_type == "pt":
        return _stack_if_same_size([img[0].float().cpu() for img in images])
    arrays = [img[0].float().cpu().permute(1, 2, 0).numpy() for img in images]
    if output_type == "np":
        return _stack_if_same_size(arrays)
    if output_type == "pil":
        return [
            PIL.Image.fromarray((a * 255).round().clip(0, 255).astype(np.uint8), "RGBA" if a.shape[-1] == 4 else "RGB")
            for a in arrays
        ]
    raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")


def _stack_if_same_size(items: list) -> Any:
    if len({tuple(i.shape) for i in items}) == 1:
        return torch.stack(items) if isinstance(items[0], torch.Tensor) else np.stack(items)
    return items


def write_atomically(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """`write(temporary path)` beside `path`, then rename it into place: an interrupted write never leaves a
    truncated file where a complete one is expected (the temporary file is removed on any error)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def save_png_atomically(image: PIL.Image.Image, path: str | os.PathLike, **save_kwargs: Any) -> Path:
    """Write a PNG under a temporary name beside `path`, then rename it (see `write_atomically`)."""
    return write_atomically(path, lambda tmp: image.save(tmp, format="PNG", **save_kwargs))
