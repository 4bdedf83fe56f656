import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a tripwire: nothing in the suite may reach a model hub

import pytest
import torch

from helpers import OSEDIFF_PARITY, ParityCase, osediff_cases

torch.set_num_threads(2)  # the parity data was produced on 2 threads


@pytest.fixture(scope="session")
def parity_cases() -> list[ParityCase]:
    cases = [ParityCase(r) for r in osediff_cases()]
    assert len(cases) == 3, "the OSEDiff parity data must be present (tests/data/parity/osediff)"
    return cases


@pytest.fixture(scope="session")
def osediff_pipe():
    from onestep_sr import load_pipeline

    pipe = load_pipeline(OSEDIFF_PARITY / "tiny-sd21", OSEDIFF_PARITY / "osediff_tiny.pkl", fuse_lora=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def osediff_pipe_fused():
    from onestep_sr import load_pipeline

    pipe = load_pipeline(OSEDIFF_PARITY / "tiny-sd21", OSEDIFF_PARITY / "osediff_tiny.pkl")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def osediff_converted(tmp_path_factory):
    from onestep_sr import convert_to_diffusers

    out = tmp_path_factory.mktemp("converted") / "osediff-tiny"
    convert_to_diffusers(OSEDIFF_PARITY / "tiny-sd21", OSEDIFF_PARITY / "osediff_tiny.pkl", out)
    return out
