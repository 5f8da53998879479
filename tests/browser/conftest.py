"""Real-browser fixtures: Debian's chromium, driven by Playwright, on the comfy_server fixture's ComfyUI.

Fixtures
  browser     (module) chromium (/usr/bin/chromium or $LW_CHROMIUM), launched by Playwright;
              Playwright never downloads a browser here. Module scope: while Playwright's sync
              API is open an asyncio loop runs, which the in-process host tests cannot share.
  comfy_page  (module) one ComfyUI page (1400x900) with the pack's extensions loaded; requests
              leaving loopback are refused so nothing waits on the internet.
  ui          (function) a UI helper on a cleared graph (see ComfyUI below). After the test it
              fails on any console error or page error from this pack's extension.
  artifacts   Path: test-artifacts/browser/ (git-ignored) for screenshots.
  info_route  (session) URL of the pack's GET /lora_workbench/info, checked to be registered.

Screenshots for the README: with LW_UPDATE_SCREENSHOTS=1, ui.screenshot(name, docs=True) also
writes docs/screenshots/<name>.png.

Install (once per machine; `scripts/comfy_host.py test` does both: it installs chromium when it runs
as root, or stops before any test with the command to run):
    apt-get install -y chromium
    <host venv>/bin/pip install playwright      # never `playwright install`
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "test-artifacts" / "browser"
DOCS_SCREENSHOTS = REPO_ROOT / "docs" / "screenshots"
CHROMIUM = os.environ.get("LW_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 900}
# What marks a console message or page error as ours: the extension's URL path and file names.
OUR_MARKERS = ("lora_workbench", "lw_common.js", "lw_stack_rows.js", "lw_lora_info.js", "lw_train_view.js",
               "lw_merge_report.js")
OUR_EXTENSIONS = ("lora_workbench.StackRows", "lora_workbench.LoraInfo", "lora_workbench.TrainView",
                  "lora_workbench.MergeReport")
SETTINGS = {
    "Comfy.TutorialCompleted": True,       # no Templates dialog over the canvas
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "Comfy.Workflow.ShowMissingModelsWarning": False,
    "Comfy.Toast.DisableReconnectingToast": True,
}


def _post_settings(url: str) -> None:
    request = urllib.request.Request(f"{url}/settings", data=json.dumps(SETTINGS).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(request, timeout=10).read()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def info_route(comfy_server) -> str:
    """URL of the pack's GET /lora_workbench/info; fails clearly when the route is not registered."""
    url = f"{comfy_server}/lora_workbench/info"
    try:
        urllib.request.urlopen(url, timeout=10)
    except urllib.error.HTTPError as err:
        if err.code == 400 and "name" in json.loads(err.read() or b"{}").get("error", ""):
            return url
        pytest.fail(f"GET /lora_workbench/info answered {err.code}: the pack's routes are not registered. "
                    "The pack's __init__.py must call nodes.routes.register_routes() at import.", pytrace=False)
    pytest.fail("GET /lora_workbench/info without a name should answer 400", pytrace=False)


# Module scope, not session: Playwright's sync API keeps an asyncio loop running while it is open,
# and the in-process host tests (tests/host) must run their own loop after this directory's tests.
@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is missing from the host venv: <venv>/bin/pip install playwright "
                    "(the browser itself comes from `apt-get install -y chromium`).", pytrace=False)
    if not Path(CHROMIUM).exists():
        pytest.fail(f"No chromium at {CHROMIUM}: apt-get install -y chromium (or set LW_CHROMIUM).", pytrace=False)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        yield browser
        browser.close()


class ConsoleLog:
    """Console errors and page errors that come from this pack's extension."""

    def __init__(self):
        self.ours: list[str] = []
        self.all_errors: list[str] = []

    def on_console(self, message) -> None:
        if message.type != "error":
            return
        location = message.location or {}
        text = f"{message.text} @ {location.get('url', '')}:{location.get('lineNumber', '')}"
        self.all_errors.append(text)
        if any(marker in text for marker in OUR_MARKERS):
            self.ours.append(f"console.error: {text}")

    def on_page_error(self, error) -> None:
        text = f"{error.name}: {error.message}\n{error.stack or ''}"
        self.all_errors.append(text)
        if any(marker in text for marker in OUR_MARKERS):
            self.ours.append(f"page error: {text}")


