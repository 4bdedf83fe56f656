import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a tripwire: nothing in the suite may reach a model hub

from functools import cache

import pytest
import torch

from helpers import OSEDIFF_PARITY, ParityCase, osediff_cases

torch.set_num_threads(2)  # the parity data was produced on 2 threads


@pytest.fixture(scope="session")
def parity_cases() -> list[ParityCase]:
    cases = [osediff_case(r["name"]) for r in osediff_cases()]
    assert cases, f"no OSEDiff parity cases in {OSEDIFF_PARITY}"
    return cases


@cache
def osediff_case(name: str) -> ParityCase:
    return ParityCase(next(r for r in osediff_cases() if r["name"] == name))


@pytest.fixture(params=[r["name"] for r in osediff_cases()])
def parity_case(request) -> ParityCase:
    """One OSEDiff parity case per test (its name in the test id)."""
    return osediff_case(request.param)


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
