"""Timing, peak memory, statistics and the machine's own limits (GEMM rate, copy bandwidth)."""
from __future__ import annotations

import ctypes
import gc
import os
import platform
import statistics
import threading
import time
from contextlib import contextmanager

import torch

_CLEAR_REFS = "/proc/self/clear_refs"
try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    _LIBC = None


def settle(trim: bool = True) -> None:
    """Collect garbage; with trim, also hand freed heap back to the OS so RSS baselines are comparable."""
    gc.collect()
    if trim and _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    import psutil
    return psutil.Process().memory_info().rss


def _can_reset_peak() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return _status_kb("VmHWM") is not None
    except OSError:
        return False


class PeakRSS:
    """Peak resident memory above the starting RSS while the block runs.

    Linux: the kernel's own high-water mark (VmHWM), reset through /proc/self/clear_refs (exact,
    no overhead). Elsewhere: a thread sampling RSS every 2 ms.
    """
    exact = _can_reset_peak()

    def __init__(self):
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        self.start = _rss_bytes()
        self.peak = self.start
        if self.exact:
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.exact:
            self.peak = max(self.peak, (_status_kb("VmHWM") or 0) * 1024)
        else:
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        return False

    @property
    def delta(self) -> int:
        return self.peak - self.start


@contextmanager
def timed(out: dict, key: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        out[key] = time.perf_counter() - t0


def stats(values: list[float]) -> dict:
    if not values:
        return {"median": None, "min": None, "n": 0, "values": []}
    return {"median": statistics.median(values), "min": min(values), "n": len(values),
            "values": [round(v, 6) for v in values]}


# ---------------------------------------------------------------- the machine

def machine() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        cpu = platform.processor() or "unknown"
    mem = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "ram_gb": round(mem / 2**30, 1) if mem else None, "avx512": "avx512f" in flags,
            "avx2": "avx2" in flags, "torch": torch.__version__, "python": platform.python_version(),
            "os": f"{platform.system()} {platform.release()}", "load_avg_at_start": os.getloadavg()}


def gemm_rate(n: int = 2048, reps: int = 5) -> dict:
    """fp32 GFLOP/s of a large square matmul (the best the BLAS does here), median of reps."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - t0)
    flops = 2.0 * n ** 3
    return {"shape": f"{n}x{n} @ {n}x{n}", "gflops": flops / statistics.median(times) / 1e9,
            "gflops_best": flops / min(times) / 1e9}


def lowrank_addmm_rate(out_f: int = 1280, in_f: int = 1280, rank: int = 96, reps: int = 7) -> dict:
    """GFLOP/s of the patch-shaped product W += U @ D (U: out x R, D: R x in), fp32."""
    w, u, d = torch.randn(out_f, in_f), torch.randn(out_f, rank), torch.randn(rank, in_f)
    w.addmm_(u, d)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        w.addmm_(u, d)
        times.append(time.perf_counter() - t0)
    return {"shape": f"{out_f}x{in_f} += {out_f}x{rank} @ {rank}x{in_f}",
            "gflops": 2.0 * out_f * in_f * rank / statistics.median(times) / 1e9}


def copy_bandwidth(mib: int = 512, reps: int = 5) -> dict:
    """GB/s of dst.copy_(src) counting read + write, fp32, buffers far larger than any cache."""
    n = mib * 2**20 // 4
    src, dst = torch.randn(n), torch.empty(n)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    moved = 2.0 * n * 4
    return {"buffer_mib": mib, "gbps": moved / statistics.median(times) / 1e9,
            "gbps_best": moved / min(times) / 1e9}


# ---------------------------------------------------------------- a shared machine

def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields), idle


def others_busy(window: float = 0.3) -> float | None:
    """Fraction of all CPUs busy over a short window while this process idles (i.e. other load)."""
    a = _cpu_times()
    time.sleep(window)
    b = _cpu_times()
    if a is None or b is None or b[0] == a[0]:
        return None
    return 1.0 - (b[1] - a[1]) / (b[0] - a[0])


class QuietGate:
    """Before a repetition, wait (a bounded time) while other processes keep more than `limit` of the CPUs
    busy: on a shared machine this keeps most repetitions out of others' bursts. Waits are recorded."""

    def __init__(self, limit: float = 0.5, max_wait: float = 15.0, budget: float = 180.0, enabled: bool = True):
        self.limit, self.max_wait, self.budget, self.enabled = limit, max_wait, budget, enabled
        self.waited = 0.0
        self.samples: list[float] = []

    def __call__(self) -> float | None:
        if not self.enabled:
            return None
        start = time.perf_counter()
        busy = others_busy()
        while (busy is not None and busy > self.limit and time.perf_counter() - start < self.max_wait
               and self.waited + time.perf_counter() - start < self.budget):
            time.sleep(0.7)
            busy = others_busy()
        self.waited += time.perf_counter() - start
        if busy is not None:
            self.samples.append(busy)
        return busy

    def summary(self) -> dict:
        s = sorted(self.samples)
        return {"limit": self.limit, "waited_s": round(self.waited, 1), "reps_gated": len(s),
                "others_busy_median": s[len(s) // 2] if s else None, "others_busy_max": s[-1] if s else None}


class PatchBreakdown:
    """Where ComfyUI's weight patching spends its time, by wrapping two of its functions meanwhile:
    `copy`: comfy.model_management.cast_to_device, the fresh copy of each weight ComfyUI makes before
    any patch runs (core's cost, paid the same by every LoRA implementation); `math`:
    comfy.lora.calculate_weight, the LoRA arithmetic itself (ours or core's). The rest is ComfyUI's
    bookkeeping (backups, setting parameters, walking modules)."""

    def __init__(self):
        self.copy = self.math = 0.0

    def __enter__(self):
        import comfy.lora
        import comfy.model_management as mm
        self._saved = [(mm, "cast_to_device", mm.cast_to_device),
                       (comfy.lora, "calculate_weight", comfy.lora.calculate_weight)]
        for module, name, fn in self._saved:
            setattr(module, name, self._timed(fn, "copy" if name == "cast_to_device" else "math"))
        return self

    def _timed(self, fn, field: str):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                setattr(self, field, getattr(self, field) + time.perf_counter() - t0)
        return timed

    def __exit__(self, *exc):
        for module, name, fn in self._saved:
            setattr(module, name, fn)
