"""Every parity suite reads its cases from the data under ONESTEP_SR_PARITY_ROOT (default tests/data/parity): a
second set of cases in the same layout runs unchanged, each case's name in its test ids."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import DATA

REPO = Path(__file__).resolve().parents[1]


def second_root(tmp_path: Path) -> Path:
    """A copy of the parity root where one degradation case and one OSEDiff case carry new names."""
    root = tmp_path / "parity"
    root.mkdir()
    for entry in (DATA / "parity").iterdir():
        if entry.name not in ("train-common", "osediff"):
            (root / entry.name).symlink_to(entry)
    shutil.copytree(DATA / "parity" / "train-common", root / "train-common")
    shutil.copytree(DATA / "parity" / "osediff", root / "osediff")
    index_path = root / "train-common" / "degradation" / "cases.json"
    index = json.loads(index_path.read_text())
    index["cases"] = {"z9_renamed_case": index["cases"]["d1_astronaut_64x64"]}
    index_path.write_text(json.dumps(index))
    cases = root / "train-common" / "degradation" / "cases"
    (cases / "d1_astronaut_64x64").rename(cases / "z9_renamed_case")
    osediff_index = root / "osediff" / "cases.json"
    data = json.loads(osediff_index.read_text())
    data["cases"] = [dict(data["cases"][0], name="z8_second_set")]
    osediff_index.write_text(json.dumps(data))
    return root


@pytest.mark.slow
def test_a_second_set_of_cases_runs_unchanged(tmp_path):
    root = second_root(tmp_path)
    env = {**os.environ, "ONESTEP_SR_PARITY_ROOT": str(root), "HF_HUB_OFFLINE": "1"}
    tests = [
        "tests/training/test_degradation.py::test_every_stage_given_its_recorded_input",
        "tests/training/test_degradation.py::test_end_to_end_with_the_recorded_draws",
        "tests/test_parity_osediff.py::test_raw_output_matches_official",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *tests],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "test_end_to_end_with_the_recorded_draws[z9_renamed_case]" in done.stdout
    assert "test_raw_output_matches_official[z8_second_set-fused]" in done.stdout
    assert "d1_astronaut" not in done.stdout and "s1_cat" not in done.stdout


def test_a_missing_root_is_a_clear_error(tmp_path, monkeypatch):
    from helpers import parity_dir

    monkeypatch.setenv("ONESTEP_SR_PARITY_ROOT", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="ONESTEP_SR_PARITY_ROOT"):
        parity_dir("train-common")
