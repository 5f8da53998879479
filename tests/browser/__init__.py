# A package, so that pytest (importlib mode) imports tests/browser/conftest.py as `browser.conftest`.
# Without it both conftest files resolve to the module name `conftest`, tests/conftest.py ends up
# imported twice, and `from conftest import PromptError` in tests/host no longer matches the class
# the comfy_host fixture raises.
