"""The pack inside a real ComfyUI server (skipped unless COMFYUI_PATH points to a ComfyUI checkout).

ComfyUI runs with its own interpreter: $COMFYUI_PYTHON, else <COMFYUI_PATH>/.venv/bin/python, else
this one; it must have ComfyUI's requirements and this pack's requirements.txt installed.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
from PIL import Image

from helpers import NODE_IDS, make_comfy_models
from workflow_tools import WORKFLOWS, workflow_graphs

COMFYUI = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout to run the server test")
REPO = Path(__file__).resolve().parent.parent
OUR_NODES = set(NODE_IDS)


def comfy_python() -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    venv = Path(COMFYUI) / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfyui")
    make_comfy_models(root)
    (root / "custom_nodes").mkdir()
    (root / "custom_nodes" / "onestep-sr").symlink_to(REPO, target_is_directory=True)
    for d in ("output", "user", "temp"):
        (root / d).mkdir()
    (root / "extra_model_paths.yaml").write_text(
        f"onestep_test:\n    base_path: {root}\n    custom_nodes: custom_nodes\n    diffusers: models/diffusers\n"
        f"    onestep_sr: models/onestep_sr\n    checkpoints: models/checkpoints\n"
    )
    port = free_port()
    log = open(root / "server.log", "w")  # noqa: SIM115 (the server writes to it until teardown)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [
            comfy_python(),
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(port),
            "--extra-model-paths-config",
            str(root / "extra_model_paths.yaml"),
            "--input-directory",
            str(root / "input"),
            "--output-directory",
            str(root / "output"),
            "--temp-directory",
            str(root / "temp"),
            "--user-directory",
            str(root / "user"),
            "--disable-auto-launch",
            "--disable-metadata",
        ],
        cwd=COMFYUI,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            get(f"{url}/system_stats", timeout=2)
            break
        except (urllib.error.URLError, ConnectionError, OSError):
            if proc.poll() is not None or time.time() > deadline:
                log.flush()
                pytest.fail(f"ComfyUI did not start:\n{(root / 'server.log').read_text()[-4000:]}")
            time.sleep(1)
    yield {"url": url, "root": root, "log": root / "server.log"}
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_nodes_are_registered_with_the_model_lists(server):
    info = json.loads(get(f"{server['url']}/object_info"))
    assert info.keys() >= OUR_NODES, server["log"].read_text()[-3000:]
    loader = info["OneStepSRModelLoader"]["input"]["required"]
    assert "stable-diffusion-2-1-base" in json.dumps(loader["base"]) and "osediff.pkl" in json.dumps(loader["weights"])
    assert "tsdsr" in json.dumps(loader["weights"])
    assert info["OneStepSRUpscale"]["category"] == "image/upscaling/one-step SR"
    # core extras may fail in a light environment (no torchaudio); the pack itself must import
    failed = [line for line in server["log"].read_text().splitlines() if "IMPORT FAILED" in line]
    assert not [line for line in failed if "onestep" in line], failed


def test_workflows_are_served_as_templates(server):
    templates = json.loads(get(f"{server['url']}/workflow_templates"))
    ours = next(v for k, v in templates.items() if k == "onestep-sr")
    assert sorted(ours) == sorted(workflow_graphs())


def run_prompt(server, api: dict) -> dict:
    body = json.dumps({"prompt": api, "client_id": str(uuid.uuid4())}).encode()
    request = urllib.request.Request(f"{server['url']}/prompt", data=body, headers={"Content-Type": "application/json"})
    try:
        prompt_id = json.loads(urllib.request.urlopen(request, timeout=30).read())["prompt_id"]
    except urllib.error.HTTPError as err:
        pytest.fail(f"/prompt refused the workflow: {err.read().decode()[:2000]}")
    deadline = time.time() + 300
    while time.time() < deadline:
        history = json.loads(get(f"{server['url']}/history/{prompt_id}"))
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            entry = history[prompt_id]
            if entry["status"]["status_str"] != "success" or entry["outputs"]:
                return entry
        time.sleep(1)
    pytest.fail(f"workflow did not finish:\n{server['log'].read_text()[-3000:]}")


@pytest.mark.parametrize("name", sorted(workflow_graphs()))
def test_api_workflows_run_in_comfyui(server, name):
    api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    entry = run_prompt(server, api)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    (images,) = [o["images"] for o in entry["outputs"].values() if "images" in o]
    query = urllib.parse.urlencode({k: images[0][k] for k in ("filename", "subfolder", "type")})
    data = get(f"{server['url']}/view?{query}")
    out = server["root"] / f"{name}.png"
    out.write_bytes(data)
    assert Image.open(out).size == (4 * 32, 4 * 24)


def test_bad_input_is_a_node_error_not_a_crash(server):
    api = json.loads((WORKFLOWS / "api" / "osediff_upscale.json").read_text())
    api["2"]["inputs"]["weights"] = "tsdsr"  # TSD-SR weights on the SD2.1 base
    entry = run_prompt(server, api)
    assert entry["status"]["status_str"] == "error"
    messages = json.dumps(entry["status"]["messages"])
    assert "SD2.1-base" in messages or "SD3" in messages
    assert json.loads(get(f"{server['url']}/system_stats"))  # the server is still up
