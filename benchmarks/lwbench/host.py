"""Finding the ComfyUI host and importing it in this process (scripts/comfy_host.py: import_in_process).

The benchmark must run inside the host's venv (torch, ComfyUI's requirements). `ensure_host_python`
installs/locates the host with scripts/comfy_host.py's install() (idempotent, seconds when nothing
changed) and re-executes the benchmark with the host's python when this interpreter is another one.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_LINK_NAME = "lora_workbench"
REEXEC_FLAG = "LW_BENCH_HOST_PYTHON"


def comfy_host_script():
    """scripts/comfy_host.py as a module (it is a script, not a package)."""
    name = "lw_comfy_host_script"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / "comfy_host.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _prefix_of(python: Path) -> str:
    out = subprocess.run([str(python), "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True,
                         check=True)
    return os.path.realpath(out.stdout.strip())


def ensure_host_python(script_path: Path, argv: list[str]):
    """Return the installed host; re-exec this script with the host's python if needed (no return then)."""
    script = comfy_host_script()
    try:
        host = script.install()
    except (script.HostError, subprocess.CalledProcessError) as err:
        sys.exit(f"No ComfyUI host: {err}\nRun `python3 scripts/comfy_host.py install` or set "
                 "COMFYUI_PATH=<ComfyUI dir> (and LW_PYTHON=<its python>).")
    if os.environ.get(REEXEC_FLAG) == "1" or os.path.realpath(sys.prefix) == _prefix_of(host.python):
        return host
    env = {**os.environ, "COMFYUI_PATH": str(host.comfyui), "LW_PYTHON": str(host.python), REEXEC_FLAG: "1"}
    print(f"[bench] re-running with the host python {host.python}", file=sys.stderr, flush=True)
    os.execve(str(host.python), [str(host.python), str(script_path), *argv], env)
    raise AssertionError("unreachable")


@dataclass
class Comfy:
    root: Path
    nodes: object  # ComfyUI's nodes module
    loop: object

    @property
    def pack(self):
        """This pack's module as ComfyUI's custom-node loader imported it."""
        module_dir = self.nodes.LOADED_MODULE_DIRS.get(PACK_LINK_NAME)
        if module_dir is None:
            raise RuntimeError(f"ComfyUI failed to import custom_nodes/{PACK_LINK_NAME}; see the log above.")
        return sys.modules[module_dir.replace(".", "_x_")]

    def pack_module(self, dotted: str):
        import importlib
        return importlib.import_module(f"{self.pack.__name__}.{dotted}")

    def node(self, class_type: str):
        return self.nodes.NODE_CLASS_MAPPINGS[class_type]


def import_comfyui(root: Path, dirs: dict[str, Path], model_folders: dict[str, Path]) -> Comfy:
    """Import ComfyUI the way main.py does (--cpu), then load custom nodes with its own loader."""
    nodes, loop = comfy_host_script().import_in_process(root, dirs, model_folders)
    return Comfy(root, nodes, loop)


def comfyui_version(root: Path) -> str:
    text = (root / "comfyui_version.py").read_text(encoding="utf-8")
    for line in text.splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("'\"")
    return "unknown"
