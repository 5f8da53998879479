"""Shared fixtures: a real ComfyUI v0.8.0 host (scripts/comfy_host.py), in-process and over HTTP.

Fixtures
  repo_root      Path of this checkout.
  comfy_host     (session) ComfyUI imported in-process once, custom nodes (this pack and the
                 tiny-model fixture pack) loaded by ComfyUI's own loader. See ComfyHost.
  comfy_server   (session) base URL of a ComfyUI server subprocess on 127.0.0.1.
  comfy_server_process (session) that subprocess (subprocess.Popen; .pid, .lw_url).
  comfy_http     (session) ComfyHTTP client for comfy_server: get_json, post_json, run_prompt.
  loras_dir      (session) temp dir registered as a "loras" folder, in-process and in the server.
  tiny_txt2img   (session) txt2img_prompt(seed=1, ...) -> the tiny SD1.5 txt2img API prompt.
  host_install   (session) the installed host: .comfyui (Path), .python (Path), .managed.
  host_dirs      (session) {"loras", "output", "input", "user", "temp"} temp dirs of both hosts.

Getting a node's output, e.g. the KSampler latent of the txt2img prompt:
    out = comfy_host.run(tiny_txt2img(seed=1))
    latent = out["5"].output(0)["samples"]          # torch.Tensor [1, 4, 8, 8]
Tensors made by nodes are inference tensors (nodes run under torch.inference_mode()).

Run through `scripts/comfy_host.py test` (sets COMFYUI_PATH and uses the host venv), or with the
venv python and COMFYUI_PATH set; without COMFYUI_PATH the host is installed on first use.
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# Appended, never prepended: the pack's top-level `nodes/` package would shadow ComfyUI's nodes.py.
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

PACK_LINK_NAME = "lora_workbench"
SERVER_START_TIMEOUT_S = 90


# ---------------------------------------------------------------- host discovery

def comfy_host_script():
    """scripts/comfy_host.py as a module (it is a script, not a package)."""
    if "lw_comfy_host_script" not in sys.modules:
        spec = importlib.util.spec_from_file_location("lw_comfy_host_script", REPO_ROOT / "scripts" / "comfy_host.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["lw_comfy_host_script"]


def _install_host():
    """COMFYUI_PATH's install, or the managed one; links and tiny models made up to date."""
    script = comfy_host_script()
    try:
        host = script.install()
    except (script.HostError, subprocess.CalledProcessError) as err:
        pytest.fail(f"No ComfyUI test host: {err}\nRun `python3 scripts/comfy_host.py install` "
                    "or set COMFYUI_PATH=<ComfyUI dir>.", pytrace=False)
    try:
        import torch  # noqa: F401  (the host's libraries must be in this interpreter)
    except ImportError:
        pytest.fail(f"This python ({sys.executable}) cannot run ComfyUI; use "
                    f"`scripts/comfy_host.py test` or {host.python} -m pytest.", pytrace=False)
    return host


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def host_install():
    return _install_host()


@pytest.fixture(scope="session")
def host_dirs(tmp_path_factory) -> dict:
    """Per-session input/output/user/temp/loras dirs, so tests never write into the install."""
    base = tmp_path_factory.mktemp("comfy_host")
    dirs = {name: base / name for name in ("loras", "output", "input", "user", "temp")}
    for path in dirs.values():
        path.mkdir()
    return dirs


@pytest.fixture(scope="session")
def loras_dir(host_dirs) -> Path:
    return host_dirs["loras"]


def txt2img_prompt(seed: int = 1, steps: int = 2, ckpt: str = "lw_tiny_sd15.safetensors",
                   prefix: str = "lw_txt2img") -> dict:
    """API-format txt2img on the tiny SD1.5 checkpoint (64x64, euler). KSampler is node "5"."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a tiny red fox", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0, "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
            "latent_image": ["4", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["6", 0]}},
    }


@pytest.fixture(scope="session")
def tiny_txt2img():
    """txt2img_prompt(seed=1, steps=2, ckpt=..., prefix=...) -> API-format prompt dict."""
    return txt2img_prompt


# ---------------------------------------------------------------- in-process host

class PromptError(RuntimeError):
    """A prompt failed validation or execution; the message carries ComfyUI's error."""


