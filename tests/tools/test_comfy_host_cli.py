"""scripts/comfy_host.py's command line: serve/demo pass ComfyUI's own options through to main.py, the
test command hands every word to pytest and gets Debian's chromium for the browser tests (or stops first)."""
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import REPO_ROOT, comfy_host_script, free_port

script = comfy_host_script()


@pytest.mark.parametrize("argv, port, main_args", [
    (["serve", "--port", "8188", "--", "--front-end-root", "DIR"], 8188, ["--front-end-root", "DIR"]),
    (["serve", "--", "--front-end-root", "DIR", "--verbose", "DEBUG"], 8188,
     ["--front-end-root", "DIR", "--verbose", "DEBUG"]),
    (["serve", "--front-end-root", "DIR", "--port", "9001"], 9001, ["--front-end-root", "DIR"]),
    (["serve", "--port", "9001"], 9001, []),
    (["--source", "/src", "demo", "--no-run", "--port", "9002", "--", "--front-end-root", "D"], 9002,
     ["--front-end-root", "D"]),
    (["demo", "--", "--port", "9003"], 8188, ["--port", "9003"]),
])
def test_serve_and_demo_pass_comfyui_options_through(argv, port, main_args):
    args = script.parse_args(argv)
    assert (args.port, args.main_args) == (port, main_args)
    cmd, _ = script.main_py_command("/venv/python", args.port, args.main_args)
    assert cmd[:7] == ["/venv/python", "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port)]
    assert cmd[7:] == main_args  # after ours, so ComfyUI's argparse lets them win


def test_main_py_command_reports_the_address_comfyui_answers_on():
    assert script.main_py_command("py", 8188, [])[1] == "http://127.0.0.1:8188"
    assert script.main_py_command("py", 8188, ["--port", "9000"])[1] == "http://127.0.0.1:9000"
    assert script.main_py_command("py", 8188, ["--port=9001", "--listen", "0.0.0.0"])[1] == "http://127.0.0.1:9001"
    assert script.main_py_command("py", 1, ["--listen", "10.0.0.2,127.0.0.1"])[1] == "http://10.0.0.2:1"


def test_unknown_options_of_other_commands_are_still_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["install", "--front-end-root", "DIR"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --front-end-root DIR" in capsys.readouterr().err


@pytest.mark.parametrize("argv, pytest_args", [
    (["test"], []),
    (["test", "tests/core", "-x", "-q"], ["tests/core", "-x", "-q"]),
    (["test", "-x", "tests/core"], ["-x", "tests/core"]),
    (["--source", "/src", "test", "-k", "nan and not slow"], ["-k", "nan and not slow"]),
    (["--source=/src", "test", "--", "-k"], ["--", "-k"]),
])
def test_test_hands_every_word_to_pytest(argv, pytest_args):
    assert script.parse_args(argv).pytest_args == pytest_args


@pytest.mark.parametrize("pytest_args, browser", [
    (["tests"], True), ([], True), (["-x", "-q"], True), (["-k", "editor"], True),
    (["tests/browser"], True), (["tests/browser/test_editor.py::test_node_search_finds_and_adds_our_four_nodes"], True),
    (["tests/core", "tests/http", "-x"], False), (["tests/core/test_merging.py", "-k", "svd"], False),
])
def test_browser_tests_are_recognised_in_the_pytest_arguments(pytest_args, browser):
    assert script.selects_browser_tests(pytest_args) is browser


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, cmd, **kwargs):
        self.calls.append([str(c) for c in cmd])
        return subprocess.CompletedProcess(cmd, 0)


@pytest.fixture
def fake_host(monkeypatch, tmp_path):
    """cmd_test with install() and the pytest subprocess replaced: records what would run."""
    host = script.Host(tmp_path, tmp_path / "python", managed=True)
    monkeypatch.setattr(script, "install", lambda source=None: host)
    pytest_runs = _Recorder()
    monkeypatch.setattr(script.subprocess, "run", pytest_runs)
    monkeypatch.delenv("LW_CHROMIUM", raising=False)
    return pytest_runs


def test_without_chromium_and_root_the_test_command_stops_before_any_test_with_the_command(monkeypatch, fake_host):
    monkeypatch.setattr(script, "find_chromium", lambda: None)
    monkeypatch.setattr(script.os, "geteuid", lambda: 1000)
    with pytest.raises(script.HostError, match=r"(?s)need Debian's chromium. Run:\n"
                                               r" +sudo apt-get update && sudo apt-get install -y chromium\n"):
        script.cmd_test(script.parse_args(["test"]))
    assert fake_host.calls == []  # pytest never started
    # the command line says it and exits 2
    assert script.main(["test", "tests/browser"]) == 2 and fake_host.calls == []
    # tests that need no browser run without it
    assert script.cmd_test(script.parse_args(["test", "tests/core", "-q"])) == 0
    assert fake_host.calls == [[str(script.install().python), "-m", "pytest", "tests/core", "-q"]]


def test_as_root_the_test_command_installs_chromium_with_apt_then_runs_pytest(monkeypatch, fake_host):
    installed = []
    monkeypatch.setattr(script, "find_chromium", lambda: "/usr/bin/chromium" if installed else None)
    monkeypatch.setattr(script.os, "geteuid", lambda: 0)
    monkeypatch.setattr(script.shutil, "which", lambda name: f"/usr/bin/{name}")

    def apt(cmd, **kwargs):
        installed.append(cmd)
        assert kwargs["env"]["DEBIAN_FRONTEND"] == "noninteractive"
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(script, "run", apt)
    assert script.cmd_test(script.parse_args(["test"])) == 0
    assert installed == [["sh", "-c", "apt-get update -qq && apt-get install -y -qq chromium >/dev/null"]]
    assert fake_host.calls[0][-3:] == ["-m", "pytest", "tests"]


def test_a_chromium_elsewhere_on_path_is_handed_to_the_browser_tests(monkeypatch, fake_host):
    seen = {}
    monkeypatch.setattr(script, "find_chromium", lambda: "/opt/chromium/chromium")

    def pytest_run(cmd, **kwargs):
        seen.update(kwargs["env"])
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(script.subprocess, "run", pytest_run)
    assert script.cmd_test(script.parse_args(["test", "tests/browser"])) == 0
    assert seen["LW_CHROMIUM"] == "/opt/chromium/chromium"


def test_serve_starts_comfyui_with_a_front_end_root_given_after_dashes(host_install, tmp_path):
    """A real start: ComfyUI serves the index.html of the --front-end-root passed through serve."""
    front = tmp_path / "front"
    front.mkdir()
    (front / "index.html").write_text("<html><body>lw-front-end-probe</body></html>")
    for name in ("user", "output", "input"):
        (tmp_path / name).mkdir()
    port = free_port()
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "comfy_host.py"), "serve", "--port", str(port), "--",
           "--front-end-root", str(front), "--disable-api-nodes", "--database-url", "sqlite:///:memory:",
           "--user-directory", str(tmp_path / "user"), "--output-directory", str(tmp_path / "output"),
           "--input-directory", str(tmp_path / "input"), "--temp-directory", str(tmp_path)]
    log_path = tmp_path / "serve.log"
    env = {**os.environ, "COMFYUI_PATH": str(host_install.comfyui), "LW_PYTHON": str(host_install.python)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline, page = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                    page = response.read().decode()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        assert page is not None, f"serve exited with {proc.poll()} or did not answer:\n{log_path.read_text()[-3000:]}"
        assert "lw-front-end-probe" in page
        assert f"on http://127.0.0.1:{port}/" in log_path.read_text()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
