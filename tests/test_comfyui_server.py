"""The pack inside a real ComfyUI server (skipped unless COMFYUI_PATH points to a ComfyUI checkout).

The test copies that ComfyUI into its temp folder and installs the pack into the copy's custom_nodes/
(a copy of this checkout, as a user's clone), so nothing outside the temp folder is used or changed.
ComfyUI runs with its own interpreter: $COMFYUI_PYTHON, else <COMFYUI_PATH>/.venv/bin/python, else
this one; it must have ComfyUI's requirements and this pack's requirements installed (`.ci/run` makes
such a venv: see README, "Testing against a real ComfyUI").
"""

import json
import os
import shutil
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


def install_comfyui(root: Path) -> Path:
    """A private copy of COMFYUI_PATH (without anything installed in it) with this pack in its custom_nodes/."""
    comfy = root / "ComfyUI"
    top_level = {"custom_nodes", "models", "user", "output", "input", "temp", ".venv"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = top_level if Path(folder) == Path(COMFYUI) else set()
        return {n for n in names if n in skip or n == "__pycache__"}

    shutil.copytree(COMFYUI, comfy, ignore=ignore)
    (comfy / "custom_nodes").mkdir()
    skip = shutil.ignore_patterns(".git", "tests", "__pycache__", "*.egg-info", ".ruff_cache")
    shutil.copytree(REPO, comfy / "custom_nodes" / "onestep-sr", ignore=skip)
    return comfy


def server_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def post(url: str, payload: dict) -> bytes:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        return r.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfyui")
    comfy = install_comfyui(root)
    make_comfy_models(root)
    for d in ("output", "user", "temp"):
        (root / d).mkdir()
    (root / "extra_model_paths.yaml").write_text(
        f"onestep_test:\n    base_path: {root}\n    diffusers: models/diffusers\n"
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
        cwd=comfy,
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
    yield {"url": url, "root": root, "log": root / "server.log", "pid": proc.pid}
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


def test_a_hopeless_size_fails_fast_and_memory_comes_back(server):
    """A 6000x4000 input at x4 is refused by the memory estimate before it is converted; after it (and POST /free)
    the server's RSS is back within 0.5 GiB of where it was before the run."""
    Image.new("RGB", (6000, 4000), (90, 120, 200)).save(server["root"] / "input" / "huge.png")
    api = json.loads((WORKFLOWS / "api" / "osediff_upscale.json").read_text())
    loader = next(k for k, v in api.items() if v["class_type"] == "LoadImage")
    api[loader]["inputs"]["image"] = "huge.png"
    post(f"{server['url']}/free", {"unload_models": True, "free_memory": True})
    time.sleep(2)
    before = server_rss(server["pid"])
    started = time.time()
    entry = run_prompt(server, api)
    elapsed = time.time() - started
    assert entry["status"]["status_str"] == "error"
    messages = json.dumps(entry["status"]["messages"])
    assert "24000x16000 output needs about" in messages and "Tile Split" in messages, messages[:2000]
    assert elapsed < 60, f"refused only after {elapsed:.0f} s"
    post(f"{server['url']}/free", {"unload_models": True, "free_memory": True})
    time.sleep(3)
    after = server_rss(server["pid"])
    assert after - before < 0.5 * 2**30, f"RSS {before / 2**30:.2f} GiB before, {after / 2**30:.2f} GiB after"


def test_cancel_takes_effect_within_seconds(server):
    """Interrupt a run of a 1024 px input at x2 (about ten seconds of tiny-model work here) shortly after it starts;
    the prompt must end as interrupted within a few seconds of the request."""
    Image.new("RGB", (1024, 768), (30, 160, 90)).save(server["root"] / "input" / "big.png")
    api = json.loads((WORKFLOWS / "api" / "osediff_upscale.json").read_text())
    for node in api.values():
        if node["class_type"] == "LoadImage":
            node["inputs"]["image"] = "big.png"
        if node["class_type"] == "OneStepSRUpscale":
            node["inputs"]["upscale"] = 2
    body = {"prompt": api, "client_id": str(uuid.uuid4())}
    prompt_id = json.loads(post(f"{server['url']}/prompt", body))["prompt_id"]
    time.sleep(3)
    asked = time.time()
    post(f"{server['url']}/interrupt", {})
    while time.time() - asked < 60:
        history = json.loads(get(f"{server['url']}/history/{prompt_id}"))
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            break
        time.sleep(0.2)
    latency = time.time() - asked
    status = history[prompt_id]["status"]
    assert status["status_str"] == "error" and "interrupt" in json.dumps(status["messages"]).lower(), status
    assert latency < 5, f"cancel took {latency:.1f} s"


def test_bad_input_is_a_node_error_not_a_crash(server):
    api = json.loads((WORKFLOWS / "api" / "osediff_upscale.json").read_text())
    api["2"]["inputs"]["weights"] = "tsdsr"  # TSD-SR weights on the SD2.1 base
    entry = run_prompt(server, api)
    assert entry["status"]["status_str"] == "error"
    messages = json.dumps(entry["status"]["messages"])
    assert "SD2.1-base" in messages or "SD3" in messages
    assert json.loads(get(f"{server['url']}/system_stats"))  # the server is still up
