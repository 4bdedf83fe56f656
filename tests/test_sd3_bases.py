"""TSD-SR on other SD3 bases: a single-file checkpoint, and a folder with text encoders for custom prompts."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from onestep_sr import CheckpointError, load_pipeline
from onestep_sr.pipelines.demo_models import write_offline_clip_tokenizer
from onestep_sr.pipelines.loading import SD3_MEDIUM_CONFIG

from helpers import TSDSR_PARITY, TSDSR_RAW_ATOL, run_tsdsr_case, tsdsr_cases, tsdsr_raw_diff
from ldm_checkpoint import write_sd3_single_file

BASE = TSDSR_PARITY / "tiny-sd3"
LORA = TSDSR_PARITY / "lora"
EMBEDDINGS = TSDSR_PARITY / "embeddings"


def test_single_file_sd3_base_reproduces_official(tmp_path):
    single = write_sd3_single_file(BASE, tmp_path / "sd3-tiny.safetensors")
    config = tmp_path / "config"  # the tiny model's configs, as the bundled SD3-medium ones are for the real file
    shutil.copytree(BASE, config, ignore=shutil.ignore_patterns("*.safetensors"))
    pipe = load_pipeline(single, LORA, embeddings=EMBEDDINGS, base_config=config)
    pipe.set_progress_bar_config(disable=True)
    for case in tsdsr_cases()[:2]:
        assert tsdsr_raw_diff(run_tsdsr_case(pipe, case), case) <= TSDSR_RAW_ATOL, case.id


def test_bundled_sd3_medium_config_and_wrong_single_files(tmp_path):
    import json

    from diffusers import SD3Transformer2DModel
    from safetensors.torch import save_file

    with torch.device("meta"):
        transformer = SD3Transformer2DModel.from_config(
            json.loads((SD3_MEDIUM_CONFIG / "transformer" / "config.json").read_text())
        )
    assert sum(p.numel() for p in transformer.parameters()) == 2_028_328_000  # SD3-medium's 2B MMDiT
    sd21_like = tmp_path / "sd21.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(sd21_like))
    with pytest.raises(CheckpointError, match="not an SD3 checkpoint"):
        load_pipeline(sd21_like, LORA, embeddings=EMBEDDINGS)


@pytest.fixture(scope="module")
def base_with_text_encoders(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    folder = tmp_path_factory.mktemp("sd3-text") / "tiny-sd3"
    shutil.copytree(BASE, folder)
    torch.manual_seed(7)
    for suffix in ("", "_2"):
        config = CLIPTextConfig(
            hidden_size=8,
            intermediate_size=16,
            num_attention_heads=2,
            num_hidden_layers=2,
            projection_dim=32,
            vocab_size=1000,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
        CLIPTextModelWithProjection(config).save_pretrained(folder / f"text_encoder{suffix}")
        write_offline_clip_tokenizer(folder / f"tokenizer{suffix}")
    return folder


def test_custom_prompt_through_sd3_text_encoders(base_with_text_encoders):
    pipe = load_pipeline(base_with_text_encoders, LORA, embeddings=EMBEDDINGS)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder is not None and pipe.text_encoder_3 is None
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = pipe(image, prompt="a photo of a cat", output_type="pt").images

    # independent recomputation of SD3's conditioning (methods-tsdsr.md section 3): both CLIPs' penultimate
    # hidden states side by side, zero-padded to the joint dim; T5 absent -> 256 zero tokens; pooled = both
    # projected text embeds. Tokens padded to 77 with each tokenizer's pad token.
    hidden, pooled = [], []
    for enc, tok in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):
        ids = tok(
            "a photo of a cat", padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        result = enc(ids, output_hidden_states=True)
        hidden.append(result.hidden_states[-2])
        pooled.append(result.text_embeds)
    joint = pipe.transformer.config.joint_attention_dim
    clip = F.pad(torch.cat(hidden, dim=-1), (0, joint - 16))
    embeds = torch.cat([clip, torch.zeros(1, 256, joint)], dim=1)
    expected = pipe(
        image, prompt_embeds=embeds, pooled_prompt_embeds=torch.cat(pooled, dim=-1), output_type="pt"
    ).images
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # the empty prompt keeps the official fixed embeddings
    fixed = pipe(image, output_type="pt").images
    assert not torch.equal(fixed, out)
    case = tsdsr_cases()[0]
    assert tsdsr_raw_diff(run_tsdsr_case(pipe, case), case) <= TSDSR_RAW_ATOL
