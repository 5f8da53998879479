"""What the Comfy registry gets: pyproject's [tool.comfy] (an Icon that is a committed square image) and
.comfyignore (tests, benchmarks, screenshots, CI and the host script stay out; the pack stays in).
comfy-cli zips `git ls-files` minus the .comfyignore patterns (gitwildmatch); git applies the same."""
import struct
import subprocess
import tomllib
from urllib.parse import urlparse

from conftest import REPO_ROOT

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _git(*args) -> list[str]:
    out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], check=True, capture_output=True, text=True).stdout
    return sorted(line for line in out.splitlines() if line)


def shipped() -> set[str]:
    tracked = _git("ls-files", "--cached")
    ignored = set(_git("ls-files", "--cached", "--ignored", "--exclude-from=.comfyignore"))
    return {path for path in tracked if path not in ignored}


def test_icon_is_a_url_to_a_committed_small_square_png():
    comfy = PYPROJECT["tool"]["comfy"]
    url = urlparse(comfy["Icon"])
    repository = urlparse(PYPROJECT["project"]["urls"]["Repository"]).path.strip("/")  # owner/name
    assert url.scheme == "https" and url.netloc == "raw.githubusercontent.com"
    parts = url.path.strip("/").split("/")
    owner_name, branch, path = "/".join(parts[:2]), parts[2], "/".join(parts[3:])
    assert owner_name == repository and branch == "main" and path == "docs/icon.png"
    assert path in _git("ls-files", "--cached"), f"{path} is not committed"
    data = (REPO_ROOT / path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width == height and 128 <= width <= 512 and len(data) < 64 * 1024
    assert comfy["PublisherId"] and comfy["DisplayName"] == "LoRA Workbench"


def test_comfyignore_keeps_development_files_out_of_the_registry_package():
    files = shipped()
    left_out = ("tests/", "benchmarks/", "docs/screenshots/", ".ci/", "scripts/")
    assert not [f for f in files if f.startswith(left_out)]
    assert any(f.startswith("tests/") for f in _git("ls-files", "--cached"))  # they exist, and are left out
    assert any(f.startswith("benchmarks/results/") for f in _git("ls-files", "--cached"))
    assert any(f.startswith("docs/screenshots/") for f in _git("ls-files", "--cached"))


def test_the_pack_itself_is_shipped_whole():
    files = shipped()
    for needed in ("__init__.py", "pyproject.toml", "README.md", "LICENSE", "docs/icon.png",
                   "nodes/__init__.py", "nodes/input_checks.py", "lora_core/__init__.py",
                   "lora_core/training/__init__.py", "web/lw_common.js", "example_workflows/load_lora.json"):
        assert needed in files, f"{needed} would not be shipped"
    tracked = _git("ls-files", "--cached")
    for folder in ("nodes/", "lora_core/", "web/", "example_workflows/"):
        assert {f for f in tracked if f.startswith(folder)} <= files, f"part of {folder} would not be shipped"
