"""The pack inside a real ComfyUI server (skipped unless COMFYUI_PATH points to a ComfyUI checkout).

The test copies that ComfyUI into its temp folder and installs the pack into the copy's custom_nodes/
(a copy of this checkout, as a user's clone), so nothing outside the temp folder is used or changed.
ComfyUI runs with its own interpreter: $COMFYUI_PYTHON, else <COMFYUI_PATH>/.venv/bin/python, else
this one; it must have ComfyUI's requirements and this pack's requirements installed (`.ci/run` makes
such a venv: see README, "Testing against a real ComfyUI").
"""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import types
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
LEGACY = Path(__file__).parent / "data" / "legacy_workflows"
OSEDIFF_API = WORKFLOWS / "api" / "OSEDiff 4x upscale.json"
OSEDIFF_UI = WORKFLOWS / "OSEDiff 4x upscale.json"


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
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)} | {
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",  # the log is read while the server runs
    }
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
    assert info["OneStepSRModelLoader"]["category"] == "loaders/one-step SR"  # beside core's model loaders
    upscale = info["OneStepSRUpscale"]["input"]
    assert upscale["required"]["tile_size"][0] == "COMBO" and "auto" in json.dumps(upscale["required"]["tile_size"])
    assert {"size_mode", "target_long_side"} <= upscale["optional"].keys()
    # core extras may fail in a light environment (no torchaudio); the pack itself must import
    failed = [line for line in server["log"].read_text().splitlines() if "IMPORT FAILED" in line]
    assert not [line for line in failed if "onestep" in line], failed


def test_workflows_are_served_as_templates_with_thumbnails(server):
    templates = json.loads(get(f"{server['url']}/workflow_templates"))
    ours = next(v for k, v in templates.items() if k == "onestep-sr")
    assert sorted(ours) == sorted(workflow_graphs())
    for name in ours:  # the URLs the template browser asks for (titles are the file names)
        base = f"{server['url']}/api/workflow_templates/onestep-sr/{urllib.parse.quote(name)}"
        assert json.loads(get(base + ".json"))["nodes"]
        assert get(base + ".jpg") == (WORKFLOWS / f"{name}.jpg").read_bytes()


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


@pytest.mark.parametrize("name", sorted(p.stem for p in (LEGACY / "api").glob("*.json")))
def test_legacy_api_workflows_still_run(server, name):
    """Files saved before the size widgets became lists (0 / -1 for auto, no size_mode) pass the real server's
    validation (the node's validate_inputs) and run."""
    api = json.loads((LEGACY / "api" / f"{name}.json").read_text())
    entry = run_prompt(server, api)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]


def test_models_are_managed_by_comfyui(server):
    """ComfyUI's model management holds the pack's modules: a second run keeps them loaded (no new load), and after
    POST /free (unload models) the next run has ComfyUI load them again ("Requested to load" in its log)."""

    def run_with_seed(seed: int) -> int:
        api = json.loads(OSEDIFF_API.read_text())
        next(n for n in api.values() if n["class_type"] == "OneStepSRUpscale")["inputs"]["seed"] = seed
        entry = run_prompt(server, api)  # a new seed re-runs the Upscale node; the loader's output stays cached
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:2000]
        time.sleep(0.5)
        return server["log"].read_text().count("Requested to load")

    first = run_with_seed(101)
    assert run_with_seed(102) == first, "the models were loaded again although nothing asked for their memory"
    post(f"{server['url']}/free", {"unload_models": True})
    time.sleep(2)
    assert run_with_seed(103) > first, "after /free the models were still loaded: ComfyUI did not manage them"


def test_a_hopeless_size_fails_fast_and_memory_comes_back(server):
    """A 6000x4000 input at x4 is refused by the memory estimate before it is converted; after it (and POST /free)
    the server's RSS is back within 0.5 GiB of where it was before the run."""
    Image.new("RGB", (6000, 4000), (90, 120, 200)).save(server["root"] / "input" / "huge.png")
    api = json.loads(OSEDIFF_API.read_text())
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
    """Interrupt a run of a 1024 px input at x2 once the server holds 0.3 GiB more (about 3 s in): that is inside the
    VAE encode (the tiny VAE's encode of the 2048x1536 upsampled input takes about 110 s here, most of it in one
    layer), and the prompt must end as interrupted within a few seconds of the request. A cancelled run is a run
    that failed after allocating its large tensors: after it and POST /free, the server's RSS is back within 0.5 GiB."""
    Image.new("RGB", (1024, 768), (30, 160, 90)).save(server["root"] / "input" / "big.png")
    post(f"{server['url']}/free", {"unload_models": True, "free_memory": True})
    time.sleep(2)
    before = server_rss(server["pid"])
    api = json.loads(OSEDIFF_API.read_text())
    for node in api.values():
        if node["class_type"] == "LoadImage":
            node["inputs"]["image"] = "big.png"
        if node["class_type"] == "OneStepSRUpscale":
            node["inputs"]["upscale"] = 2
    body = {"prompt": api, "client_id": str(uuid.uuid4())}
    prompt_id = json.loads(post(f"{server['url']}/prompt", body))["prompt_id"]
    gib = 2**30
    during, waited = before, time.time()
    while during - before < 0.3 * gib and time.time() - waited < 60:  # until the encode holds its tensors
        time.sleep(0.2)
        during = max(during, server_rss(server["pid"]))
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
    post(f"{server['url']}/free", {"unload_models": True, "free_memory": True})
    time.sleep(3)
    after = server_rss(server["pid"])
    print(f"server RSS: {before / gib:.2f} GiB before, {during / gib:.2f} during, {after / gib:.2f} after /free")
    assert during - before >= 0.3 * gib, "the run never allocated its tensors: the check would prove nothing"
    assert after - before < 0.5 * gib, f"RSS {before / gib:.2f} GiB before, {after / gib:.2f} GiB after"


