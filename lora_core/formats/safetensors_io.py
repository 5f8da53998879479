"""Reading and writing LoRA files: safetensors only, never pickle, always atomic writes.

Files are written byte for byte the same for the same tensors and metadata: the header's keys are
sorted (safetensors' own writer keeps metadata in a hash map, whose order changes from process to
process), tensors are laid out as safetensors lays them out (largest dtype first, then by name).
A file's identity that survives renaming and re-tagging is `data_sha256`: the sha256 of the bytes
after the header, the tensor data alone, as model sites compute it.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
import struct

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import LoRAFileError, LoRAFileNotFoundError

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
        raise LoRAFileNotFoundError(f"{name}: file not found at {path}.") from e
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
        broken = first_non_finite(tensors)
        if broken is not None:
            raise LoRAFileError(f"{name}: tensor '{broken}' contains NaN or inf values; the LoRA is broken "
                                "(often a training run that diverged). Use an earlier save.")
    return tensors, metadata


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """A key whose tensor holds NaN or inf, else None. All tensors of a dtype are checked in one pass (a
    per-tensor check costs more than the file's data for a thousand small factors); only a broken file
    is searched tensor by tensor."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for key, t in tensors.items():
        if t.is_floating_point():
            by_dtype.setdefault(t.dtype, []).append(key)
    for keys in by_dtype.values():
        if not _all_finite(torch.cat([tensors[k].reshape(-1) for k in keys])):
            return next(k for k in keys if not bool(torch.isfinite(tensors[k]).all()))
    return None


def _all_finite(flat: torch.Tensor) -> bool:
    if flat.dtype == torch.float16:
        # NaN and inf survive a sum, and no sum of finite fp16 values (|x| <= 65504) overflows fp32: one
        # reduction instead of torch.isfinite, which is ~3x slower on fp16 (no vector path on CPU)
        return bool(torch.isfinite(flat.sum(dtype=torch.float32)))
    return bool(torch.isfinite(flat).all())


def _create_part_file(folder: str) -> tuple[str, int]:
    """A new, empty temporary file in `folder` and the permission bits a normal save gives a new file
    there: created with mode 0666, to which the kernel applies the process umask (and a default ACL of
    the folder). tempfile.mkstemp would give 0600, and so does safetensors' own save_file (0.8)."""
    while True:
        tmp = os.path.join(folder, f".lw-{secrets.token_hex(8)}.safetensors.part")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666))
        except FileExistsError:
            continue
        return tmp, stat.S_IMODE(os.stat(tmp).st_mode)


_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> tuple[bytes, list[bytes]]:
    """(8-byte length + header, data chunks) of a safetensors file, the same bytes for the same input:
    header keys sorted, data laid out by (dtype size descending, name) as safetensors does."""
    for key, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise ValueError(f"tensor '{key}': dtype {t.dtype} cannot be written to safetensors")
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    entries, chunks, offset = {}, [], 0
    for key in order:
        data = _tensor_bytes(tensors[key])
        entries[key] = {"dtype": _DTYPES[tensors[key].dtype], "shape": list(tensors[key].shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(metadata[k]) for k in sorted(metadata, key=str)}
    header.update((k, entries[k]) for k in sorted(entries))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes so tensor data stays aligned
    return struct.pack("<Q", len(text)) + text, chunks


def data_sha256(path: str) -> str:
    """sha256 of a safetensors file's tensor data: the bytes after its header. Renaming the file or
    changing its metadata keeps it; model sites identify files the same way."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoRAFileError(f"{os.path.basename(path)}: too short to be safetensors.")
        f.seek(8 + struct.unpack("<Q", head)[0])
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensors_data_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """data_sha256 of the file these tensors would be written to (whatever its metadata)."""
    h = hashlib.sha256()
    for chunk in serialize(tensors, None)[1]:
        h.update(chunk)
    return h.hexdigest()


def save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str] | None = None) -> None:
    """safetensors.torch.save_file's signature, writing `serialize`'s reproducible bytes."""
    head, chunks = serialize(tensors, metadata)
    with open(filename, "wb") as f:
        f.write(head)
        for chunk in chunks:
            f.write(chunk)


def write_lora_file(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write safetensors atomically: a crash or interrupt never leaves a half-written file at `path`.
    The file gets the permissions any other saved file gets (0666 & ~umask), not a temp file's 0600.
    The same tensors and metadata give the same bytes (see `serialize`)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp, mode = _create_part_file(folder)
    try:
        save_file(tensors, tmp, metadata={str(k): str(v) for k, v in metadata.items()})
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
