"""Parity with the official DAPE/RAM tagger (tests/data/parity/dape, produced by cswry/OSEDiff fcc4f09).

Tolerances (the parity README, section 7): re-running the official code with another thread count moved the
non-antialiased logits by 5.6e-5 (a 1-ulp difference in torch's bilinear kernel, amplified ~500x by the tiny
model's sharp attention); an independent fp32 port reached 3.2e-5. LOGIT_ATOL = 2e-4 keeps a ~3.5x margin over
the former and is 20x below the smallest deliberate mistake in sensitivity.json (antialias, max 0.39 / mean 0.02,
checked here on the mean). The closest tag is 6.5e-3 from its threshold, so tag strings must match exactly.
"""

import functools
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from onestep_sr import CheckpointError, load_tagger
from onestep_sr.pipelines.methods import dape
from onestep_sr.pipelines.models import ram_tagger

from helpers import DAPE_PARITY

BASE = DAPE_PARITY / "model" / "ram_tiny_base.pth"
LORA = DAPE_PARITY / "model" / "dape_tiny.pth"
LOGIT_ATOL = 2e-4


class Case:
    def __init__(self, name):
        self.dir = DAPE_PARITY / "cases" / name
        self.name = name
        self.record = json.loads((self.dir / "case.json").read_text())
        self.ram_input = load_file(self.dir / "ram_input.safetensors")["ram_input"]
        self.outputs = load_file(self.dir / "outputs.safetensors")
        self.intermediates = load_file(self.dir / "intermediates.safetensors")

    def lq(self) -> Image.Image:
        return Image.open(self.dir / "lq.png")


CASE_NAMES = [c["name"] for c in json.loads((DAPE_PARITY / "cases.json").read_text())["cases"]]


@functools.cache
def load_case(name: str) -> Case:
    return Case(name)


@pytest.fixture(scope="module")
def cases():
    assert CASE_NAMES, f"no DAPE parity cases in {DAPE_PARITY}"
    return [load_case(n) for n in CASE_NAMES]


@pytest.fixture(params=CASE_NAMES)
def case(request) -> Case:
    """One DAPE parity case per test (its name in the test id)."""
    return load_case(request.param)


@pytest.fixture(scope="module")
def tagger():
    return load_tagger(BASE, LORA)


@pytest.fixture(scope="module")
def tagger_aa():
    return load_tagger(BASE, LORA, antialias=True)


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_shipped_tag_list_and_thresholds_are_the_official_files():
    assert ram_tagger.tag_list_sha256() == "5d96d2f7225527480ad773aaac76b6e5c08a18adf6eae9ca7d2ab923d5e7bd8b"
    assert len(ram_tagger.tag_list()) == 4585 and ram_tagger.tag_list()[:2] == ("3D CG rendering", "3D glasses")
    official = load_file(DAPE_PARITY / "model" / "model_constants.safetensors")["class_threshold"]
    assert torch.equal(ram_tagger.official_thresholds(), official)


def test_config_is_read_from_the_weights_shapes(tagger):
    c = tagger.config
    assert (c.embed_dim, tuple(c.depths), tuple(c.num_heads), c.window_size) == (32, (2, 2, 2, 2), (2, 4, 8, 16), 12)
    assert (c.head_hidden, c.head_layers, c.head_intermediate, c.image_embed_dim) == (64, 2, 128, 512)
    queries = torch.relu(tagger.wordvec_proj(tagger.label_embed))
    expected = load_file(DAPE_PARITY / "model" / "model_constants.safetensors")["label_queries"]
    # a float32 Linear: the recorded constants came from another CPU's BLAS kernel, and another summation order
    # moves them by up to 2.6e-6 here (AVX-512), against values of order 1
    torch.testing.assert_close(queries, expected, atol=1e-5, rtol=0)