@pytest.fixture(scope="module")
def comfy_page(browser, comfy_server):
    _post_settings(comfy_server)
    context = browser.new_context(viewport=VIEWPORT, permissions=["clipboard-read", "clipboard-write"])
    # Only the server under test may be reached: the frontend's release/news lookups fail at once.
    context.route(re.compile(r"^(?!https?://(127\.0\.0\.1|localhost)[:/]).*"), lambda route: route.abort())
    page = context.new_page()
    log = ConsoleLog()
    page.on("console", log.on_console)
    page.on("pageerror", log.on_page_error)
    page.lw_console = log
    page.goto(comfy_server)
    page.wait_for_function("window.app?.graph && window.LiteGraph && window.comfyAPI?.api?.api", timeout=90_000)
    names = OUR_EXTENSIONS
    try:
        page.wait_for_function("names => names.every(n => app.extensions.some(e => e.name === n))", arg=list(names),
                               timeout=30_000)
    except Exception:
        loaded = page.evaluate("app.extensions.map(e => e.name).filter(n => n.startsWith('lora_workbench'))")
        pytest.fail(f"the pack's extensions did not all load: {loaded}\nconsole errors:\n"
                    + "\n".join(log.all_errors[-20:]), pytrace=False)
    # the frontend finishes its start-up (default graph, settings, sidebar) after the extensions load
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(1000)
    yield page
    context.close()


