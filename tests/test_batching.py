"""`batch_size`: equal-size untiled images share one forward, and each equals its own unbatched run (every image
keeps its generator's draws), for the three families."""

import numpy as np
import pytest
import torch
from PIL import Image

from onestep_sr import load_pipeline

from helpers import OSEDIFF_PARITY, TADSR_PARITY, TSDSR_PARITY

FAMILIES = {
    "osediff": lambda: load_pipeline(OSEDIFF_PARITY / "tiny-sd21", OSEDIFF_PARITY / "osediff_tiny.pkl", dtype="fp32"),
    "tsdsr": lambda: load_pipeline(
        TSDSR_PARITY / "tiny-sd3", TSDSR_PARITY / "lora", embeddings=TSDSR_PARITY / "embeddings", dtype="fp32"
    ),
    "tadsr": lambda: load_pipeline(
        TADSR_PARITY / "models" / "autoencoder_vq_f4_tiny_A.pth",
        TADSR_PARITY / "models" / "tadsr_tiny_A.pth",
        dtype="fp32",
    ),
}


def images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_batched_image_equals_its_own_run(family):
    pipe = FAMILIES[family]()
    pipe.set_progress_bar_config(disable=True)
    upscale = 4 if family == "tadsr" else 2
    # three of one size, one of another, then one of the first size again: batches [0, 1], [2], [3], [4]
    lqs = images([(16, 12), (16, 12), (16, 12), (72, 20), (16, 12)])
    sample = {} if family == "tadsr" else {"latent_sampling": "sample"}  # the posterior draw; TAD-SR draws eps
    plans = pipe.check_inputs(lqs, "", upscale, None, "mode", None, "pt", None, None, None, "auto", 1, None,
                              "gaussian").plans  # fmt: skip
    assert pipe.batches(plans, 2) == [[0, 1], [2], [3], [4]]
    assert pipe.batches(plans, 8) == [[0, 1, 2], [3], [4]]

    def run(batch_size, seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        out = pipe(lqs, upscale=upscale, generator=generators, output_type="pt", tile_size=None, vae_tile_size=None,
                   batch_size=batch_size, **sample)  # fmt: skip
        return out.images

    seeds = [11, 12, 13, 14, 15]
    single = run(1, seeds)
    batched = run(8, seeds)
    assert len(batched) == 5
    for a, b in zip(single, batched):
        assert a.shape == b.shape
        # fp32 matmuls blocked differently for a batch: rounding only (the parity suites' fp32 output tolerance)
        assert (a - b).abs().max() <= 1e-4, "a batched image differs from its own run"
    # the draws are per image: another image's seed changes that image only
    other = run(8, [11, 12, 99, 14, 15])
    assert (other[2] - batched[2]).abs().max() > 1e-3
    for i in (0, 1, 3, 4):
        assert torch.equal(other[i], batched[i])


def test_batch_size_is_checked():
    pipe = FAMILIES["tadsr"]()
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            pipe(images([(16, 12)]), batch_size=bad)


def test_a_batch_that_would_not_fit_is_made_smaller(monkeypatch):
    import onestep_sr.pipelines.pipeline_base as base

    pipe = FAMILIES["tadsr"]()
    plans = pipe.check_inputs(images([(16, 12)] * 4), "", 4, None, "mode", None, "pt", None, None, None, "auto", 1,
                              None, "gaussian").plans  # fmt: skip
    one = pipe.estimate_memory(plans[0]).peak
    monkeypatch.setattr(base, "fits", lambda estimate, device: estimate.peak <= 2 * one)
    assert pipe.batches(plans, 4) == [[0, 1], [2, 3]]
