"""Real-ESRGAN degradation against the official OSEDiff data path (tests/data/parity/train-common, README §A).

Per stage: each recorded op's input + the recorded choices through our functions equals the recorded output
(blur/resize/noise 1e-5, kernels 1e-12 in float64; JPEG within the README's band: 99 % of values within 1e-5 and
max 0.06, since a DCT summed in another order can flip one rounding). End to end with the recorded noise draws
injected: the final LQ on the 1/255 grid, at most 1 level apart on at most 1 % of the values. The sampler's
distributions against 2000 official draws: chi-square (categoricals) and two-sample KS (continuous), p > 1e-3.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy import stats

from onestep_sr.training.data import degradation as deg

from helpers import parity_dir

ROOT = parity_dir("train-common") / "degradation"
INDEX = json.loads((ROOT / "cases.json").read_text())
CASES = [name for name, record in INDEX["cases"].items() if "error" not in record]


def blur_kernel(record: dict) -> deg.BlurKernel:
    if record["family"] == "pulse":
        return deg.BlurKernel("pulse")
    if record["family"] == "sinc":
        return deg.BlurKernel("sinc", record["kernel_size"], omega_c=record["omega_c"])
    r = record
    return deg.BlurKernel(r["kernel_type"], r["kernel_size"], r["sigma_x"], r["sigma_y"], r["theta"], r["beta"])


def noise_choice(record: dict) -> deg.NoiseChoice:
    kind = record["noise_type"]
    return deg.NoiseChoice(
        kind, record["sigma"] if kind == "gaussian" else record["poisson_scale"], record["gray_noise"]
    )


def params_of(choices: dict) -> deg.DegradationParams:
    c = choices
    return deg.DegradationParams(
        hflip=c["hflip"],
        kernel1=blur_kernel(c["kernel1"]),
        kernel2=blur_kernel(c["kernel2"]),
        final_sinc=blur_kernel(c["final_sinc"]),
        second_blur=c["second_blur_applied"],
        s1_resize=deg.ResizeChoice(c["s1_resize"]["updown"], c["s1_resize"]["scale"], c["s1_resize"]["mode"]),
        s1_noise=noise_choice(c["s1_noise"]),
        s1_jpeg_quality=c["s1_jpeg"]["quality"],
        s2_resize=deg.ResizeChoice(c["s2_resize"]["updown"], c["s2_resize"]["scale"], c["s2_resize"]["mode"]),
        s2_noise=noise_choice(c["s2_noise"]),
        final_order=c["final_order"],
        final_resize_mode=c["final_resize"]["mode"],
        final_jpeg_quality=c["final_jpeg"]["quality"],
        resize_back_mode=c["resize_bak"]["mode"],
    )


def noise_draws(t: dict, stage: str) -> deg.NoiseDraws:
    gray = t.get(f"{stage}_randn_gray")
    counts = t.get(f"{stage}_poisson_counts_gray", t.get(f"{stage}_poisson_counts_color"))
    return deg.NoiseDraws(randn_color=t.get(f"{stage}_randn_color"), randn_gray=gray, poisson_counts=counts)


class Case:
    def __init__(self, name: str):
        self.name = name
        folder = ROOT / "cases" / name
        self.record = json.loads((folder / "case.json").read_text())
        self.t = load_file(folder / "tensors.safetensors")
        self.params = params_of(self.record["choices"])


@pytest.fixture(scope="module", params=CASES)
def case(request) -> Case:
    return Case(request.param)


def assert_close(ours, ref, atol, what):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    diff = (ours.double() - ref.double()).abs().max().item()
    assert diff <= atol, f"{what}: max |ours - official| = {diff:.3g} > {atol}"


def assert_jpeg_band(ours, ref, what):
    assert ours.shape == ref.shape, what
    diff = (ours - ref).abs()
    share = (diff <= 1e-5).float().mean().item()
    assert share >= 0.99 and diff.max().item() <= 0.06, f"{what}: {share:.4f} within 1e-5, max {diff.max():.3g}"


def test_cases_are_discovered_from_the_data():
    assert CASES, f"no degradation parity cases under {ROOT}"
    missing = [name for name in CASES if not (ROOT / "cases" / name / "tensors.safetensors").is_file()]
    assert not missing, f"cases.json lists cases without their data: {missing}"


def test_kernels(case):
    for name, kernel in (("kernel1", case.params.kernel1), ("kernel2", case.params.kernel2)):
        assert_close(kernel.raw(), case.t[f"{name}_raw_f64"], 1e-12, f"{case.name} {name} (float64)")
        if f"{name}_21x21" in case.t:
            assert_close(kernel.padded(), case.t[f"{name}_21x21"], 1e-7, f"{case.name} {name} 21x21")
    if "final_sinc_raw_f64" in case.t:
        # the official final sinc is generated already padded to 21
        assert_close(case.params.final_sinc.padded64(), case.t["final_sinc_raw_f64"], 1e-12, f"{case.name} final sinc")
    assert_close(case.params.final_sinc.padded(), case.t["final_sinc_21x21"], 1e-7, f"{case.name} final sinc 21")


def run_op(case: Case, op: dict, x: torch.Tensor) -> torch.Tensor:
    p, stage = case.params, op["stage"]
    if op["op"] == "filter2D":
        kernel = {"s1_blur": p.kernel1, "s2_blur": p.kernel2, "final_sinc": p.final_sinc}[stage]
        return deg.filter2d(x, kernel.padded())
    if op["op"] == "interpolate":
        size = tuple(op["size"]) if op["size"] is not None else None
        return deg.resize(x, op["mode"], scale_factor=op["scale_factor"], size=size)
    if op["op"] == "noise":
        choice = p.s1_noise if stage == "s1_noise" else p.s2_noise
        return deg._noise_stage(x, choice, None, noise_draws(case.t, stage))
    if op["op"] == "jpeg":
        return deg.diff_jpeg(x, op["quality"])
    raise AssertionError(f"unknown op {op['op']}")


def test_every_stage_given_its_recorded_input(case):
    previous = case.t["hq"]
    for op in case.record["ops"]:
        stage = op["stage"]
        x = case.t.get(f"{stage}_in", previous)
        if op["op"] == "jpeg":
            x = x.clamp(0, 1)  # the official call clamps before DiffJPEG
            assert_jpeg_band(run_op(case, op, x), case.t[f"{stage}_out"], f"{case.name} {stage}")
            factor = deg.jpeg_quality_factor(op["quality"]).item()
            assert factor == pytest.approx(op["quality_factor_after_call"], rel=0, abs=0)
        else:
            assert_close(run_op(case, op, x), case.t[f"{stage}_out"], 1e-5, f"{case.name} {stage}")
        if op["op"] == "noise":
            choice = case.params.s1_noise if stage == "s1_noise" else case.params.s2_noise
            if choice.kind == "poisson":
                rate, _ = deg.poisson_rates(x, choice.gray)
                key = f"{stage}_poisson_rate_{'gray' if choice.gray else 'color'}"
                assert_close(rate, case.t[key], 1e-5, f"{case.name} {stage} Poisson rates")
        previous = case.t[f"{stage}_out"]


def test_end_to_end_with_the_recorded_draws(case):
    hq = case.t["hq_input"]
    draws = {s: noise_draws(case.t, s) for s in ("s1_noise", "s2_noise")}
    hq_out, lq = deg.degrade(hq, case.params, noise_draws=draws)
    assert torch.equal(hq_out, case.t["hq"])
    levels = (lq * 255).round() - (case.t["lq"] * 255).round()
    assert levels.abs().max().item() <= 1, f"{case.name}: the final LQ differs by more than one level"
    assert (levels != 0).float().mean().item() <= 0.01, f"{case.name}: more than 1 % of the LQ values differ"
    _, small = deg.degrade(hq, case.params, noise_draws=draws, resize_back=False)
    assert ((small * 255).round() - (case.t["lq_small"] * 255).round()).abs().max().item() <= 1


MISTAKES = [
    "kernel not normalised",
    "zero padding",
    "jpeg quality rounded",
    "jpeg quality + 10",
    "final order swapped",
    "sigma / 256",
    "stage-1 resize by size",
    "stage-1 recompute_scale_factor",
    "stage-2 align_corners",
    "stage-2 antialias",
    "poisson levels 255",
    "final rounding missing",
]


def _stage_op(c: Case, stage: str) -> dict:
    return next(op for op in c.record["ops"] if op["stage"] == stage)


def _stage_input(c: Case, stage: str) -> torch.Tensor:
    ops = c.record["ops"]
    i = next(i for i, op in enumerate(ops) if op["stage"] == stage)
    return c.t.get(f"{stage}_in", c.t[f"{ops[i - 1]['stage']}_out"] if i else c.t["hq"])


def _mistake_deviation(mistake: str, c: Case) -> float:
    """How far one case's affected stage moves under the mistake (0 where the case cannot show it)."""
    import torch.nn.functional as F

    t, p = c.t, c.params
    if mistake == "kernel not normalised":
        k = p.kernel1.padded() * p.kernel1.raw().sum().float() * 1.5
        return (deg.filter2d(t["hq"], k) - t["s1_blur_out"]).abs().max().item()
    if mistake == "zero padding":
        out = F.conv2d(F.pad(t["hq"], (10,) * 4), p.kernel1.padded().expand(3, 1, 21, 21), groups=3)
        return (out - t["s1_blur_out"]).abs().max().item()
    if mistake in ("jpeg quality rounded", "jpeg quality + 10"):
        q = round(p.s1_jpeg_quality) if mistake == "jpeg quality rounded" else p.s1_jpeg_quality + 10
        return (deg.diff_jpeg(_stage_input(c, "s1_jpeg").clamp(0, 1), q) - t["s1_jpeg_out"]).abs().max().item()
    if mistake == "final order swapped":
        swapped = "jpeg_then_resize_sinc" if p.final_order == "resize_sinc_then_jpeg" else "resize_sinc_then_jpeg"
        draws = {s: noise_draws(t, s) for s in ("s1_noise", "s2_noise")}
        params = deg.DegradationParams(**{**p.__dict__, "final_order": swapped})
        return (deg.degrade(t["hq_input"], params, noise_draws=draws)[1] - t["lq"]).abs().max().item()
    if mistake == "sigma / 256":
        worst = 0.0
        for stage, choice in (("s1_noise", p.s1_noise), ("s2_noise", p.s2_noise)):
            if choice.kind == "gaussian":
                x, d = _stage_input(c, stage), noise_draws(t, stage)
                noise = deg.gaussian_noise(x, choice.level, d.randn_color, d.randn_gray) * 255 / 256
                worst = max(worst, (deg.add_noise(x, noise) - t[f"{stage}_out"]).abs().max().item())
        return worst
    if mistake.startswith("stage-1"):
        op, x = _stage_op(c, "s1_resize"), _stage_input(c, "s1_resize")
        if op["mode"] == "area" or op["scale_factor"] == 1:
            return 0.0
        if mistake == "stage-1 resize by size":
            out = deg.resize(x, op["mode"], size=tuple(op["out_shape"][-2:]))
        else:
            out = F.interpolate(x, scale_factor=op["scale_factor"], mode=op["mode"], recompute_scale_factor=True)
        return (out - t["s1_resize_out"]).abs().max().item()
    if mistake.startswith("stage-2"):
        op, x = _stage_op(c, "s2_resize"), _stage_input(c, "s2_resize")
        if op["mode"] == "area":
            return 0.0
        kw = (
            {"align_corners": True}
            if mistake == "stage-2 align_corners"
            else {"antialias": True, "align_corners": False}
        )
        out = F.interpolate(x, size=tuple(op["size"]), mode=op["mode"], **kw)
        return (out - t["s2_resize_out"]).abs().max().item()
    if mistake == "poisson levels 255":
        worst = 0.0
        for stage, choice in (("s1_noise", p.s1_noise), ("s2_noise", p.s2_noise)):
            if choice.kind == "poisson":
                x, d = _stage_input(c, stage), noise_draws(t, stage)
                xq, _levels = deg.poisson_levels(deg.grayscale(x) if choice.gray else x)
                # the recorded counts read at 255 levels instead of 2^ceil(log2 #unique)
                noise = (d.poisson_counts / 255.0 - xq).expand_as(x) * choice.level
                worst = max(worst, (deg.add_noise(x, noise) - t[f"{stage}_out"]).abs().max().item())
        return worst
    if mistake == "final rounding missing":
        return (t["resize_bak_out"] - t["lq"]).abs().max().item()
    raise AssertionError(mistake)


