"""File names from the UI must stay inside the folder they name."""
from __future__ import annotations

import os

from .errors import UnsafePathError


def safe_join(folder: str, name: str) -> str:
    """Join `name` under `folder`, refusing absolute names and any that climb out of it."""
    if not name or os.path.isabs(name) or name.startswith(("/", "\\")) or ":" in name[:3]:
        raise UnsafePathError(f"'{name}': give a file name relative to the folder {folder}, not an absolute path.")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise UnsafePathError(f"'{name}': names may not contain '..'; pick a file inside {folder}.")
    root = os.path.abspath(folder)
    full = os.path.abspath(os.path.join(root, *parts))
    if os.path.commonpath([root, full]) != root:
        raise UnsafePathError(f"'{name}' resolves outside {folder}.")
    return full
