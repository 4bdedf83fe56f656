"""Colour fix: exact against the official functions' outputs, plus closed-form properties."""

import pytest
import torch

from onestep_sr.pipelines.color_fix import adain_color_fix, apply_color_fix, wavelet_color_fix, wavelet_decompose

from helpers import png_to_tensor


def official_8bit_target(out: torch.Tensor) -> torch.Tensor:
    # test_osediff.py: ToPILImage()(out*0.5+0.5) quantises with mul(255).byte(), i.e. truncation
    return ((out * 0.5 + 0.5) * 255).to(torch.uint8).float() / 255


@pytest.mark.parametrize("method,fn", [("adain", adain_color_fix), ("wavelet", wavelet_color_fix)])
def test_matches_official_on_official_8bit_inputs(parity_cases, method, fn):
    for case in parity_cases:
        target = official_8bit_target(case.out)
        source = png_to_tensor(case.png("lq_up.png"))
        result = fn(target, source)[0]
        # same float32 operations as upstream; only summation order may differ
        torch.testing.assert_close(result, case.colorfix[method], atol=1e-6, rtol=0)


def test_official_pngs_follow_from_the_floats(parity_cases):
    for case in parity_cases:
        for method in ("adain", "wavelet"):
            png = png_to_tensor(case.png(f"out_{method}.png"))
            assert torch.equal(png, official_8bit_target(case.colorfix[method][None] * 2 - 1))


def test_adain_transfers_mean_and_unbiased_std():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(1, 3, 20, 30, generator=g) * 0.3 + 0.2
    source = torch.rand(1, 3, 20, 30, generator=g) * 0.5 + 0.25
    out = adain_color_fix(target, source)
    torch.testing.assert_close(out.mean(dim=(2, 3)), source.mean(dim=(2, 3)), atol=1e-5, rtol=0)
    expected_std = (source.flatten(2).var(dim=2) + 1e-5).sqrt()
    # out = z * s_std with var(z) = var_t / (var_t + 1e-5), so std(out) = s_std * sqrt(var_t / (var_t + 1e-5))
    var_t = target.flatten(2).var(dim=2)
    torch.testing.assert_close(
        out.flatten(2).std(dim=2), expected_std * (var_t / (var_t + 1e-5)).sqrt(), atol=1e-5, rtol=0
    )


def test_wavelet_low_band_of_constant_is_constant_and_bands_sum_back():
    g = torch.Generator().manual_seed(1)
    img = torch.rand(1, 3, 17, 23, generator=g, dtype=torch.float64)
    high, low = wavelet_decompose(img)
    torch.testing.assert_close(high + low, img, atol=1e-12, rtol=0)
    const = torch.full((1, 3, 9, 5), 0.37, dtype=torch.float64)
    _, low_c = wavelet_decompose(const)
    torch.testing.assert_close(low_c, const, atol=1e-12, rtol=0)
    # a constant colour cast has no high band, so the fix removes it exactly: high(s + c) + low(s) = s
    source = (img * 0.5 + 0.2).float()
    cast = torch.tensor([0.1, -0.15, 0.05]).view(1, 3, 1, 1)
    torch.testing.assert_close(wavelet_color_fix(source + cast, source), source, atol=2e-6, rtol=0)


def test_unknown_method_is_a_clear_error():
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="color_fix must be one of"):
        apply_color_fix("histogram", x, x)
    with pytest.raises(ValueError, match="same shape"):
        wavelet_color_fix(x, torch.zeros(1, 3, 4, 5))