@dataclasses.dataclass
class NodeOutput:
    """What one node produced in ComfyHost.run().

    ui       what the node showed in the UI (SaveImage: {"images": [{"filename", "subfolder", "type"}]}),
             None for nodes without UI output.
    outputs  one list per output slot, ComfyUI's own form (one item unless the node outputs lists).
    """
    ui: dict | None
    outputs: list

    def output(self, slot: int = 0, index: int = 0):
        """The value on output `slot` (e.g. KSampler slot 0: {"samples": tensor})."""
        return self.outputs[slot][index]


def _validation_message(prompt: dict, reasons: dict, error: dict | None = None) -> str:
    """One line per failed input, as ComfyUI logs them."""
    lines = [f"invalid prompt: {(error or {}).get('message', 'node inputs failed validation')}"]
    if error and error.get("details"):
        lines.append(error["details"])
    for node_id, node_reasons in reasons.items():
        for reason in node_reasons:
            lines.append(f"  {prompt[node_id]['class_type']} (node {node_id}): "
                         f"{reason['message']}: {reason.get('details', '')}")
    return "\n".join(lines)


class _ServerStub:
    """The bits of PromptServer that PromptExecutor calls; messages are kept for errors."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


class ComfyHost:
    """ComfyUI imported in this process.

    path        ComfyUI root.           nodes       ComfyUI's `nodes` module.
    pack        this pack's module as ComfyUI loaded it.
    loras_dir   temp "loras" folder.    output_dir  where SaveImage writes.
    run(prompt, outputs=None, keep_cache=False) -> {node_id: NodeOutput}
    """

    def __init__(self, path: Path, nodes_module, dirs: dict):
        import execution
        self.path = path
        self.nodes = nodes_module
        self.loras_dir = dirs["loras"]
        self.output_dir = dirs["output"]
        self._execution = execution
        self._server = _ServerStub()
        self._executor = execution.PromptExecutor(
            self._server, cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0})

    @property
    def pack(self):
        """The pack module: ComfyUI names it after its custom_nodes path ('.' -> '_x_')."""
        module_dir = self.nodes.LOADED_MODULE_DIRS.get(PACK_LINK_NAME)  # set only when the import succeeded
        if module_dir is None:
            raise RuntimeError(f"ComfyUI failed to import custom_nodes/{PACK_LINK_NAME}; see the captured log.")
        return sys.modules[module_dir.replace(".", "_x_")]

    def run(self, prompt: dict, outputs: list | None = None, keep_cache: bool = False) -> dict:
        """Validate and execute an API-format prompt like the server's queue does.

        outputs     node ids to execute; default: every output node (as the server does).
                    Name a non-output node (e.g. a KSampler) to run a graph without SaveImage.
        keep_cache  reuse cached node results from earlier runs (default: fresh cache, so a
                    changed file behind an unchanged input cannot give a stale result).
        Returns every node's NodeOutput, intermediate nodes included. Raises PromptError.
        """
        prompt = copy.deepcopy(prompt)
        prompt_id = str(uuid.uuid4())
        if not keep_cache:
            self._executor.reset()
        self._server.messages.clear()
        targets = asyncio.run(self._validate(prompt_id, prompt, outputs))
        self._executor.execute(prompt, prompt_id, {}, targets)
        if not self._executor.success:
            raise PromptError(self._execution_error())
        return self._collect(prompt)

    async def _validate(self, prompt_id, prompt, outputs):
        if outputs is None:
            ok, error, good, node_errors = await self._execution.validate_prompt(prompt_id, prompt, None)
            if not ok or node_errors:
                reasons = {n: info["errors"] for n, info in node_errors.items()}
                raise PromptError(_validation_message(prompt, reasons, error))
            return good
        unknown = [n for n in outputs if prompt.get(n, {}).get("class_type") not in self.nodes.NODE_CLASS_MAPPINGS]
        if unknown:
            raise PromptError(f"invalid prompt: unknown node ids or classes {unknown}")
        validated = {}
        for node_id in outputs:
            await self._execution.validate_inputs(prompt_id, prompt, node_id, validated)
        reasons = {n: r[1] for n, r in validated.items() if r[0] is not True and r[1]}
        if reasons:
            raise PromptError(_validation_message(prompt, reasons))
        return list(outputs)

    def _execution_error(self) -> str:
        for event, data in self._executor.status_messages:
            if event == "execution_error":
                trace = "".join(data.get("traceback") or [])
                return (f"{data['node_type']} (node {data['node_id']}) failed: "
                        f"{data['exception_type']}: {data['exception_message']}\n{trace}")
        return "execution failed without an error message"

    def _collect(self, prompt: dict) -> dict:
        results = {}
        for node_id in prompt:
            entry = self._executor.caches.outputs.get(node_id)
            if entry is not None:
                ui = entry.ui["output"] if entry.ui else None
                results[node_id] = NodeOutput(ui=ui, outputs=list(entry.outputs))
        return results


@pytest.fixture(scope="session")
def comfy_host(host_install, host_dirs) -> ComfyHost:
    script = comfy_host_script()
    try:
        nodes, loop = script.import_in_process(host_install.comfyui, host_dirs, {"loras": host_dirs["loras"]})
    except script.HostError as err:
        pytest.fail(str(err), pytrace=False)
    yield ComfyHost(host_install.comfyui, nodes, host_dirs)
    loop.close()


# ---------------------------------------------------------------- HTTP host

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _http(url: str, body: dict | None = None, timeout: float = 10):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _wait_until_up(url: str, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ComfyUI exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}", pytrace=False)
        try:
            _http(url + "/system_stats", timeout=2)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    pytest.fail(f"ComfyUI did not answer in {SERVER_START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}", pytrace=False)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def comfy_server_process(host_install, host_dirs, tmp_path_factory) -> subprocess.Popen:
    """The `main.py --cpu` server subprocess on a free loopback port, with the session's loras dir;
    .lw_url is its base URL, .pid its process (e.g. to read its memory from /proc)."""
    work = tmp_path_factory.mktemp("comfy_server")
    extra_paths = work / "extra_model_paths.yaml"
    # JSON is YAML; is_default makes files the nodes write land in the session folder, not the install.
    extra_paths.write_text(json.dumps({"lw_tests": {"loras": str(host_dirs["loras"]), "is_default": True}}))
    # The toy world's datasets (the example workflows train on them), from the install's input folder.
    for dataset in (Path(host_install.comfyui) / "input").glob("lw_toy_*"):
        shutil.copytree(dataset, work / "input" / dataset.name)
    port = free_port()
    cmd = [str(host_install.python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--disable-api-nodes", "--database-url", "sqlite:///:memory:",
           "--extra-model-paths-config", str(extra_paths),
           "--output-directory", str(work / "output"), "--input-directory", str(work / "input"),
           "--temp-directory", str(work), "--user-directory", str(host_dirs["user"])]
    log_path = work / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=host_install.comfyui, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    proc.lw_url = url
    try:
        _wait_until_up(url, proc, log_path)
        yield proc
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def comfy_server(comfy_server_process) -> str:
    """Base URL of the comfy_server_process server."""
    return comfy_server_process.lw_url


class ComfyHTTP:
    """Small JSON client for the comfy_server fixture."""

    def __init__(self, url: str):
        self.url = url

    def get_json(self, path: str, timeout: float = 30):
        return _http(self.url + path, timeout=timeout)

    def post_json(self, path: str, body: dict, timeout: float = 30):
        return _http(self.url + path, body, timeout=timeout)

    def queue_prompt(self, prompt: dict) -> str:
        """POST /prompt; returns the prompt id. Validation errors raise PromptError."""
        try:
            answer = self.post_json("/prompt", {"prompt": prompt, "client_id": "lw-tests"})
        except urllib.error.HTTPError as err:
            raise PromptError(f"POST /prompt {err.code}: {err.read().decode(errors='replace')}") from None
        return answer["prompt_id"]

    def wait_for(self, prompt_id: str, timeout: float = 120) -> dict:
        """Poll /history/<id> until the prompt is done; returns its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)  # appears once done
            if entry:
                if entry.get("status", {}).get("status_str") != "success":
                    raise PromptError(f"prompt {prompt_id} failed: {json.dumps(entry.get('status'), indent=1)}")
                return entry
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} not done after {timeout} s")

    def run_prompt(self, prompt: dict, timeout: float = 120) -> dict:
        return self.wait_for(self.queue_prompt(prompt), timeout)


@pytest.fixture(scope="session")
def comfy_http(comfy_server) -> ComfyHTTP:
    return ComfyHTTP(comfy_server)