@pytest.mark.parametrize("mistake", MISTAKES)
def test_mistakes_are_caught(mistake):
    """The sensitivity rows (tests/data/parity/train-common/sensitivity.json): each plausible mistake moves some
    case's stage beyond its tolerance (1e-5; the JPEG rows beyond the JPEG band's 0.06). The cv2 rows do not apply:
    nothing here uses OpenCV."""
    worst = max(_mistake_deviation(mistake, Case(name)) for name in CASES)
    limit = 0.06 if mistake.startswith("jpeg") else 1e-5
    assert worst > limit, f"{mistake} went unnoticed (max deviation {worst:.3g})"


def test_small_images_fail_clearly_as_upstream():
    """The recorded crash (seed 241): a first resize below 11/64 leaves the second 21x21 blur too little image."""
    assert "error" in INDEX["cases"].get("d7_astronaut_64x64_crash", {"error": ""})
    with pytest.raises(ValueError, match="at least 11 px"):
        deg.filter2d(torch.rand(1, 3, 9, 9), deg.BlurKernel("iso", 7, 1.0, 1.0, 0.0).padded())


# ---------------------------------------------------------------------------------------------- the sampler

DRAWS = json.loads((ROOT / "param_draws.json").read_text())["draws"]
N_OURS = 2000