def test_bad_input_is_a_node_error_not_a_crash(server):
    api = json.loads(OSEDIFF_API.read_text())
    api["2"]["inputs"]["weights"] = "tsdsr"  # TSD-SR weights on the SD2.1 base
    entry = run_prompt(server, api)
    assert entry["status"]["status_str"] == "error"
    messages = json.dumps(entry["status"]["messages"])
    assert "SD2.1-base" in messages or "SD3" in messages
    assert json.loads(get(f"{server['url']}/system_stats"))  # the server is still up


# ---------------------------------------------------------------------------- the real frontend, in headless Chromium

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
UI_WORKFLOWS = {n: WORKFLOWS / f"{n}.json" for n in workflow_graphs()} | {
    f"legacy {p.stem}": p for p in sorted(LEGACY.glob("*.json"))
}


@pytest.fixture(scope="module")
def browser_page(server):
    """The server's frontend in headless Chromium (Debian's chromium, driven by Playwright); screenshots go to
    <server temp folder>/screenshots. Missing tools fail the test: CI installs both (.ci/run)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the frontend check needs the playwright package: pip install playwright (.ci/run does)")
    if not CHROMIUM:
        pytest.fail("the frontend check needs Chromium: apt-get install chromium, or set CHROMIUM_PATH")
    shots = server["root"] / "screenshots"
    shots.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page_errors: list[str] = []  # uncaught errors and failed loads that involve the pack's own files
        page.on("pageerror", lambda err: page_errors.append(err.stack or str(err)))
        page.on("requestfailed", lambda request: page_errors.append(f"failed: {request.url}"))
        page.on("response", lambda r: page_errors.append(f"{r.status}: {r.url}") if r.status >= 400 else None)
        page.goto(server["url"])
        page.wait_for_function("() => window.app?.graph && window.app?.extensionManager", timeout=120_000)
        page.wait_for_timeout(1500)  # the default graph and the first-run dialog settle
        page.keyboard.press("Escape")
        yield types.SimpleNamespace(page=page, shots=shots, errors=page_errors)
        # (this frontend itself throws one error while it starts offline; only the pack's are failures)
        assert not [e for e in page_errors if "onestep" in e.lower()], page_errors
        browser.close()


def load_in_frontend(page, workflow: dict) -> list[dict]:
    """Load a UI workflow as a user does (app.loadGraphData) and describe each node as the frontend sees it."""
    return page.evaluate(
        """async (workflow) => {
            await window.app.loadGraphData(workflow, true, true, "test");
            return window.app.graph.nodes.map((node) => ({
                type: node.type,
                known: !!node.constructor.nodeData,
                has_errors: !!node.has_errors,
                widgets: Object.fromEntries((node.widgets ?? []).map((w) => [w.name, w.value])),
                bad_combos: (node.widgets ?? [])
                    .filter((w) => w.type === "combo" && !(w.options?.values ?? []).includes(w.value))
                    .map((w) => `${w.name}=${JSON.stringify(w.value)}`),
            }));
        }""",
        workflow,
    )


@pytest.mark.parametrize("name", sorted(UI_WORKFLOWS))
def test_every_workflow_loads_in_the_frontend(browser_page, name):
    """No missing-node dialog, every node a known type, none red, every list widget holding a listed value (old
    files' 0/-1 sizes read as "auto" by the pack's frontend extension)."""
    page = browser_page.page
    workflow = json.loads(UI_WORKFLOWS[name].read_text())
    nodes = load_in_frontend(page, workflow)
    page.wait_for_timeout(300)
    page.screenshot(path=str(browser_page.shots / f"{name}.png"))
    assert page.get_by_text("Some Nodes Are Missing").count() == 0
    assert [n["type"] for n in nodes] and all(n["known"] for n in nodes), nodes
    assert not [n["type"] for n in nodes if n["has_errors"]]
    assert not [(n["type"], n["bad_combos"]) for n in nodes if n["bad_combos"]]
    upscale = next(n["widgets"] for n in nodes if n["type"] == "OneStepSRUpscale")
    saved = next(node for node in workflow["nodes"] if node["type"] == "OneStepSRUpscale")["widgets_values"]
    expected = {"auto" if v in (0, -1) else str(v) for v in saved[2:5]}
    assert {upscale["tile_size"], upscale["tile_overlap"], upscale["vae_tile_size"]} == expected
    assert upscale["control_after_generate"] == saved[6]
    assert not [e for e in browser_page.errors if "onestep" in e.lower()], browser_page.errors


def test_a_new_upscale_node_keeps_its_seed_fixed(browser_page):
    extensions = browser_page.page.evaluate("() => window.app.extensions.map((e) => e.name)")
    assert "onestep_sr.upscale" in extensions  # nodes/web/onestep_sr.js, served by ComfyUI from WEB_DIRECTORY
    widgets = browser_page.page.evaluate(
        """() => {
            const node = window.LiteGraph.createNode("OneStepSRUpscale");
            return Object.fromEntries(node.widgets.map((w) => [w.name, w.value]));
        }"""
    )
    assert widgets["control_after_generate"] == "fixed"
    assert (widgets["tile_size"], widgets["tile_overlap"], widgets["vae_tile_size"]) == ("auto",) * 3
    assert widgets["size_mode"] == "upscale factor"
    # a saved node keeps its own control (the committed files all say "fixed", so this one says "randomize")
    workflow = json.loads(OSEDIFF_UI.read_text())
    upscale = next(n for n in workflow["nodes"] if n["type"] == "OneStepSRUpscale")
    upscale["widgets_values"][6] = "randomize"
    nodes = load_in_frontend(browser_page.page, workflow)
    assert next(n for n in nodes if n["type"] == "OneStepSRUpscale")["widgets"]["control_after_generate"] == "randomize"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("osediff", "OSEDiff / TSD-SR / TAD-SR / D3SR Loader (one-step SR)"),
        ("tsd-sr", "OSEDiff / TSD-SR / TAD-SR / D3SR Loader (one-step SR)"),
        ("tad-sr", "OSEDiff / TSD-SR / TAD-SR / D3SR Loader (one-step SR)"),
        ("d3sr", "OSEDiff / TSD-SR / TAD-SR / D3SR Loader (one-step SR)"),
        ("super resolution", "One-step Super-Resolution Upscale"),
        ("upscale", "One-step Super-Resolution Upscale"),
        ("dape", "DAPE Prompt Extractor (OSEDiff tags)"),
    ],
)
def test_node_search_finds_the_pack(browser_page, query, expected):
    """The frontend's node search box (double-click on the canvas), as a user types."""
    page = browser_page.page
    page.evaluate("() => window.app.graph.clear()")
    box = page.get_by_placeholder("Search Nodes...")
    for _ in range(10):
        page.mouse.dblclick(900, 600)
        with contextlib.suppress(Exception):
            box.wait_for(timeout=1000)
            break
    box.fill(query)
    found: list[str] = []
    for _ in range(20):  # the list updates as the user types
        page.wait_for_timeout(250)
        found = [t.split("\n")[0].strip() for t in page.locator(".option-display-name").all_inner_texts()]
        if expected in found[:8]:
            break
    page.keyboard.press("Escape")
    box.wait_for(state="hidden", timeout=5000)
    assert expected in found[:8], found


