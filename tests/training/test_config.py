"""The training config: every mistake is a clear error naming the key, before any model loads."""

from __future__ import annotations

import pytest

from onestep_sr.cli import main
from onestep_sr.training.config import ConfigError, TrainConfig

from training_helpers import OSEDIFF_WEIGHTS, TINY_SD21


def base_values(tmp_path) -> dict:
    (tmp_path / "hq").mkdir(exist_ok=True)
    return {"base": str(TINY_SD21), "weights": str(OSEDIFF_WEIGHTS), "train_data": str(tmp_path / "hq")}


def test_yaml_toml_and_overrides_agree(tmp_path):
    v = base_values(tmp_path)
    (tmp_path / "c.yaml").write_text("".join(f"{k}: {val}\n" for k, val in v.items()) + "learning_rate: 1.0e-4\n")
    (tmp_path / "c.toml").write_text("".join(f'{k} = "{val}"\n' for k, val in v.items()) + "learning_rate = 1e-4\n")
    a = TrainConfig.from_file(tmp_path / "c.yaml", ["max_steps=7", "mixed_precision=bf16", "ema_decay=0.99"])
    b = TrainConfig.from_file(tmp_path / "c.toml", ["max_steps=7", "mixed_precision=bf16", "ema_decay=0.99"])
    assert a == b
    assert (a.max_steps, a.mixed_precision, a.ema_decay, a.learning_rate) == (7, "bf16", 0.99, 1e-4)
    # YAML 1.1 reads 1e-3 (no dot) as text: a number where a number is expected, in files and overrides alike
    (tmp_path / "d.yaml").write_text("".join(f"{k}: {val}\n" for k, val in v.items()) + "learning_rate: 2e-5\n")
    assert TrainConfig.from_file(tmp_path / "d.yaml", ["weight_decay=1e-3"]).learning_rate == 2e-5
    assert TrainConfig.from_file(tmp_path / "d.yaml", ["weight_decay=1e-3"]).weight_decay == 1e-3
    with pytest.raises(ConfigError, match="learning_rate = 'fast': expected a number"):
        TrainConfig.from_file(tmp_path / "d.yaml", ["learning_rate=fast"])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"learnin_rate": 1e-4}, r"unknown config key\(s\) 'learnin_rate' \(did you mean 'learning_rate'\?\)"),
        ({"max_steps": "many"}, r"max_steps = 'many': expected a whole number"),
        ({"max_steps": 0}, r"max_steps = 0: expected a whole number >= 1"),
        ({"mixed_precision": "fp8"}, r"mixed_precision = 'fp8': expected one of"),
        ({"perceptual": "ssim"}, r"perceptual = 'ssim': expected one of"),
        ({"gradient_checkpointing": "yes"}, r"expected true or false"),
        ({"crop_size": 66}, r"crop_size = 66: expected a multiple of scale \(4\)"),
        ({"ema_decay": 1.0}, r"ema_decay = 1.0"),
        ({"weights": "/nowhere/osediff.pkl"}, r"weights = '/nowhere/osediff.pkl': expected an existing path"),
        ({"resume": "/nowhere"}, r"resume = '/nowhere'"),
        ({"degradation": "none"}, r"unless train_lq_data"),
    ],
)
def test_bad_values_are_clear_errors(tmp_path, values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict({**base_values(tmp_path), **values})


def test_cli_reports_config_errors_before_loading(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("".join(f"{k}: {v}\n" for k, v in base_values(tmp_path).items()))
    assert main(["train", str(cfg), "objective=gan"]) == 2
    expected = "objective = 'gan': expected one of ['d3sr', 'osediff-vsd', 'regression', 'tadsr-hsd', 'tsdsr-tsd']"
    assert expected in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["train", str(cfg), "batch_size"]) == 2
    assert "expected key=value" in capsys.readouterr().err