@pytest.fixture(scope="module")
def our_draws() -> dict[str, list]:
    sampler = deg.DegradationSampler()
    g = torch.Generator().manual_seed(1234)
    out: dict[str, list] = {k: [] for k in DRAWS if k != "seed"}
    for _ in range(N_OURS):
        p = sampler.sample(g)
        for prefix, k in (("kernel1", p.kernel1), ("kernel2", p.kernel2), ("final_sinc", p.final_sinc)):
            out[f"{prefix}.type"].append(k.kind)
            out[f"{prefix}.size"].append(k.size if k.kind != "pulse" else None)
            for f in ("sigma_x", "sigma_y", "theta", "beta", "omega_c"):
                out[f"{prefix}.{f}"].append(getattr(k, f))
        out["hflip"].append(p.hflip)
        out["second_blur_applied"].append(p.second_blur)
        out["final_order"].append(p.final_order)
        for s, r in (("s1_resize", p.s1_resize), ("s2_resize", p.s2_resize)):
            out[f"{s}.mode"].append(r.mode)
            out[f"{s}.updown"].append(r.updown)
            out[f"{s}.scale"].append(r.scale)
        out["final_resize.mode"].append(p.final_resize_mode)
        out["resize_bak.mode"].append(p.resize_back_mode)
        for s, n in (("s1_noise", p.s1_noise), ("s2_noise", p.s2_noise)):
            out[f"{s}.type"].append(n.kind)
            out[f"{s}.sigma"].append(n.level if n.kind == "gaussian" else None)
            out[f"{s}.poisson_scale"].append(n.level if n.kind == "poisson" else None)
            out[f"{s}.gray"].append(n.gray)
        out["s1_jpeg.quality"].append(p.s1_jpeg_quality)
        out["final_jpeg.quality"].append(p.final_jpeg_quality)
    return out