def test_intermediates_and_logits_from_the_official_input(tagger, case):
    swin = tagger.visual_encoder(case.ram_input)
    assert max_diff(swin, case.intermediates["swin_out"]) < 1e-5, case.name
    assert max_diff(tagger.image_proj(swin), case.intermediates["image_embeds"]) < 1e-5, case.name
    assert max_diff(tagger.logits(case.ram_input)[0], case.outputs["logits"]) <= LOGIT_ATOL, case.name


def test_default_reproduces_the_official_pinned_environment(tagger, case):
    """No antialias (torchvision 0.15 with the pinned torch 2.0.1): the *_noaa results."""
    logits = tagger.logits(tagger.preprocess(case.lq()))[0]
    assert max_diff(logits, case.outputs["logits_noaa"]) <= LOGIT_ATOL, case.name
    noaa = case.record["noaa"]
    assert tagger.tags(case.lq()) == [noaa["tags"]], case.name
    assert tagger.prompt(case.lq()) == [noaa["prompt_user_empty"]]
    assert tagger.prompt(case.lq(), "a photo") == [noaa["prompt_user_given"]]


def test_antialias_option_reproduces_the_reference_files(tagger_aa, case):
    assert tagger_aa.config.antialias is True
    pixel_values = tagger_aa.preprocess(case.lq())
    assert max_diff(pixel_values, case.ram_input) < 1e-6, case.name
    assert max_diff(tagger_aa.logits(pixel_values)[0], case.outputs["logits"]) <= LOGIT_ATOL, case.name
    assert tagger_aa.tags(case.lq()) == [case.record["tags"]], case.name
    assert tagger_aa.prompt(case.lq(), "a photo") == [case.record["prompt_user_given"]]


def test_a_batch_gives_tags_per_image(tagger, cases):
    images = [c.lq() for c in cases[:3]]
    assert tagger.tags(images) == [c.record["noaa"]["tags"] for c in cases[:3]]


def test_converted_tagger_reproduces_official(tmp_path, cases):
    out = dape.convert_tagger(BASE, LORA, tmp_path / "tagger", dtype="fp32")
    assert (out / "config.json").is_file() and any(out.glob("*.safetensors"))
    config = json.loads((out / "config.json").read_text())
    assert config["tag_list_sha256"] == ram_tagger.tag_list_sha256()
    converted = load_tagger(out)
    for case in cases:
        assert max_diff(converted.logits(case.ram_input)[0], case.outputs["logits"]) <= LOGIT_ATOL
        assert converted.tags(case.lq()) == [case.record["noaa"]["tags"]]
    folder16 = dape.convert_tagger(BASE, LORA, tmp_path / "tagger16", dtype="fp16")
    (weights,) = folder16.glob("*.safetensors")
    assert {t.dtype for t in load_file(weights).values()} == {torch.float16}  # stored in half: half the size
    fp16 = load_tagger(folder16, dtype="fp16")
    assert fp16.dtype == torch.float16 and fp16.class_threshold.dtype == torch.float32
    # half precision moves the logits about as much as the official fp16 default does (README 6: max 0.070)
    assert max(max_diff(fp16.logits(c.ram_input)[0], c.outputs["logits"]) for c in cases) < 0.1
    # a converted folder made with another tag list is refused
    config["tag_list_sha256"] = "0" * 64
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="another tag list"):
        load_tagger(out)


# ------------------------------------------------------------------ the tests above must catch mistakes


def test_missing_lora_breaks_parity(cases):
    plain = load_tagger(BASE)
    assert max(max_diff(plain.logits(c.ram_input)[0], c.outputs["logits"]) for c in cases) > 100 * LOGIT_ATOL


def test_doubled_lora_scale_breaks_parity(monkeypatch, cases):
    monkeypatch.setattr(dape, "LORA_ALPHA", 2.0)
    doubled = load_tagger(BASE, LORA)
    assert max(max_diff(doubled.logits(c.ram_input)[0], c.outputs["logits"]) for c in cases) > 100 * LOGIT_ATOL


