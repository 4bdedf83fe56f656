"""Real-ESRGAN's second-order degradation, as OSEDiff trains with it, in torch on any device.

Facts and order: shared docs research-wave2.md §5 and tests/data/parity/train-common/README.md §A (the official
OSEDiff `realesrgan.py` driving BasicSR 1.4.2 primitives). Two steps, so the random choices can be inspected,
logged, replayed and tested on their own:

    params = DegradationSampler(config).sample(generator)   # one frozen DegradationParams per image
    hq, lq = degrade(hq, params, generator)                  # hq [3, H, W] or [1, 3, H, W] in [0, 1]; hq flipped
                                                             # when the params say so

`degrade_samples` does a batch (one parameter set and one noise seed per image). The choices differ per image and
change the sizes of the intermediate images, so the stages run per image, on the images' device. The noise maps are
drawn inside `degrade` from the generator given (or injected, for parity checks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")
FINAL_ORDERS = ("resize_sinc_then_jpeg", "jpeg_then_resize_sinc")
PADDED_KERNEL_SIZE = 21  # every blur kernel is zero-padded to 21 x 21 before it is applied


# ---------------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class StageConfig:
    """The random ranges of one of the two degradation rounds (`params_realesrgan.yml`)."""

    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)  # over KERNEL_TYPES
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)


@dataclass(frozen=True)
class DegradationConfig:
    """OSEDiff's `params_realesrgan.yml` by default."""

    scale: int = 4
    first: StageConfig = field(default_factory=StageConfig)
    second: StageConfig = field(
        default_factory=lambda: StageConfig(
            blur_sigma=(0.2, 1.5),
            resize_prob=(0.3, 0.4, 0.3),
            resize_range=(0.3, 1.2),
            noise_range=(1.0, 25.0),
            poisson_scale_range=(0.05, 2.5),
        )
    )
    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    second_blur_prob: float = 0.8
    final_sinc_prob: float = 0.8
    hflip_prob: float = 0.5
    resize_back: bool = True  # OSEDiff trains on LQ resized back to the HQ size (`resize_bak=True`)


