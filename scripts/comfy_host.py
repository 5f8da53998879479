#!/usr/bin/env python3.11
"""Test/demo host for LoRA Workbench: a real, pinned ComfyUI outside the checkout.

    comfy_host.py [--source GIT] install       install everything, print ComfyUI path + python
    comfy_host.py [--source GIT] env           print `export COMFYUI_PATH=... LW_PYTHON=...`
    comfy_host.py [--source GIT] test [ARGS]   install, then `python -m pytest ARGS` (default: tests);
                                               installs Debian's chromium first when the browser tests
                                               are selected and it is missing (as root), or stops
                                               with the command to run
    comfy_host.py [--source GIT] serve [--port 8188] [-- MAIN_PY_ARGS]
                                               install, then run ComfyUI on 127.0.0.1
    comfy_host.py [--source GIT] demo [--port 8188] [--no-run] [-- MAIN_PY_ARGS]
                                               serve, then run the train-then-stack example once
    MAIN_PY_ARGS are ComfyUI's own options (e.g. --front-end-root DIR), passed to main.py after ours.

What `install` does (each step is skipped when its stamp says nothing changed):
  * ComfyUI v0.8.0 -> <cache>/ComfyUI-v0.8.0, from --source / $LW_COMFYUI_SOURCE (a git URL
    or a local git dir, bare or not; default: the public GitHub repo). Tag v0.8.0 is used,
    or the pinned commit when the source lacks the tag.
  * a Python 3.11 venv at <cache>/venv-py311 with pinned torch, ComfyUI's requirements and the
    test-only libraries (pytest, playwright; diffusers, peft, lycoris-lora for the interop tests).
  * custom_nodes/lora_workbench -> this checkout, custom_nodes/lw_test_fixture -> the test
    fixture pack (tests/host_fixture/lw_test_fixture) that registers the tiny models.
  * tiny random-weight models (tests/host_fixture/tiny_models.py) in ComfyUI's models folders.

<cache> is $LW_CACHE_DIR or ${XDG_CACHE_HOME:-~/.cache}/lora-workbench.
With $COMFYUI_PATH set, that existing install (and $LW_PYTHON or this python) is used as is:
only the links and tiny models are added to it.

Standard library only: it must run before any venv exists.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMFYUI_VERSION = "0.8.0"
COMFYUI_TAG = "v0.8.0"
COMFYUI_COMMIT = "fc0cb10bcbee6e73ed3caf34c27f7bde4559a07f"
DEFAULT_SOURCE = "https://github.com/comfyanonymous/ComfyUI.git"
# Only the HunyuanVideo text encoder needs this blob; some mirrors lack it.
OPTIONAL_BLOB = "comfy/text_encoders/llama_tokenizer/tokenizer.json"

PYTHON_VERSION = (3, 11)
# Repeated on every pip line so the resolver never swaps torch (CPU-only hosts included).
TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")
SKIPPED_REQUIREMENTS = {"torch", "torchvision", "torchaudio"}
EXTRA_REQUIREMENTS = ("requests", "pytest", "playwright")  # playwright drives Debian's chromium; it never downloads one
# Test-only: the libraries the interop tests (tests/host/test_interop.py) read and write LoRA files with.
# Nothing of the pack imports them; they never download weights (the tests build tiny models from configs).
# prodigyopt: the Prodigy optimizer Train LoRA offers when it is installed (tests/core/test_optimizers.py).
TEST_REQUIREMENTS = ("diffusers==0.42.1", "peft==0.21.2", "lycoris-lora==4.1.3", "prodigyopt==1.1.2")

CHECKOUT = Path(__file__).resolve().parent.parent
FIXTURE_PACK = CHECKOUT / "tests" / "host_fixture" / "lw_test_fixture"
TINY_MODELS_SCRIPT = CHECKOUT / "tests" / "host_fixture" / "tiny_models.py"
DEMO_LORA_SCRIPT = CHECKOUT / "tests" / "host_fixture" / "demo_lora.py"
PACK_LINK_NAME = "lora_workbench"
FIXTURE_LINK_NAME = "lw_test_fixture"

INSTALL_STAMP = ".lw_install.json"
VENV_STAMP = ".lw_requirements.sha256"
MODELS_STAMP = ".lw_tiny_models.json"
TOY_WORLD = CHECKOUT / "tests" / "host_fixture" / "toy_world"
TOY_WORLD_STAMP = ".lw_toy_world.json"


class HostError(Exception):
    """A problem the user has to fix; printed without a traceback."""


@dataclasses.dataclass(frozen=True)
class Host:
    comfyui: Path   # ComfyUI root (has main.py)
    python: Path    # interpreter that can run it
    managed: bool   # True when this script installed it (in the cache)


def log(msg: str) -> None:
    # stdout is reserved for results (`env` output is eval'ed by shells).
    print(f"[comfy_host] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    if os.environ.get("LW_CACHE_DIR"):
        return Path(os.environ["LW_CACHE_DIR"]).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser().resolve() / "lora-workbench"


def comfyui_dir() -> Path:
    return cache_dir() / f"ComfyUI-v{COMFYUI_VERSION}"


def venv_dir() -> Path:
    return cache_dir() / "venv-py{}{}".format(*PYTHON_VERSION)


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def sha256_bytes(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("check", True)
    if not kwargs.get("capture_output"):
        kwargs.setdefault("stdout", sys.stderr)  # tool chatter must not reach `env`'s stdout
    return subprocess.run([str(c) for c in cmd], **kwargs)


@contextlib.contextmanager
def install_lock():
    """Serialise installs sharing a cache (parallel CI jobs, conftest + CLI)."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / ".install.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------- ComfyUI source

