"""lw_test_fixture: test/demo-only ComfyUI custom node "pack" (never shipped with LoRA Workbench).

scripts/comfy_host.py links it into the test host's custom_nodes. At import it registers the
tiny model configs of ../tiny_models.py with ComfyUI's model detection, so the tiny checkpoints
load through core loaders (CheckpointLoaderSimple, UNETLoader). It defines no nodes.
"""
import importlib.util
import os
import sys

_MODULE_NAME = "lw_tiny_models"


def _load_tiny_models():
    # ComfyUI imports this file through a symlink: resolve it to find the sibling module.
    # One module object per process, however many times ComfyUI or pytest imports us.
    if _MODULE_NAME in sys.modules:
        return sys.modules[_MODULE_NAME]
    here = os.path.dirname(os.path.realpath(__file__))
    path = os.path.join(os.path.dirname(here), "tiny_models.py")
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module


_load_tiny_models().register()

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