def test_antialiased_resize_breaks_default_parity(tagger_aa, cases):
    diffs = [(tagger_aa.logits(tagger_aa.preprocess(c.lq()))[0] - c.outputs["logits_noaa"]).abs() for c in cases]
    assert max(d.max().item() for d in diffs) > 10 * LOGIT_ATOL
    s3 = next(c for c in cases if c.name.startswith("s3"))
    assert tagger_aa.tags(s3.lq()) != [s3.record["noaa"]["tags"]]


def test_missing_normalisation_breaks_parity(tagger, cases, monkeypatch):
    monkeypatch.setattr(ram_tagger, "IMAGENET_MEAN", (0.0, 0.0, 0.0))
    monkeypatch.setattr(ram_tagger, "IMAGENET_STD", (1.0, 1.0, 1.0))
    case = cases[0]
    assert max_diff(tagger.logits(tagger.preprocess(case.lq()))[0], case.outputs["logits_noaa"]) > 100 * LOGIT_ATOL


def test_tags_in_score_order_would_fail(tagger, cases):
    """The official string lists tags in tag-list order; joining by score gives another string (same set)."""
    changed = 0
    for case in cases:
        scores = tagger.logits(tagger.preprocess(case.lq()))[0].sigmoid()
        fired = (scores > tagger.class_threshold).nonzero().flatten()
        by_score = fired[scores[fired].argsort(descending=True)].tolist()
        as_string = ", ".join(ram_tagger.tag_list()[i] for i in by_score)
        assert set(as_string.split(", ")) == set(case.record["noaa"]["tags"].split(", "))
        changed += as_string != case.record["noaa"]["tags"]
    assert changed == len(cases)


def test_wrong_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="holds only LoRA weights"):
        load_tagger(LORA)
    with pytest.raises(CheckpointError, match="not a LoRA-only file"):
        load_tagger(BASE, BASE)
    sd = torch.load(BASE, weights_only=True)["model"]
    del sd["visual_encoder.layers.0.blocks.0.attn.proj.weight"]
    broken = tmp_path / "broken.pth"
    torch.save({"model": sd}, broken)
    with pytest.raises(CheckpointError, match="missing"):
        load_tagger(broken)
    bad_lora = tmp_path / "bad.pth"
    torch.save({"visual_encoder.layers.9.blocks.0.attn.qkv.lora_A": torch.zeros(16, 32),
                "visual_encoder.layers.9.blocks.0.attn.qkv.lora_B": torch.zeros(64, 8)}, bad_lora)  # fmt: skip
    with pytest.raises(CheckpointError, match="fits no linear layer"):
        load_tagger(BASE, bad_lora)
    truncated = tmp_path / "ram.pth"
    truncated.write_bytes(BASE.read_bytes()[:10000])
    with pytest.raises(CheckpointError, match="could not be read"):
        load_tagger(truncated)
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"model": Payload()}))
    with pytest.raises(CheckpointError, match="refused to load"):
        load_tagger(evil)


def test_head_config_sets_the_head_count(tmp_path, tagger, cases):
    """The head count is not visible in the weights: q2l_config.json (or its values) sets it; 4 is the release's."""
    case = cases[0]
    (tmp_path / "q2l_config.json").write_text(json.dumps({"hidden_size": 768, "num_attention_heads": 4}))
    from_file = load_tagger(BASE, LORA, head_config=tmp_path / "q2l_config.json")
    assert torch.equal(from_file.logits(case.ram_input), tagger.logits(case.ram_input))
    two = load_tagger(BASE, LORA, head_config={"num_attention_heads": 2})
    assert two.config.head_heads == 2 and max_diff(two.logits(case.ram_input), tagger.logits(case.ram_input)) > 1e-3
    for bad in ({"num_attention_heads": 0}, {"num_attention_heads": 3}):
        with pytest.raises(CheckpointError, match="num_attention_heads|not divisible"):
            load_tagger(BASE, LORA, head_config=bad)