class ComfyUI:
    """Helpers on the shared page. JS runs in ComfyUI's page (app, api, LiteGraph)."""

    def __init__(self, page, server_url: str, artifacts: Path):
        self.page = page
        self.url = server_url
        self.artifacts = artifacts
        self.expected_errors: list[str] = []

    def expect_console_error(self, substring: str) -> None:
        """A console error containing `substring` is this test's intent (e.g. a refused request)."""
        self.expected_errors.append(substring)

    def js(self, script: str, arg=None):
        return self.page.evaluate(script, arg)

    def clear(self) -> None:
        self.js("() => { document.querySelectorAll('.lw-panel').forEach(p => p.remove()); app.graph.clear(); }")
        self.page.keyboard.press("Escape")

    def add_node(self, node_type: str, pos=(100, 100), values: dict | None = None) -> int:
        return self.js("""([type, pos, values]) => {
            const node = LiteGraph.createNode(type);
            node.pos = pos;
            app.graph.add(node);
            for (const [name, value] of Object.entries(values)) {
                const widget = node.widgets.find(w => w.name === name);
                widget.value = value;
                widget.callback?.(value);
            }
            return node.id;
        }""", [node_type, list(pos), values or {}])

    def connect(self, from_id: int, output: str, to_id: int, input_name: str) -> None:
        ok = self.js("""([a, out, b, inp]) => {
            const from = app.graph.getNodeById(a), to = app.graph.getNodeById(b);
            return !!from.connect(from.findOutputSlot(out), to, to.findInputSlot(inp));
        }""", [from_id, output, to_id, input_name])
        assert ok, f"could not connect {from_id}.{output} -> {to_id}.{input_name}"

    def widget(self, node_id: int, name: str):
        return self.js("([id, name]) => app.graph.getNodeById(id).widgets.find(w => w.name === name)?.value",
                       [node_id, name])

    def focus(self, node_ids: list[int], scale: float = 1.0, top: float = 50) -> None:
        """Show these nodes at `scale`, their top edge `top` px below the canvas top, centred across."""
        self.js("""([ids, scale, top]) => {
            const nodes = ids.map(id => app.graph.getNodeById(id));
            const x0 = Math.min(...nodes.map(n => n.pos[0])), x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0]));
            const y0 = Math.min(...nodes.map(n => n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT));
            const el = app.canvas.canvas;
            app.canvas.ds.scale = scale;
            app.canvas.ds.offset = [el.clientWidth / (2 * scale) - (x0 + x1) / 2, top / scale - y0];
            app.canvas.setDirty(true, true);
        }""", [node_ids, scale, top])
        self.settle()

    def focus_bottom(self, node_id: int, others: list[int] = ()) -> None:
        """Scale 1, the bottom of this (tall) node near the window's bottom, centred with `others` across."""
        self.js("""([id, others]) => {
            const nodes = [id, ...others].map(i => app.graph.getNodeById(i));
            const node = nodes[0], el = app.canvas.canvas;
            const x0 = Math.min(...nodes.map(n => n.pos[0])), x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0]));
            app.canvas.ds.scale = 1;
            app.canvas.ds.offset = [el.clientWidth / 2 - (x0 + x1) / 2,
                                    el.clientHeight - 30 - (node.pos[1] + node.size[1])];
            app.canvas.setDirty(true, true);
        }""", [node_id, list(others)])
        self.settle()

    def open_node_search(self):
        """Double-click empty canvas, as a user opens ComfyUI's node search; the search input.

        On a loaded 2-core machine the frontend can miss a double click that lands while it is
        still busy (the dialog never opens), so the gesture is repeated, as a user would."""
        box = self.page.locator(".comfy-vue-node-search-box input:visible")
        for attempt in range(3):
            self.settle()
            self.page.mouse.dblclick(500, 400)
            try:
                box.wait_for(timeout=5_000)
                return box
            except Exception:
                if attempt == 2:
                    raise
                self.page.keyboard.press("Escape")

    def settle(self, ms: int = 150) -> None:
        """Let the canvas draw and the DOM widgets follow it."""
        self.js("() => { app.canvas.setDirty(true, true); "
                "return new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r))); }")
        self.page.wait_for_timeout(ms)

    def load(self, workflow: dict, name: str | None = None) -> None:
        """app.loadGraphData, as opening a workflow file does; earlier test tabs are closed."""
        self.js("""async ([g, name]) => {
            await app.loadGraphData(g, true, false, name);
            const store = app.extensionManager?.workflow;  // tidy tabs: screenshots show one
            for (const w of [...(store?.openWorkflows ?? [])]) {
                if (w !== store.activeWorkflow) await store.closeWorkflow(w);
            }
        }""", [workflow, name])
        self.settle(300)

    def prompt(self) -> dict:
        """app.graphToPrompt(): {output: API prompt, workflow: UI graph}."""
        return self.js("async () => JSON.parse(JSON.stringify(await app.graphToPrompt()))")

    def queue(self) -> str:
        """Queue the graph from the page (its client id, so node UI updates reach the page)."""
        result = self.js("""async () => {
            try {
                const r = await comfyAPI.api.api.queuePrompt(0, await app.graphToPrompt());
                return {id: r.prompt_id};
            } catch (e) {
                return {error: String(e), detail: JSON.stringify(e.response ?? null)};
            }
        }""")
        assert "id" in result, f"queueing failed: {result}"
        return result["id"]

    def screenshot(self, name: str, docs: bool = False) -> Path:
        self.settle()
        path = self.artifacts / f"{name}.png"
        self.page.screenshot(path=str(path))
        if docs and os.environ.get("LW_UPDATE_SCREENSHOTS") == "1":
            DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, DOCS_SCREENSHOTS / f"{name}.png")
        return path

    def wait_for(self, script: str, arg=None, timeout: float = 10_000):
        return self.page.wait_for_function(script, arg=arg, timeout=timeout)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"lw_report_{report.when}", report)
    return report


@pytest.fixture
def ui(request, comfy_page, comfy_server, artifacts):
    helper = ComfyUI(comfy_page, comfy_server, artifacts)
    helper.clear()
    before = len(comfy_page.lw_console.ours)
    started = time.monotonic()
    yield helper
    report = getattr(request.node, "lw_report_call", None)
    if report is not None and report.failed:  # what the page looked like when it failed
        comfy_page.screenshot(path=str(artifacts / f"FAILED-{request.node.name}.png"))
    helper.page.keyboard.press("Escape")
    ours = [e for e in comfy_page.lw_console.ours[before:] if not any(x in e for x in helper.expected_errors)]
    assert not ours, f"console errors from the LoRA Workbench extension ({time.monotonic() - started:.0f} s):\n" \
        + "\n".join(ours)