def test_templates_show_titles_and_thumbnails(browser_page):
    page = browser_page.page
    thumbnails: dict[str, int] = {}

    def record(response):
        if "/workflow_templates/onestep-sr/" in response.url and response.url.endswith(".jpg"):
            thumbnails[urllib.parse.unquote(response.url.rsplit("/", 1)[1])[:-4]] = response.status

    page.on("response", record)
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.get_by_text("onestep-sr", exact=True).first.click()
    for name in workflow_graphs():
        page.get_by_text(name, exact=True).first.wait_for(timeout=10_000)
    # thumbnails load lazily as their cards come into view: bring each into view until every one has loaded
    for _ in range(20):
        for name in workflow_graphs():
            if name not in thumbnails:
                page.get_by_text(name, exact=True).first.scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        if set(thumbnails) >= set(workflow_graphs()):
            break
    page.screenshot(path=str(browser_page.shots / "templates.png"))
    page.keyboard.press("Escape")
    page.remove_listener("response", record)
    assert thumbnails == dict.fromkeys(workflow_graphs(), 200)


def test_an_old_workflow_queued_from_the_frontend_runs(browser_page, server):
    """The prompt the frontend writes from an old file (sizes as list strings after the extension) is accepted
    and runs."""
    page = browser_page.page
    load_in_frontend(page, json.loads((LEGACY / "large_image_tiled.json").read_text()))
    with page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST") as response:
        page.evaluate("() => window.app.queuePrompt(0, 1)")
    prompt_id = response.value.json()["prompt_id"]
    deadline = time.time() + 300
    while time.time() < deadline:
        history = json.loads(get(f"{server['url']}/history/{prompt_id}"))
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            break
        time.sleep(1)
    status = history[prompt_id]["status"]
    assert status["status_str"] == "success", json.dumps(status)[:2000]
    page.screenshot(path=str(browser_page.shots / "queued legacy workflow.png"))