def source_help() -> str:
    return (
        f"Provide ComfyUI {COMFYUI_TAG} another way:\n"
        f"  LW_COMFYUI_SOURCE=<local git dir or git URL> (a clone or mirror holding tag "
        f"{COMFYUI_TAG} or commit {COMFYUI_COMMIT}), or\n"
        f"  COMFYUI_PATH=<existing ComfyUI install> (with LW_PYTHON=<python that runs it>)."
    )


def is_url(source: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*://", source) or re.match(r"^[\w.-]+@[\w.-]+:", source))


def local_git_dir(source: str) -> Path | None:
    """The git dir of a local repository (bare or with a work tree), None for URLs."""
    if is_url(source):
        return None
    path = Path(source).expanduser()
    if not path.exists():
        raise HostError(f"ComfyUI source {path} does not exist.\n{source_help()}")
    if (path / ".git").exists():
        return (path / ".git").resolve()
    if (path / "HEAD").is_file() and (path / "objects").is_dir():
        return path.resolve()
    raise HostError(f"{path} is not a git repository.\n{source_help()}")


def git(git_dir: Path, *args, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    return run(["git", f"--git-dir={git_dir}", *args], env=env, **kwargs)


def resolve_commit(git_dir: Path, rev: str) -> str | None:
    out = git(git_dir, "rev-parse", "--verify", "-q", f"{rev}^{{commit}}",
              check=False, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def pick_revision(git_dir: Path) -> str:
    """Tag v0.8.0 when present (upstream truth), else the pinned commit."""
    commit = resolve_commit(git_dir, f"refs/tags/{COMFYUI_TAG}") or resolve_commit(git_dir, COMFYUI_COMMIT)
    if commit is None:
        raise HostError(f"{git_dir} has neither tag {COMFYUI_TAG} nor commit {COMFYUI_COMMIT}.\n{source_help()}")
    if commit != COMFYUI_COMMIT:
        log(f"note: {COMFYUI_TAG} is {commit} in this source (pinned: {COMFYUI_COMMIT})")
    return commit


def shallow_fetch(url: str, scratch: Path) -> Path:
    """Fetch just the pinned revision of a remote into a scratch bare repo."""
    git_dir = scratch / "src.git"
    run(["git", "init", "-q", "--bare", git_dir])
    attempts = ([f"+refs/tags/{COMFYUI_TAG}:refs/tags/{COMFYUI_TAG}"], [COMFYUI_COMMIT])
    errors = []
    for refspec in attempts:
        log(f"fetching {refspec[0]} from {url}")
        out = git(git_dir, "fetch", "-q", "--depth", "1", "--no-tags", url, *refspec,
                  check=False, capture_output=True, text=True, timeout=900)
        if out.returncode == 0:
            return git_dir
        fatal = [line for line in out.stderr.splitlines() if line.startswith("fatal:")]
        errors.append((fatal or out.stderr.strip().splitlines() or ["git fetch failed"])[0])
    reason = "; ".join(dict.fromkeys(errors))  # same cause twice: say it once
    raise HostError(f"Cannot fetch ComfyUI {COMFYUI_TAG} from {url}: {reason}\n{source_help()}")


def archive(git_dir: Path, commit: str, dest: Path) -> None:
    """Extract the tree of `commit` into dest; retry without the optional blob if it is missing."""
    for pathspec in ([], ["--", ".", f":(exclude){OPTIONAL_BLOB}"]):
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        tar = subprocess.Popen(["tar", "-x", "-C", str(dest)], stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
        arch = git(git_dir, "archive", "--format=tar", commit, *pathspec,
                   stdout=tar.stdin, stderr=subprocess.PIPE, check=False)
        tar.stdin.close()
        if tar.wait() == 0 and arch.returncode == 0:
            if pathspec:
                log(f"note: source lacks {OPTIONAL_BLOB}; installed without it (HunyuanVideo TE only)")
            return
    raise HostError(f"git archive of {commit} from {git_dir} failed:\n{arch.stderr.decode(errors='replace')}")


def check_version(root: Path) -> None:
    text = (root / "comfyui_version.py").read_text(encoding="utf-8")
    found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text)
    if not found or found.group(1) != COMFYUI_VERSION:
        raise HostError(f"expected ComfyUI {COMFYUI_VERSION}, the source gave {found and found.group(1)}")


def install_comfyui(source: str, target: Path) -> None:
    """Extract ComfyUI into a temp dir beside target, then rename it into place (atomic)."""
    stamp = target / INSTALL_STAMP
    if stamp.is_file():
        return
    if target.exists():
        raise HostError(f"{target} exists but was not installed by this script; remove it, "
                        "or point COMFYUI_PATH at it to use it as is.")
    log(f"installing ComfyUI {COMFYUI_TAG} into {target} (source: {source})")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".ComfyUI-tmp-") as scratch:
        scratch = Path(scratch)
        git_dir = local_git_dir(source) or shallow_fetch(source, scratch)
        commit = pick_revision(git_dir)
        tree = scratch / "tree"
        archive(git_dir, commit, tree)
        check_version(tree)
        (tree / INSTALL_STAMP).write_text(json.dumps(
            {"version": COMFYUI_VERSION, "commit": commit, "source": source}, indent=1) + "\n")
        tree.rename(target)


# ---------------------------------------------------------------- venv

def base_python() -> str:
    """A Python 3.11 to create the venv with."""
    if sys.version_info[:2] == PYTHON_VERSION:
        return sys.executable
    name = "python{}.{}".format(*PYTHON_VERSION)
    found = shutil.which(name)
    if not found:
        raise HostError(f"{name} is needed to create the venv and was not found on PATH.")
    return found


def filtered_requirements(requirements_txt: Path) -> list[str]:
    """ComfyUI's requirements without the torch family (pinned separately)."""
    kept = []
    for line in requirements_txt.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        name = re.split(r"[<>=!~;\[\s]", line, maxsplit=1)[0].lower()
        if line and name not in SKIPPED_REQUIREMENTS:
            kept.append(line)
    return kept


def ensure_venv(venv: Path, requirements_txt: Path) -> Path:
    requirements = filtered_requirements(requirements_txt)
    wanted = sha256_bytes(json.dumps([PYTHON_VERSION, TORCH_PINS, requirements, EXTRA_REQUIREMENTS,
                                      TEST_REQUIREMENTS]).encode())
    python = venv_python(venv)
    stamp = venv / VENV_STAMP
    if python.exists() and stamp.is_file() and stamp.read_text().strip() == wanted:
        return python
    if not python.exists():
        log(f"creating venv {venv}")
        run([base_python(), "-m", "venv", venv])
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check"]
    log("pip: torch (several minutes on a fresh venv)")
    run([*pip, *TORCH_PINS])
    req_file = venv / "lw-comfyui-requirements.txt"
    req_file.write_text("\n".join(requirements) + "\n")
    log("pip: ComfyUI requirements")
    run([*pip, "-r", req_file, *EXTRA_REQUIREMENTS, *TEST_REQUIREMENTS, *TORCH_PINS])
    stamp.write_text(wanted + "\n")
    return python


# ---------------------------------------------------------------- links and models

def ensure_link(link: Path, target: Path, managed: bool) -> None:
    """Point link at target, replacing a stale link (CI runs from fresh clones elsewhere)."""
    if link.is_symlink():
        if Path(os.readlink(link)) == target:
            return
    elif link.exists():
        if not managed:
            log(f"warning: {link} is a real folder, left alone (not this checkout)")
            return
        raise HostError(f"{link} is a real folder in the managed install; remove it.")
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target, target_is_directory=True)
    os.replace(tmp, link)


def ensure_models(host: Host) -> None:
    """Generate the tiny models unless the stamp matches tiny_models.py and all files exist."""
    models = host.comfyui / "models"
    stamp = models / MODELS_STAMP
    wanted = sha256_bytes(TINY_MODELS_SCRIPT.read_bytes(), DEMO_LORA_SCRIPT.read_bytes(), COMFYUI_VERSION.encode())
    if stamp.is_file():
        recorded = json.loads(stamp.read_text())
        if recorded.get("hash") == wanted and all((models / f).is_file() for f in recorded.get("files", [])):
            return
    log("generating tiny models")
    out = run([host.python, TINY_MODELS_SCRIPT, "--comfyui", host.comfyui, "--models-dir", models],
              stdout=subprocess.PIPE, text=True)
    files = json.loads(out.stdout.strip().splitlines()[-1])
    demo = run([host.python, DEMO_LORA_SCRIPT, "--comfyui", host.comfyui], stdout=subprocess.PIPE, text=True)
    files += [os.path.relpath(path, models) for path in json.loads(demo.stdout.strip().splitlines()[-1])]
    stamp.write_text(json.dumps({"hash": wanted, "files": files}, indent=1) + "\n")


TOY_LORA_SOURCES = ("quality.py", "demo_loras.py")


def toy_world_hashes() -> tuple[str, str]:
    """Cache keys: the models' (build.py's recipe hash: their sources and the tiny configs, with
    ComfyUI's version), and the example LoRAs' (the models' key, the scripts that train them and the
    pack's training code)."""
    spec = importlib.util.spec_from_file_location("lw_toy_world_build", TOY_WORLD / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)  # standard library only at import
    models = sha256_bytes(build.recipe_hash().encode(), COMFYUI_VERSION.encode())
    training = sorted((CHECKOUT / "lora_core" / "training").glob("*.py")) + [CHECKOUT / "nodes" / "train_lora.py"]
    loras = sha256_bytes(models.encode(), *((TOY_WORLD / name).read_bytes() for name in TOY_LORA_SOURCES),
                         *(path.read_bytes() for path in training))
    return models, loras


def ensure_toy_world(host: Host) -> None:
    """Train the toy world's models (about 18 minutes on 2 cores) and its example LoRAs (about a
    minute), each unless its stamp matches."""
    models = host.comfyui / "models"
    stamp = models / TOY_WORLD_STAMP
    wanted = dict(zip(("models", "loras"), toy_world_hashes()))
    recorded = json.loads(stamp.read_text()) if stamp.is_file() else {}

    def current(part: str) -> bool:
        entry = recorded.get(part, {})
        return entry.get("hash") == wanted[part] and all((models / f).is_file() for f in entry.get("files", []))

    steps = (("models", "training the toy world's models (about 18 minutes on 2 cores, once; cached until its "
                        "recipe changes)", [TOY_WORLD / "build.py", "--comfyui", host.comfyui, "--models-dir", models,
                                            "--input-dir", host.comfyui / "input"]),
             ("loras", "training the toy world's example LoRAs with Train LoRA (about a minute)",
              [TOY_WORLD / "demo_loras.py", "--comfyui", host.comfyui]))
    for part, message, command in steps:  # the LoRAs' key includes the models': new models, new LoRAs
        if current(part):
            continue
        log(message)
        out = run([host.python, *command], stdout=subprocess.PIPE, text=True)
        recorded[part] = {"hash": wanted[part], "files": json.loads(out.stdout.strip().splitlines()[-1])}
        stamp.write_text(json.dumps(recorded, indent=1) + "\n")


def existing_host() -> Host | None:
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        return None
    root = Path(path).expanduser().resolve()
    if not (root / "main.py").is_file():
        raise HostError(f"COMFYUI_PATH={path} has no main.py")
    python = Path(os.environ.get("LW_PYTHON") or sys.executable)
    return Host(root, python, managed=False)


def install(source: str | None = None) -> Host:
    """Make the host ready (idempotent, fast when nothing changed) and return it."""
    with install_lock():
        host = existing_host()
        if host is None:
            source = source or os.environ.get("LW_COMFYUI_SOURCE") or DEFAULT_SOURCE
            install_comfyui(source, comfyui_dir())
            python = ensure_venv(venv_dir(), comfyui_dir() / "requirements.txt")
            host = Host(comfyui_dir(), python, managed=True)
        custom_nodes = host.comfyui / "custom_nodes"
        ensure_link(custom_nodes / PACK_LINK_NAME, CHECKOUT, host.managed)
        ensure_link(custom_nodes / FIXTURE_LINK_NAME, FIXTURE_PACK, host.managed)
        ensure_models(host)
        ensure_toy_world(host)
    return host


# ---------------------------------------------------------------- commands

def import_in_process(root: Path, dirs: dict, model_folders: dict):
    """Import ComfyUI at `root` in this (host venv) process the way main.py does (--cpu), point its
    folders at `dirs` ("output", "input", "temp", "user") and `model_folders` ({kind: path}, as
    default folders), then load custom nodes with its own loader. Returns (nodes module, event loop).
    Used by the tests (tests/conftest.py) and the benchmarks (benchmarks/lwbench/host.py)."""
    import asyncio
    if "nodes" in sys.modules and not getattr(sys.modules["nodes"], "__file__", "").startswith(str(root)):
        raise HostError(f"a foreign `nodes` module was imported before ComfyUI: {sys.modules['nodes']}")
    sys.path.insert(0, str(root))
    saved_argv = sys.argv
    sys.argv = [saved_argv[0], "--cpu"]  # comfy parses sys.argv at import; without --cpu it wants CUDA
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses the argv above)
    finally:
        sys.argv = saved_argv
    import folder_paths
    import utils.extra_config  # noqa: F401  (before nodes: nodes.py puts comfy/ first, whose utils.py shadows utils/)
    folder_paths.set_output_directory(str(dirs["output"]))
    folder_paths.set_input_directory(str(dirs["input"]))
    folder_paths.set_temp_directory(str(dirs["temp"]))
    folder_paths.set_user_directory(str(dirs["user"]))
    for kind, path in model_folders.items():
        folder_paths.add_model_folder_path(kind, str(path), is_default=True)

    import hook_breaker_ac10a0
    import server

    import nodes  # ComfyUI's nodes.py (its root is sys.path[0]), not this pack's nodes/

    # A PromptServer instance, as under main.py: packs may register routes at import.
    loop = asyncio.new_event_loop()
    server.PromptServer(loop)
    hook_breaker_ac10a0.save_functions()
    loop.run_until_complete(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    hook_breaker_ac10a0.restore_functions()
    return nodes, loop


def host_env(host: Host) -> dict:
    return {**os.environ, "COMFYUI_PATH": str(host.comfyui), "LW_PYTHON": str(host.python)}


def cmd_install(args) -> int:
    host = install(args.source)
    print(f"ComfyUI: {host.comfyui}")
    print(f"python:  {host.python}")
    return 0


def cmd_env(args) -> int:
    host = install(args.source)
    print(f"export COMFYUI_PATH={shlex.quote(str(host.comfyui))}")
    print(f"export LW_PYTHON={shlex.quote(str(host.python))}")
    return 0


BROWSER_TESTS = CHECKOUT / "tests" / "browser"
DEFAULT_CHROMIUM = "/usr/bin/chromium"  # tests/browser/conftest.py's default; LW_CHROMIUM overrides it
CHROMIUM_INSTALL = "apt-get update -qq && apt-get install -y -qq chromium"


def selects_browser_tests(pytest_args: list[str]) -> bool:
    """Whether pytest, run in the checkout with these arguments, collects tests/browser: no path
    arguments (everything is collected) or a path at or above or inside tests/browser."""
    paths = [CHECKOUT / arg.split("::")[0] for arg in pytest_args if not arg.startswith("-")]
    paths = [path.resolve() for path in paths if path.exists()]  # option values such as -k's are not paths
    if not paths:
        return True
    browser = BROWSER_TESTS.resolve()
    return any(path == browser or path in browser.parents or browser in path.parents for path in paths)


def find_chromium() -> str | None:
    explicit = os.environ.get("LW_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    return DEFAULT_CHROMIUM if Path(DEFAULT_CHROMIUM).is_file() else shutil.which("chromium")


def ensure_chromium(env: dict) -> None:
    """The browser tests drive Debian's chromium (never a downloaded one). Install it when missing and
    this runs as root with apt-get, as CI does; otherwise stop, before any test, with the command to run."""
    found = find_chromium()
    if found is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        log(f"the browser tests need Debian's chromium; installing it: {CHROMIUM_INSTALL}")
        apt = run(["sh", "-c", f"{CHROMIUM_INSTALL} >/dev/null"], check=False,
                  env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = find_chromium()
        if found is None:
            log(f"installing chromium failed (exit code {apt.returncode})")
    if found is None:
        where = f"LW_CHROMIUM={os.environ['LW_CHROMIUM']} is not a file; " if os.environ.get("LW_CHROMIUM") else ""
        raise HostError(f"{where}the browser tests (tests/browser) need Debian's chromium. Run:\n"
                        "    sudo apt-get update && sudo apt-get install -y chromium\n"
                        "then this command again (or set LW_CHROMIUM=<chromium binary>).")
    env["LW_CHROMIUM"] = found


def cmd_test(args) -> int:
    host = install(args.source)
    pytest_args = args.pytest_args or ["tests"]
    env = host_env(host)
    if selects_browser_tests(pytest_args):
        ensure_chromium(env)
    log(f"{host.python} -m pytest {' '.join(pytest_args)}")
    code = subprocess.run([str(host.python), "-m", "pytest", *pytest_args], cwd=CHECKOUT, env=env).returncode
    if code == 5:
        log("pytest collected no tests: treated as a failure")
        return 1
    return code


def main_py_command(python, port: int, main_args: list[str]) -> tuple[list[str], str]:
    """ComfyUI's command line for serve and demo: ours first, then the user's main.py options (argparse
    lets a later --port or --listen win), and the URL it will answer on."""
    cmd = [str(python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), *main_args]
    values = {}
    for flag in ("--listen", "--port"):
        for i, arg in enumerate(cmd):
            if arg == flag and i + 1 < len(cmd):
                values[flag] = cmd[i + 1]
            elif arg.startswith(flag + "="):
                values[flag] = arg.split("=", 1)[1]
    listen = values["--listen"].split(",")[0]
    host = "127.0.0.1" if listen in ("0.0.0.0", "::", "") else listen
    return cmd, f"http://{f'[{host}]' if ':' in host else host}:{values['--port']}"


def cmd_serve(args) -> int:
    host = install(args.source)
    cmd, url = main_py_command(host.python, args.port, args.main_args)
    print(f"ComfyUI {COMFYUI_VERSION} from {host.comfyui} on {url}/", flush=True)
    os.chdir(host.comfyui)
    os.execve(cmd[0], cmd, host_env(host))
    return 1  # not reached


DEMO_WORKFLOW = CHECKOUT / "example_workflows" / "train_then_stack.json"


def _wait_for_server(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import urllib.request
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HostError(f"ComfyUI exited with code {proc.returncode} while starting")
        try:
            urllib.request.urlopen(f"{url}/system_stats", timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise HostError(f"ComfyUI did not answer on {url} within {timeout:.0f} s")


def _run_demo_workflow(url: str) -> None:
    """Queue the train-then-stack example once and report what it produced."""
    import urllib.request
    sys.path.insert(0, str(Path(__file__).parent))
    from workflow_to_prompt import convert, fetch_object_info
    prompt = convert(json.loads(DEMO_WORKFLOW.read_text()), fetch_object_info(url))
    request = urllib.request.Request(f"{url}/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                     headers={"Content-Type": "application/json"})
    prompt_id = json.loads(urllib.request.urlopen(request, timeout=60).read())["prompt_id"]
    log(f"queued {DEMO_WORKFLOW.name} (prompt {prompt_id}); open {url} to watch the loss curve")
    while True:
        entry = json.loads(urllib.request.urlopen(f"{url}/history/{prompt_id}", timeout=30).read()).get(prompt_id)
        status = (entry or {}).get("status", {})
        if status.get("completed") or status.get("status_str") == "error":
            break
        time.sleep(1)
    if status.get("status_str") == "error":
        log("the demo workflow failed; see the ComfyUI log above")
        return
    images = [img["filename"] for out in entry["outputs"].values() for img in out.get("images", [])]
    log(f"demo done: {len(images)} images ({', '.join(images[:4])}) in ComfyUI's output folder")


def cmd_demo(args) -> int:
    """The README's first command: host, tiny models, ComfyUI with the pack, the example run once."""
    host = install(args.source)
    cmd, url = main_py_command(host.python, args.port, args.main_args)
    proc = subprocess.Popen(cmd, cwd=host.comfyui, env=host_env(host))
    try:
        _wait_for_server(url, proc)
        print(f"LoRA Workbench demo: ComfyUI is at {url}/  (Ctrl-C stops it)", flush=True)
        if not args.no_run:
            _run_demo_workflow(url)
        return proc.wait()
    except KeyboardInterrupt:
        log("stopping ComfyUI")
        return 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _command_index(argv: list[str]) -> int:
    """Index of the sub-command in argv (after top-level options such as --source GIT)."""
    i = 0
    while argv[i].startswith("-"):
        i += 1 if "=" in argv[i] or argv[i] in ("-h", "--help") else 2
    return i


PASS_THROUGH = ("serve", "demo")  # commands whose unknown options (and those after `--`) go to main.py


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Our options; for serve and demo, ComfyUI's own main.py options after `--` (or any option we do not
    know) land in main_args, e.g. `serve --port 8188 -- --front-end-root DIR`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", help="git URL or local git dir holding ComfyUI "
                        f"{COMFYUI_TAG} (default: $LW_COMFYUI_SOURCE or {DEFAULT_SOURCE})")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="install the host, print ComfyUI path and python").set_defaults(func=cmd_install)
    sub.add_parser("env", help="print shell exports for COMFYUI_PATH and LW_PYTHON").set_defaults(func=cmd_env)
    test = sub.add_parser("test", help="install, then run pytest (default args: tests)")
    test.add_argument("pytest_args", nargs=argparse.REMAINDER)
    test.set_defaults(func=cmd_test)
    serve = sub.add_parser("serve", help="install, then run ComfyUI on 127.0.0.1 (-- MAIN_PY_ARGS: ComfyUI's "
                           "own options)", allow_abbrev=False)
    serve.add_argument("--port", type=int, default=8188)
    serve.set_defaults(func=cmd_serve)
    demo = sub.add_parser("demo", help="install, start ComfyUI with the pack, run the train-then-stack example "
                          "(-- MAIN_PY_ARGS: ComfyUI's own options)", allow_abbrev=False)
    demo.add_argument("--port", type=int, default=8188)
    demo.add_argument("--no-run", action="store_true", help="only start ComfyUI; do not queue the example")
    demo.set_defaults(func=cmd_demo)
    args, extra = parser.parse_known_args(argv)
    if args.command == "test":  # every word after `test` is pytest's, options first or not (-k x, -x)
        args.pytest_args = argv[_command_index(argv) + 1:]
        return args
    if args.command not in PASS_THROUGH:
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args
    if "--" in extra:
        extra.remove("--")  # the first one only: it ends our options
    args.main_args = extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    try:
        code = args.func(args)
    except HostError as err:
        log(f"error: {err}")
        return 2
    except subprocess.CalledProcessError as err:
        log(f"error: command failed ({err.returncode}): {' '.join(map(str, err.cmd))}")
        return 2
    except subprocess.TimeoutExpired as err:
        log(f"error: command timed out after {err.timeout} s: {' '.join(map(str, err.cmd))}\n{source_help()}")
        return 2
    if args.command == "install":
        log(f"done in {time.monotonic() - started:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
