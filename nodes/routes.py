"""HTTP routes of the pack, under /lora_workbench/ (ComfyUI mirrors them under /api/lora_workbench/).

GET /lora_workbench/info?name=<lora name as the UI lists it>
    What a LoRA file says about itself, read from its safetensors header only (no tensor is
    loaded): trigger words, base model family, rank/alpha, scope, provenance.
    200 {name, title, trigger_words, family, base_model, architecture, rank, ranks, alpha,
         scope, provenance, modules, tensors, size_bytes}
    400 {error}  no name, or a name that leaves the loras folders ('../x', absolute paths)
    404 {error}  no such file in the loras folders
    422 {error}  the file is not a readable safetensors LoRA (pickle, truncated, bad header)

register_routes() is called once when the pack is imported; without a running PromptServer
(library use, some tests) it does nothing and returns False.
"""
from __future__ import annotations

import asyncio
import logging
import os

from ..lora_core.errors import LoRAError, LoRAFileError, LoRAFileNotFoundError, UnsafePathError
from ..lora_core.formats import split_key
from ..lora_core.formats.families import guess_family
from ..lora_core.formats.metadata import read_info
from ..lora_core.formats.safetensors_io import read_header

PREFIX = "/lora_workbench"
_registered = False


def lora_info(name: str) -> dict:
    """The info dict for a LoRA name; raises UnsafePathError / LoRAFileError (see module doc)."""
    from .lora_files import lora_path  # imports folder_paths: only inside a ComfyUI process

    if "\x00" in name:
        raise UnsafePathError(f"'{name}': file names may not contain NUL characters.")
    path = lora_path(name)  # UnsafePathError for names leaving the folder, LoRAFileError when missing
    index, metadata = read_header(path)
    info = read_info(metadata)
    prefixes, ranks = set(), set()
    for key, entry in index.items():
        split = split_key(key)
        prefixes.add(split[0] if split else key.rsplit(".", 1)[0])
        shape = entry.get("shape") or []
        if split and len(shape) >= 2 and split[1] == "down":
            ranks.add(int(shape[0]))
        elif split and len(shape) >= 2 and split[1] == "up":
            ranks.add(int(shape[1]))
    rank = info.network_dim or (str(max(ranks)) if ranks else None)
    return {
        "name": name,
        "title": info.title,
        "trigger_words": info.trigger_words,
        "family": guess_family(sorted(prefixes), metadata),
        "base_model": info.base_model,
        "architecture": info.architecture,
        "rank": rank,
        "ranks": sorted(ranks),
        "alpha": info.network_alpha,
        "scope": info.scope,
        "provenance": info.provenance,
        "modules": len(prefixes),
        "tensors": len(index),
        "size_bytes": os.path.getsize(path),
    }


# Most specific first: an error's class, never its wording, says which answer it gets.
STATUS_OF_ERROR = ((UnsafePathError, 400), (LoRAFileNotFoundError, 404), (LoRAFileError, 422), (LoRAError, 422))


def _status_of(error: LoRAError) -> int:
    return next(status for cls, status in STATUS_OF_ERROR if isinstance(error, cls))


def _error(web, status: int, message: str):
    return web.json_response({"error": message}, status=status)


async def info_handler(request):
    from aiohttp import web

    name = request.query.get("name", "")
    if not name:
        return _error(web, 400, "give the LoRA file name: /lora_workbench/info?name=<file in models/loras>")
    try:
        return web.json_response(await asyncio.to_thread(lora_info, name))
    except LoRAError as e:
        return _error(web, _status_of(e), str(e))
    except Exception as e:  # a header we cannot make sense of must not become a 500 without a message
        logging.exception("LoRA Workbench: info for %r failed", name)
        return _error(web, 422, f"'{name}': cannot read its header ({type(e).__name__}: {e})")


def register_routes() -> bool:
    """Add the pack's routes to ComfyUI's server; harmless (False) without one, idempotent."""
    global _registered
    if _registered:
        return True
    try:
        from server import PromptServer
        routes = PromptServer.instance.routes
    except (ImportError, AttributeError):
        return False
    routes.get(f"{PREFIX}/info")(info_handler)
    _registered = True
    return True