def _kind(values: list) -> str:
    present = [v for v in values if v is not None]
    if all(isinstance(v, (bool, str)) for v in present) or all(
        isinstance(v, int) and not isinstance(v, bool) for v in present
    ):
        return "categorical"
    return "continuous"


FIELDS = [k for k in DRAWS if k != "seed"]


@pytest.mark.parametrize("field", FIELDS)
def test_sampler_distributions_match_the_official_draws(field, our_draws):
    ref, ours = DRAWS[field], our_draws[field]
    # which draws apply at all (e.g. beta only for generalized/plateau kernels) is itself a distribution
    ref_missing, our_missing = sum(v is None for v in ref), sum(v is None for v in ours)
    table = np.array([[ref_missing, len(ref) - ref_missing], [our_missing, len(ours) - our_missing]])
    if table.min(axis=0).min() > 0 and 0 < table[:, 0].sum() < table.sum():
        assert stats.chi2_contingency(table)[1] > 1e-3, f"{field}: how often it applies differs"
    ref_v, our_v = [v for v in ref if v is not None], [v for v in ours if v is not None]
    if not ref_v:
        assert not our_v
        return
    if field.endswith("scale") or _kind(ref_v) == "continuous":
        ref_f = np.array(ref_v, dtype=float)
        our_f = np.array(our_v, dtype=float)
        p = stats.ks_2samp(ref_f, our_f).pvalue
        assert p > 1e-3, f"{field}: KS p = {p:.2g}"
        return
    labels = sorted({str(v) for v in ref_v} | {str(v) for v in our_v})
    counts = np.array(
        [[sum(str(v) == lab for v in ref_v) for lab in labels], [sum(str(v) == lab for v in our_v) for lab in labels]]
    )
    if counts.shape[1] > 1:
        p = stats.chi2_contingency(counts)[1]
        assert p > 1e-3, f"{field}: chi-square p = {p:.2g} ({labels}: {counts.tolist()})"


def test_sampler_test_can_fail(our_draws):
    """A sampler with kernel probabilities in the wrong order must fail the chi-square test above."""
    wrong = deg.DegradationSampler(
        deg.DegradationConfig(first=deg.StageConfig(kernel_prob=(0.03, 0.25, 0.12, 0.45, 0.12, 0.03)))
    )
    g = torch.Generator().manual_seed(5)
    kinds = [wrong.sample(g).kernel1.kind for _ in range(N_OURS)]
    labels = sorted(set(DRAWS["kernel1.type"]))
    counts = np.array([[DRAWS["kernel1.type"].count(lab) for lab in labels], [kinds.count(lab) for lab in labels]])
    assert stats.chi2_contingency(counts)[1] < 1e-6


def test_sampled_degradation_runs_batched_and_is_seeded():
    """A batch is degraded image by image with each image's own seed: the same LQ alone or in a batch, on the
    1/255 grid, at the HQ size."""
    sampler = deg.DegradationSampler()
    hq = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    params = [sampler.sample(torch.Generator().manual_seed(s)) for s in (3, 4)]
    _, batch = deg.degrade_samples(hq, params, [11, 12])
    _, alone = deg.degrade_samples(hq[1:], params[1:], [12])
    assert torch.equal(batch[1:], alone) and batch.shape == hq.shape
    assert ((batch * 255) - (batch * 255).round()).abs().max() < 1e-4
    assert not math.isclose((batch - hq).abs().mean().item(), 0.0)
