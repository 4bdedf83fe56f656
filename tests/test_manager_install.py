"""Installed as ComfyUI-Manager installs a pack: `pip install -r requirements.txt` in ComfyUI's own environment.

$MANAGER_PYTHON names a fresh venv (no system site-packages) holding ComfyUI's own torch and ComfyUI's
requirements, and nothing of this project (`.ci/run` makes it: ~/.cache/onestep-sr/manager-venv). The test copies
that ComfyUI with this pack in custom_nodes/, runs the pack's requirements install in the venv, checks torch is the
same build afterwards, then starts ComfyUI (`--quick-test-for-ci`: load everything, then exit) and checks the pack
imported and registered its nodes. Skipped unless COMFYUI_PATH and MANAGER_PYTHON are set.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMFYUI = os.environ.get("COMFYUI_PATH")
PYTHON = os.environ.get("MANAGER_PYTHON")
pytestmark = pytest.mark.skipif(
    not (COMFYUI and PYTHON), reason="set COMFYUI_PATH and MANAGER_PYTHON (a fresh ComfyUI venv) to run"
)


def torch_build(python: str) -> str:
    done = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-1000:]
    return done.stdout.strip()


@pytest.mark.slow
def test_requirements_install_keeps_comfyuis_torch_and_the_pack_registers(tmp_path):
    from test_comfyui_server import install_comfyui

    comfy = install_comfyui(tmp_path)
    before = torch_build(PYTHON)
    pack = comfy / "custom_nodes" / "onestep-sr"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run([PYTHON, "-m", "pip", "install", "-q", "-r", str(pack / "requirements.txt")],
                          capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch_build(PYTHON) == before, "installing the pack's requirements changed ComfyUI's torch"
    env["PYTHONUNBUFFERED"] = "1"
    started = subprocess.run([PYTHON, "main.py", "--cpu", "--quick-test-for-ci"], cwd=comfy, capture_output=True,
                             text=True, env=env, timeout=600)  # fmt: skip
    log = started.stdout + started.stderr
    assert started.returncode == 0, log[-3000:]
    assert "IMPORT FAILED" not in log or "onestep-sr" not in log.split("IMPORT FAILED", 1)[1].splitlines()[0], log
    assert any("onestep-sr" in line for line in log.splitlines() if "custom_nodes" in line), log[-3000:]
    # the pack's own import, in that environment, sees its nodes
    probe = (
        "import sys; sys.path.insert(0, '.'); import comfy_api.latest  # noqa\n"
        "import importlib.util as u\n"
        "spec = u.spec_from_file_location('onestep_sr', 'custom_nodes/onestep-sr/__init__.py',"
        " submodule_search_locations=['custom_nodes/onestep-sr'])\n"
        "m = u.module_from_spec(spec); sys.modules['onestep_sr'] = m; spec.loader.exec_module(m)\n"
        "print('entrypoint', hasattr(m, 'comfy_entrypoint'))\n"
    )
    checked = subprocess.run([PYTHON, "-c", probe], cwd=comfy, capture_output=True, text=True, env=env, timeout=300)
    assert "entrypoint True" in checked.stdout, checked.stderr[-3000:]
