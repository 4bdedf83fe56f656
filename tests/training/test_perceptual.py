"""LPIPS, DISTS and EA-DISTS against the reference packages (tests/data/parity/train-common/perceptual, README §B-C):
values within 2e-6, gradients within 1e-4 * max|g_ref| + 1e-9, per-tap and per-set terms too; each sensitivity
row makes the comparison fail. Backbones: the recipe's seeded weights, checked against the recorded hash."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from onestep_sr.pipelines.loading.files import CheckpointError
from onestep_sr.training.losses import perceptual as P
from onestep_sr.training.losses.backbones import find_backbone_file, load_backbone

from helpers import parity_dir
from perceptual_weights import canonical_sha256, expected_sha256, seeded_backbone

ROOT = parity_dir("train-common") / "perceptual"
PAIRS = sorted(p.stem for p in ROOT.glob("*.safetensors"))
VALUE_ATOL = 2e-6


@pytest.fixture(scope="module")
def nets():
    return {
        "vgg": P.LPIPS("vgg", seeded_backbone("vgg16")),
        "alex": P.LPIPS("alex", seeded_backbone("alexnet")),
        "dists": P.DISTS(seeded_backbone("vgg16")),
    }


@pytest.fixture(scope="module", params=PAIRS)
def pair(request):
    return request.param, load_file(ROOT / f"{request.param}.safetensors")


def check_grad(ours, ref, what):
    tol = 1e-4 * ref.abs().max().item() + 1e-9
    diff = (ours - ref).abs().max().item()
    assert diff <= tol, f"{what}: gradient max |Δ| {diff:.3g} > {tol:.3g}"


def check_value(ours, ref, what, atol=VALUE_ATOL):
    diff = (ours.detach() - ref).abs().max().item()
    assert diff <= atol, f"{what}: max |Δ| {diff:.3g} > {atol}"


def test_pairs_are_discovered_and_backbones_regenerate():
    assert PAIRS, f"no perceptual parity pairs under {ROOT}"
    for arch in ("vgg16", "alexnet"):
        assert canonical_sha256(seeded_backbone(arch)) == expected_sha256(arch), f"{arch}: torch's randn stream changed"


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips(nets, pair, net):
    name, t = pair
    x = (2 * t["x"] - 1).requires_grad_(True)
    value = nets[net](x, 2 * t["y"] - 1)
    value.sum().backward()
    check_value(value, t[f"lpips_{net}"], f"{name} LPIPS-{net}")
    check_value(nets[net].layers(2 * t["x"] - 1, 2 * t["y"] - 1), t[f"lpips_{net}_layers"], f"{name} taps")
    check_grad(x.grad, t[f"lpips_{net}_grad"], f"{name} LPIPS-{net}")


def test_dists(nets, pair):
    name, t = pair
    x = t["x"].clone().requires_grad_(True)
    value = nets["dists"](x, t["y"])
    value.sum().backward()
    check_value(value, t["dists"], f"{name} DISTS")
    check_value(nets["dists"].terms(t["x"], t["y"]), t["dists_terms"], f"{name} DISTS terms")
    check_grad(x.grad, t["dists_grad"], f"{name} DISTS")


def test_eadists(nets, pair):
    name, t = pair
    ea = P.EADISTS(dists=nets["dists"])
    x = t["x"].clone().requires_grad_(True)
    value = ea(x, t["y"])
    value.sum().backward()
    image, edge = ea.parts(t["x"], t["y"])
    check_value(value, t["eadists"], f"{name} EA-DISTS")
    check_value(image, t["eadists_dists_image"], f"{name} EA-DISTS image part")
    check_value(edge, t["eadists_dists_edge"], f"{name} EA-DISTS edge part")
    check_value(P.sobel(t["x"]), t["sobel_x"], f"{name} Sobel", atol=1e-5)
    check_grad(x.grad, t["eadists_grad"], f"{name} EA-DISTS")


def _sobel_gray(x):
    return P.sobel(x.mean(1, keepdim=True)).expand_as(x)


def _sobel_zero(x, eps=1e-6):
    c = x.shape[1]
    kx = torch.tensor(P.SOBEL_X).expand(c, 1, 3, 3)
    ky = torch.tensor(P.SOBEL_Y).expand(c, 1, 3, 3)
    return torch.sqrt(F.conv2d(x, kx, padding=1, groups=c) ** 2 + F.conv2d(x, ky, padding=1, groups=c) ** 2 + eps)


def _sobel_variant(x, pad="replicate", scale=1.0, combine="sqrt", eps=1e-6):
    c = x.shape[1]
    kx = torch.tensor(P.SOBEL_X).expand(c, 1, 3, 3) * scale
    ky = torch.tensor(P.SOBEL_Y).expand(c, 1, 3, 3) * scale
    padded = F.pad(x, (1, 1, 1, 1), mode=pad)
    gx, gy = F.conv2d(padded, kx, groups=c), F.conv2d(padded, ky, groups=c)
    return gx.abs() + gy.abs() if combine == "abs" else torch.sqrt(gx**2 + gy**2 + eps)


def _ea_with(sobel_fn):
    return lambda n, t: n["dists"](t["x"], t["y"]) + n["dists"](sobel_fn(t["x"]), sobel_fn(t["y"])) - t["eadists"]


def _dists_maxpool(n, t):
    import copy

    net = copy.deepcopy(n["dists"])
    for stage in net.stages[1:]:
        stage[0] = torch.nn.MaxPool2d(2, 2)
    return net(t["x"], t["y"]) - t["dists"]


def _dists_unbiased(n, t):
    net = n["dists"]
    total = net.alpha.sum() + net.beta.sum()
    alphas = torch.split(net.alpha / total, net.CHANNELS, dim=1)
    betas = torch.split(net.beta / total, net.CHANNELS, dim=1)
    score = 0
    for fx, fy, a, b in zip(net.features(t["x"]), net.features(t["y"]), alphas, betas):
        m = fx.shape[2] * fx.shape[3]
        mx, my = fx.mean((2, 3), keepdim=True), fy.mean((2, 3), keepdim=True)
        vx, vy = (
            ((fx - mx) ** 2).sum((2, 3), keepdim=True) / (m - 1),
            ((fy - my) ** 2).sum((2, 3), keepdim=True) / (m - 1),
        )
        cov = ((fx - mx) * (fy - my)).sum((2, 3), keepdim=True) / (m - 1)
        s1 = (2 * mx * my + 1e-6) / (mx**2 + my**2 + 1e-6)
        s2 = (2 * cov + 1e-6) / (vx + vy + 1e-6)
        score = score + (a * s1).sum((1, 2, 3)) + (b * s2).sum((1, 2, 3))
    return 1 - score - t["dists"]


def _lpips_unscaled(n, t):
    net = n["vgg"]
    saved = net.shift.clone(), net.scale.clone()
    net.shift.zero_()
    net.scale.fill_(1)
    try:
        return net(2 * t["x"] - 1, 2 * t["y"] - 1) - t["lpips_vgg"]
    finally:
        net.shift.copy_(saved[0])
        net.scale.copy_(saved[1])


SENSITIVITY = {
    "LPIPS ScalingLayer omitted": _lpips_unscaled,
    "LPIPS alex instead of vgg": lambda n, t: n["alex"](2 * t["x"] - 1, 2 * t["y"] - 1) - t["lpips_vgg"],
    "DISTS max-pool instead of L2 pooling": _dists_maxpool,
    "DISTS unbiased variances": _dists_unbiased,
    "EA-DISTS reflect padding": _ea_with(lambda x: _sobel_variant(x, pad="reflect")),
    "EA-DISTS |Gx|+|Gy|": _ea_with(lambda x: _sobel_variant(x, combine="abs")),
    "EA-DISTS Sobel / 8": _ea_with(lambda x: _sobel_variant(x, scale=1 / 8)),
    "EA-DISTS eps 0": _ea_with(lambda x: _sobel_variant(x, eps=0.0)),
    "LPIPS fed [0,1]": lambda n, t: n["vgg"](t["x"], t["y"]) - t["lpips_vgg"],
    "LPIPS without unit normalisation": lambda n, t: _lpips_unnormalised(n["vgg"], t) - t["lpips_vgg"],
    "DISTS without ImageNet normalisation": lambda n, t: _dists_unnormalised(n["dists"], t) - t["dists"],
    "DISTS raw-image term dropped": lambda n, t: (1 - n["dists"].terms(t["x"], t["y"])[:, 1:].sum((1, 2))) - t["dists"],
    "EA-DISTS Sobel on gray": lambda n, t: (
        n["dists"](t["x"], t["y"]) + n["dists"](_sobel_gray(t["x"]), _sobel_gray(t["y"])) - t["eadists"]
    ),
    "EA-DISTS zero padding": lambda n, t: (
        n["dists"](t["x"], t["y"]) + n["dists"](_sobel_zero(t["x"]), _sobel_zero(t["y"])) - t["eadists"]
    ),
    "EA-DISTS edge term omitted": lambda n, t: n["dists"](t["x"], t["y"]) - t["eadists"],
    "EA-DISTS Sobel on [-1,1]": lambda n, t: (
        n["dists"](t["x"], t["y"]) + n["dists"](P.sobel(2 * t["x"] - 1), P.sobel(2 * t["y"] - 1)) - t["eadists"]
    ),
}


def _lpips_unnormalised(net, t):
    h0, h1 = (2 * t["x"] - 1 - net.shift) / net.scale, (2 * t["y"] - 1 - net.shift) / net.scale
    total = 0
    for stage, w in zip(net.stages, net.heads):
        h0, h1 = stage(h0), stage(h1)
        total = total + F.conv2d((h0 - h1) ** 2, w).mean((1, 2, 3))
    return total


def _dists_unnormalised(net, t):
    saved = net.mean.clone(), net.std.clone()
    net.mean.zero_()
    net.std.fill_(1)
    try:
        return net(t["x"], t["y"])
    finally:
        net.mean.copy_(saved[0])
        net.std.copy_(saved[1])


@pytest.mark.parametrize("mistake", sorted(SENSITIVITY))
def test_mistakes_are_caught(nets, mistake):
    """Every perceptual row of sensitivity.json but LPIPS's train-mode dropout (this LPIPS has no dropout and
    stays in eval mode: see test_lpips_never_trains) moves a value beyond the 2e-6 tolerance on some pair."""
    with torch.no_grad():
        worst = max(SENSITIVITY[mistake](nets, load_file(ROOT / f"{p}.safetensors")).abs().max().item() for p in PAIRS)
    assert worst > VALUE_ATOL, f"{mistake}: deviation {worst:.3g} is within the tolerance"


def test_lpips_never_trains(nets):
    net = nets["vgg"]
    net.train()
    assert not net.training and not any(isinstance(m, torch.nn.Dropout) for m in net.modules())


def test_missing_backbone_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vgg16-397923af\.pth.*IMAGENET1K_V1.*nothing is downloaded"):
        find_backbone_file("vgg16", tmp_path, [tmp_path / "models"])
    torch.save({"classifier.0.weight": torch.zeros(2, 2)}, tmp_path / "vgg16-397923af.pth")
    with pytest.raises(CheckpointError, match="missing"):
        load_backbone("vgg16", find_backbone_file("vgg16", tmp_path))


def test_torchvision_file_with_classifier_loads(tmp_path):
    sd = dict(seeded_backbone("alexnet"))
    sd["classifier.1.weight"] = torch.zeros(3, 3)
    torch.save(sd, tmp_path / "alexnet-owt-7be5be79.pth")
    net = load_backbone("alexnet", find_backbone_file("alexnet", tmp_path))
    assert torch.equal(net[0].weight, sd["features.0.weight"])
    assert not any(p.requires_grad for p in net.parameters())
