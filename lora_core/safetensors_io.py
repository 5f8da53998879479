"""Reading and writing LoRA files: safetensors only, never pickle, always atomic writes."""
from __future__ import annotations

import json
import os
import secrets
import stat
import struct

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import LoRAFileError

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
# A safetensors header is 8 little-endian bytes of length, then JSON; anything huge is corrupt.
MAX_HEADER_BYTES = 100 * 1024 * 1024


def _refuse_pickle(path: str, head: bytes) -> None:
    """Called only for files that are not safetensors: say so kindly if they look like torch.save output."""
    looks_pickled = head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))
    if path.lower().endswith(PICKLE_SUFFIXES) or looks_pickled:
        raise LoRAFileError(
            f"{os.path.basename(path)}: pickle-based checkpoints are refused because loading them can run "
            "arbitrary code. Convert it to .safetensors first (for example with kohya's or diffusers' "
            "conversion scripts, on a machine you trust)."
        )


def read_header(path: str) -> tuple[dict, dict]:
    """Return (tensor index, metadata) of a safetensors file, checking its framing."""
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(9)
            # safetensors: 8 bytes of header length, then a JSON object. Checked before any pickle
            # sniffing, because a valid length can itself start with the byte pickle starts with.
            header_len = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else None
            if header_len is None or head[8:9] != b"{":
                _refuse_pickle(path, head)
                if header_len is None:
                    raise LoRAFileError(f"{name}: file is {size} bytes, too short to be safetensors (truncated?).")
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise LoRAFileError(f"{name}: header length {header_len} does not fit a {size}-byte file; "
                                    "the file is not safetensors or is truncated. Download it again.")
            f.seek(8)
            header = json.loads(f.read(header_len))
    except FileNotFoundError as e:
        raise LoRAFileError(f"{name}: file not found at {path}.") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoRAFileError(f"{name}: safetensors header is not valid JSON ({e}); the file is corrupt.") from e
    metadata = header.pop("__metadata__", None) or {}
    data_end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + header_len + data_end > size:
        raise LoRAFileError(f"{name}: file is {size} bytes but its header describes {8 + header_len + data_end}; "
                            "it is truncated. Download or save it again.")
    return header, {str(k): str(v) for k, v in metadata.items()}


def read_lora_file(path: str, check_finite: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load all tensors and the metadata of a LoRA safetensors file."""
    _, metadata = read_header(path)
    name = os.path.basename(path)
    try:
        tensors = load_file(path, device="cpu")
    except (SafetensorError, OSError, RuntimeError) as e:
        raise LoRAFileError(f"{name}: cannot read safetensors data ({e}).") from e
    if not tensors:
        raise LoRAFileError(f"{name}: the file holds no tensors.")
    if check_finite:
        for key, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise LoRAFileError(f"{name}: tensor '{key}' contains NaN or inf values; the LoRA is broken "
                                    "(often a training run that diverged). Use an earlier save.")
    return tensors, metadata


def _create_part_file(folder: str) -> tuple[str, int]:
    """A new, empty temporary file in `folder` and the permission bits a normal save gives a new file
    there: created with mode 0666, to which the kernel applies the process umask (and a default ACL of
    the folder). tempfile.mkstemp would give 0600, and so does safetensors' save_file (0.8)."""
    while True:
        tmp = os.path.join(folder, f".lw-{secrets.token_hex(8)}.safetensors.part")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666))
        except FileExistsError:
            continue
        return tmp, stat.S_IMODE(os.stat(tmp).st_mode)


def write_lora_file(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write safetensors atomically: a crash or interrupt never leaves a half-written file at `path`.
    The file gets the permissions any other saved file gets (0666 & ~umask), not a temp file's 0600."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp, mode = _create_part_file(folder)
    try:
        contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(contiguous, tmp, metadata={str(k): str(v) for k, v in metadata.items()})
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