# ---------------------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class BlurKernel:
    """One blur kernel: a Gaussian-family kernel, a sinc (circular low-pass) or the identity pulse."""

    kind: str  # one of KERNEL_TYPES, "sinc" or "pulse"
    size: int = PADDED_KERNEL_SIZE
    sigma_x: float | None = None
    sigma_y: float | None = None
    theta: float | None = None
    beta: float | None = None
    omega_c: float | None = None

    def raw(self) -> torch.Tensor:
        """The kernel as generated (float64, `size` x `size`, sums to 1)."""
        if self.kind == "pulse":
            k = torch.zeros(PADDED_KERNEL_SIZE, PADDED_KERNEL_SIZE, dtype=torch.float64)
            k[PADDED_KERNEL_SIZE // 2, PADDED_KERNEL_SIZE // 2] = 1
            return k
        if self.kind == "sinc":
            return sinc_kernel(self.size, self.omega_c)
        return mixed_kernel(self.kind, self.size, self.sigma_x, self.sigma_y, self.theta, self.beta)

    def padded64(self) -> torch.Tensor:
        """The raw kernel zero-padded to 21 x 21 (float64)."""
        k = self.raw()
        pad = (PADDED_KERNEL_SIZE - k.shape[-1]) // 2
        return F.pad(k, (pad, pad, pad, pad))

    def padded(self) -> torch.Tensor:
        """The float32 21 x 21 kernel that is convolved."""
        return self.padded64().float()


@dataclass(frozen=True)
class ResizeChoice:
    updown: str  # "up", "down" or "keep"
    scale: float
    mode: str


@dataclass(frozen=True)
class NoiseChoice:
    kind: str  # "gaussian" (sigma in 0..255 units) or "poisson" (scale)
    level: float  # sigma for gaussian, scale for poisson
    gray: bool


@dataclass(frozen=True)
class DegradationParams:
    """Every random choice of one image's degradation."""

    hflip: bool
    kernel1: BlurKernel
    kernel2: BlurKernel
    final_sinc: BlurKernel
    second_blur: bool
    s1_resize: ResizeChoice
    s1_noise: NoiseChoice
    s1_jpeg_quality: float
    s2_resize: ResizeChoice
    s2_noise: NoiseChoice
    final_order: str
    final_resize_mode: str
    final_jpeg_quality: float
    resize_back_mode: str


# ---------------------------------------------------------------------------------------------- kernels


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    ax = torch.arange(-(size // 2), size // 2 + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")  # xx: column offset, yy: row offset
    return xx, yy


def mixed_kernel(
    kind: str, size: int, sigma_x: float, sigma_y: float, theta: float, beta: float | None
) -> torch.Tensor:
    """Gaussian, generalized Gaussian exp(-q^beta / 2) or plateau 1 / (q^beta + 1), where q = p^T Sigma^-1 p with
    Sigma = R diag(sx^2, sy^2) R^T (isotropic: sx^2 I); float64, normalised to sum 1."""
    if kind not in KERNEL_TYPES:
        raise ValueError(f"unknown blur kernel type {kind!r}; expected one of {KERNEL_TYPES}")
    if kind.endswith("iso") and not kind.endswith("aniso"):
        inv = torch.eye(2, dtype=torch.float64) / sigma_x**2
    else:
        c, s = math.cos(theta), math.sin(theta)
        rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
        sigma = rot @ torch.diag(torch.tensor([sigma_x**2, sigma_y**2], dtype=torch.float64)) @ rot.T
        inv = torch.linalg.inv(sigma)
    xx, yy = _grid(size)
    p = torch.stack([xx, yy], dim=-1)
    q = torch.einsum("...i,ij,...j->...", p, inv, p)
    if kind.startswith("generalized"):
        k = torch.exp(-0.5 * q**beta)
    elif kind.startswith("plateau"):
        k = 1 / (q**beta + 1)
    else:
        k = torch.exp(-0.5 * q)
    return k / k.sum()


def bessel_j1(x: torch.Tensor) -> torch.Tensor:
    """J1 in float64 to ~1e-15 (torch.special.bessel_j1 is off by ~1e-7 here): Bessel's integral
    (1 / 2 pi) * integral over one period of cos(tau - x sin tau), by the trapezoidal rule, which converges
    exponentially for this periodic, analytic integrand (512 points cover |x| up to ~200)."""
    tau = torch.arange(512, dtype=torch.float64) * (2 * math.pi / 512)
    return torch.cos(tau - x.double().unsqueeze(-1) * torch.sin(tau)).mean(-1)


def sinc_kernel(size: int, omega_c: float) -> torch.Tensor:
    """Circular low-pass: omega J1(omega r) / (2 pi r), omega^2 / (4 pi) at the centre; float64, sum 1."""
    xx, yy = _grid(size)
    r = torch.sqrt(xx**2 + yy**2)
    centre = r == 0
    safe_r = torch.where(centre, torch.ones_like(r), r)
    k = omega_c * bessel_j1(omega_c * safe_r) / (2 * math.pi * safe_r)
    k = torch.where(centre, torch.full_like(r, omega_c**2 / (4 * math.pi)), k)
    return k / k.sum()


# ---------------------------------------------------------------------------------------------- stages


def filter2d(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Per-channel cross-correlation with reflect padding (mirror without repeating the edge), same size."""
    k = kernel.shape[-1]
    pad = k // 2
    height, width = x.shape[-2:]
    if pad >= height or pad >= width:
        raise ValueError(
            f"a {k}x{k} blur needs images of at least {pad + 1} px per side, got {height}x{width}: "
            "use larger HQ crops (the official pipeline fails the same way)"
        )
    c = x.shape[1]
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    weight = kernel.to(x.device, x.dtype).expand(c, 1, k, k)
    return F.conv2d(padded, weight, groups=c)


def resize(
    x: torch.Tensor, mode: str, scale_factor: float | None = None, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """F.interpolate as the official pipeline calls it: by scale_factor in round one (floor size, coordinates
    mapped with 1/scale), by size afterwards; no antialias, align_corners False, no clamp."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    align = None if mode == "area" else False
    return F.interpolate(x, size=size, scale_factor=scale_factor, mode=mode, align_corners=align)


def gaussian_noise(x: torch.Tensor, sigma: float, randn_color: torch.Tensor, randn_gray: torch.Tensor | None):
    """The additive noise map (sigma in 0..255 units) from standard-normal draws: per channel, or one map shared
    by the three channels when `randn_gray` is given."""
    sigma_t = torch.tensor(sigma, dtype=torch.float32, device=x.device)
    draw = randn_gray.reshape(1, 1, *x.shape[-2:]) if randn_gray is not None else randn_color
    return (draw.to(x.device) * sigma_t / 255.0).expand_as(x)


def poisson_levels(x: torch.Tensor) -> torch.Tensor:
    """Quantise to 1/255, and the count scale 2^ceil(log2(#distinct values)) of the whole image."""
    xq = torch.clamp((x * 255.0).round(), 0, 255) / 255.0
    vals = 2 ** math.ceil(math.log2(len(torch.unique(xq))))
    return xq, torch.tensor(float(vals), dtype=x.dtype, device=x.device)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def poisson_rates(x: torch.Tensor, gray: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(rate, count scale) whose Poisson counts give the noise: of the grey image when `gray`, else per colour."""
    xq, vals = poisson_levels(grayscale(x) if gray else x)
    return xq * vals, vals


def poisson_noise(x: torch.Tensor, scale: float, counts: torch.Tensor, gray: bool) -> torch.Tensor:
    """scale * (counts / levels - quantised image): the Poisson noise map from drawn counts."""
    xq, vals = poisson_levels(grayscale(x) if gray else x)
    noise = counts.to(x.device) / vals - xq
    scale_t = torch.tensor(scale, dtype=torch.float32, device=x.device)
    return noise.expand_as(x) * scale_t


def add_noise(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x + noise, 0, 1)


# -- DiffJPEG (BasicSR's torch JPEG simulation, not libjpeg): the standard quantisation tables, transposed as the
#    official code uses them, continuous quality, 4:2:0 chroma by 2x2 averaging, 8x8 DCT, rounding.

_LUMA_TABLE = torch.tensor(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=torch.float32,
).T
_CHROMA_TABLE = torch.full((8, 8), 99.0)
_CHROMA_TABLE[:4, :4] = torch.tensor([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]).T
_RGB_TO_YCBCR = torch.tensor(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=torch.float32
)
_YCBCR_TO_RGB = torch.tensor([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]], dtype=torch.float32)


def _dct_basis() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cos((2x+1) u pi / 16) as an 8x8 matrix (float64 -> float32) and the DCT's alpha scale."""
    n = torch.arange(8, dtype=torch.float64)
    cos = torch.cos((2 * n[:, None] + 1) * n[None, :] * math.pi / 16)  # [x, u]
    basis = torch.einsum("xu,yv->xyuv", cos, cos).float()
    alpha = torch.tensor([1 / math.sqrt(2)] + [1.0] * 7, dtype=torch.float64)
    outer = torch.outer(alpha, alpha)
    return basis, (outer * 0.25).float(), outer.float()


_DCT_BASIS, _DCT_SCALE, _IDCT_ALPHA = _dct_basis()


def jpeg_quality_factor(quality: float) -> torch.Tensor:
    """The table multiplier for a (continuous) quality, in float32: 50/q below 50, else 2 - q/50."""
    q = torch.tensor(quality, dtype=torch.float32)
    return (5000.0 / q if quality < 50 else 200.0 - q * 2) / 100.0


def _blocks(plane: torch.Tensor) -> torch.Tensor:
    b, h, w = plane.shape
    return plane.reshape(b, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4).reshape(b, -1, 8, 8)


def _unblocks(blocks: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b = blocks.shape[0]
    return blocks.reshape(b, h // 8, w // 8, 8, 8).permute(0, 1, 3, 2, 4).reshape(b, h, w)


def _jpeg_plane(plane: torch.Tensor, table: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """DCT, quantise (round), dequantise, inverse DCT of one 0..255 plane [B, H, W] (H, W multiples of 8)."""
    basis = _DCT_BASIS.to(plane.device)
    q = table.to(plane.device) * factor.to(plane.device)
    coeffs = _DCT_SCALE.to(plane.device) * torch.tensordot(_blocks(plane) - 128, basis, dims=2)
    coeffs = torch.round(coeffs / q) * q
    inverse_basis = basis.permute(2, 3, 0, 1)
    pixels = 0.25 * torch.tensordot(coeffs * _IDCT_ALPHA.to(plane.device), inverse_basis, dims=2) + 128
    return _unblocks(pixels, *plane.shape[-2:])


def diff_jpeg(x: torch.Tensor, quality: float) -> torch.Tensor:
    """BasicSR's DiffJPEG (non-differentiable rounding) of [B, 3, H, W] in [0, 1] at a continuous quality."""
    factor = jpeg_quality_factor(quality)
    h, w = x.shape[-2:]
    x = F.pad(x, (0, (-w) % 16, 0, (-h) % 16))
    ycc = torch.tensordot((x * 255).permute(0, 2, 3, 1), _RGB_TO_YCBCR.T.to(x.device), dims=1)
    ycc = ycc + torch.tensor([0.0, 128.0, 128.0], device=x.device)
    y = ycc[..., 0]
    chroma = F.avg_pool2d(ycc[..., 1:].permute(0, 3, 1, 2), kernel_size=2, stride=2)
    y = _jpeg_plane(y, _LUMA_TABLE, factor)
    cb = _jpeg_plane(chroma[:, 0], _CHROMA_TABLE, factor)
    cr = _jpeg_plane(chroma[:, 1], _CHROMA_TABLE, factor)
    up = torch.stack([cb, cr], dim=1).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    ycc = torch.cat([y.unsqueeze(1), up], dim=1).permute(0, 2, 3, 1)
    shift = torch.tensor([0.0, -128.0, -128.0], device=x.device)
    rgb = torch.tensordot(ycc + shift, _YCBCR_TO_RGB.T.to(x.device), dims=1).permute(0, 3, 1, 2)
    return (rgb.clamp(0, 255) / 255)[..., :h, :w]


def jpeg(x: torch.Tensor, quality: float) -> torch.Tensor:
    return diff_jpeg(torch.clamp(x, 0, 1), quality)


def quantize_to_8bit(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp((x * 255.0).round(), 0, 255) / 255.0


# ---------------------------------------------------------------------------------------------- the sampler


class DegradationSampler:
    """Draws one `DegradationParams` per call from a torch.Generator (any seed, any process, reproducible).

    The distributions are the official ones (tested against 2000 recorded official draws); the random streams
    are the generator's, not the official mix of Python, numpy and torch global RNGs."""

    def __init__(self, config: DegradationConfig | None = None):
        self.config = config or DegradationConfig()

    def sample(self, generator: torch.Generator | None = None) -> DegradationParams:
        c, g = self.config, generator

        def uniform(lo: float, hi: float) -> float:
            return lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64).item()

        def choice(options: Sequence, probs: Sequence[float] | None = None):
            weights = torch.tensor(probs if probs is not None else [1.0] * len(options), dtype=torch.float64)
            return options[int(torch.multinomial(weights, 1, generator=g).item())]

        def kernel(stage: StageConfig) -> BlurKernel:
            size = choice(c.kernel_sizes)
            if uniform(0, 1) < stage.sinc_prob:
                low = math.pi / 3 if size < 13 else math.pi / 5
                return BlurKernel("sinc", size, omega_c=uniform(low, math.pi))
            kind = choice(KERNEL_TYPES, stage.kernel_prob)
            sx = uniform(*stage.blur_sigma)
            iso = kind in ("iso", "generalized_iso", "plateau_iso")
            sy, theta = (sx, 0.0) if iso else (uniform(*stage.blur_sigma), uniform(-math.pi, math.pi))
            beta = None
            if kind.startswith(("generalized", "plateau")):
                lo, hi = stage.betag_range if kind.startswith("generalized") else stage.betap_range
                beta = uniform(lo, 1) if uniform(0, 1) < 0.5 else uniform(1, hi)
            return BlurKernel(kind, size, sx, sy, theta, beta)

        def resize_choice(stage: StageConfig) -> ResizeChoice:
            updown = choice(("up", "down", "keep"), stage.resize_prob)
            lo, hi = stage.resize_range
            scale = uniform(1, hi) if updown == "up" else uniform(lo, 1) if updown == "down" else 1.0
            return ResizeChoice(updown, scale, choice(RESIZE_MODES))

        def noise_choice(stage: StageConfig) -> NoiseChoice:
            gaussian = uniform(0, 1) < stage.gaussian_noise_prob
            level = uniform(*stage.noise_range) if gaussian else uniform(*stage.poisson_scale_range)
            return NoiseChoice("gaussian" if gaussian else "poisson", level, uniform(0, 1) < stage.gray_noise_prob)

        hflip = uniform(0, 1) < c.hflip_prob
        kernel1, kernel2 = kernel(c.first), kernel(c.second)
        if uniform(0, 1) < c.final_sinc_prob:
            size = choice(c.kernel_sizes)
            final_sinc = BlurKernel("sinc", size, omega_c=uniform(math.pi / 3, math.pi))
        else:
            final_sinc = BlurKernel("pulse")
        s1_resize, s1_noise = resize_choice(c.first), noise_choice(c.first)
        s1_quality = uniform(*c.first.jpeg_range)
        second_blur = uniform(0, 1) < c.second_blur_prob
        s2_resize, s2_noise = resize_choice(c.second), noise_choice(c.second)
        return DegradationParams(
            hflip=hflip,
            kernel1=kernel1,
            kernel2=kernel2,
            final_sinc=final_sinc,
            second_blur=second_blur,
            s1_resize=s1_resize,
            s1_noise=s1_noise,
            s1_jpeg_quality=s1_quality,
            s2_resize=s2_resize,
            s2_noise=s2_noise,
            final_order=choice(FINAL_ORDERS),
            final_resize_mode=choice(RESIZE_MODES),
            final_jpeg_quality=uniform(*c.second.jpeg_range),
            resize_back_mode=choice(RESIZE_MODES),
        )


# ---------------------------------------------------------------------------------------------- applying


@dataclass
class NoiseDraws:
    """Raw random draws of one noise stage, to inject instead of drawing (parity checks): standard normals
    (colour [1, 3, h, w], grey [h, w]) or Poisson counts (colour, grey)."""

    randn_color: torch.Tensor | None = None
    randn_gray: torch.Tensor | None = None
    poisson_counts: torch.Tensor | None = None


def _noise_stage(x, choice: NoiseChoice, generator, draws: NoiseDraws | None) -> torch.Tensor:
    if choice.kind == "gaussian":
        if draws is None:
            gray = (
                torch.randn(x.shape[-2:], generator=generator, device=_gen_device(generator)) if choice.gray else None
            )
            color = torch.randn(x.shape, generator=generator, device=_gen_device(generator))
            draws = NoiseDraws(randn_color=color, randn_gray=gray)
        return add_noise(x, gaussian_noise(x, choice.level, draws.randn_color, draws.randn_gray))
    if draws is None:
        rate, _ = poisson_rates(x, choice.gray)
        counts = torch.poisson(rate.to(_gen_device(generator)), generator=generator)
        draws = NoiseDraws(poisson_counts=counts)
    return add_noise(x, poisson_noise(x, choice.level, draws.poisson_counts, choice.gray))


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def degrade(
    hq: torch.Tensor,
    params: DegradationParams,
    generator: torch.Generator | None = None,
    scale: int = 4,
    resize_back: bool = True,
    noise_draws: dict[str, NoiseDraws] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hq, lq) for one image [1, 3, H, W] (or [3, H, W]) in [0, 1]: hq possibly flipped, lq its degraded
    version on the 1/255 grid, resized back to H x W when `resize_back` (else H/scale x W/scale)."""
    squeeze = hq.ndim == 3
    x = hq.unsqueeze(0) if squeeze else hq
    if x.ndim != 4 or x.shape[:2] != (1, 3):
        raise ValueError(f"degrade takes one RGB image [3, H, W] or [1, 3, H, W], got {tuple(hq.shape)}")
    x = x.float()
    if params.hflip:
        x = x.flip(-1)
    hq_out = x
    height, width = x.shape[-2:]
    draws = noise_draws or {}
    # round one: blur, resize by a scale factor, noise, JPEG
    x = filter2d(x, params.kernel1.padded())
    r = params.s1_resize
    x = resize(x, r.mode, scale_factor=r.scale) if r.updown != "keep" else resize(x, r.mode, scale_factor=1.0)
    x = _noise_stage(x, params.s1_noise, generator, draws.get("s1_noise"))
    x = jpeg(x, params.s1_jpeg_quality)
    # round two: optional blur, resize to a size relative to the output, noise
    if params.second_blur:
        x = filter2d(x, params.kernel2.padded())
    r = params.s2_resize
    x = resize(x, r.mode, size=(int(height / scale * r.scale), int(width / scale * r.scale)))
    x = _noise_stage(x, params.s2_noise, generator, draws.get("s2_noise"))
    # final: resize to the LR size + sinc, and JPEG, in either order
    small = (height // scale, width // scale)
    if params.final_order == "resize_sinc_then_jpeg":
        x = filter2d(resize(x, params.final_resize_mode, size=small), params.final_sinc.padded())
        x = jpeg(x, params.final_jpeg_quality)
    else:
        x = jpeg(x, params.final_jpeg_quality)
        x = filter2d(resize(x, params.final_resize_mode, size=small), params.final_sinc.padded())
    if resize_back:
        x = resize(x, params.resize_back_mode, size=(height, width))
    lq = quantize_to_8bit(x)
    return (hq_out[0], lq[0]) if squeeze else (hq_out, lq)


def degrade_samples(
    hq: torch.Tensor,
    params: Sequence[DegradationParams],
    seeds: Sequence[int],
    scale: int = 4,
    resize_back: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hq, lq) for a batch on its device, each image's noise drawn from its own generator (seeded by `seeds`),
    so an image's LQ does not depend on the batch it is in."""
    pairs = []
    for i, (p, seed) in enumerate(zip(params, seeds)):
        g = torch.Generator(device=hq.device).manual_seed(int(seed))
        pairs.append(degrade(hq[i : i + 1], p, g, scale, resize_back))
    return torch.cat([h for h, _ in pairs]), torch.cat([lq for _, lq in pairs])
