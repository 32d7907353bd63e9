"""Timing and peak-memory helpers shared by the scripts in benchmarks/."""
import gc
import time

import torch


class PeakMemory:
    """Peak extra bytes allocated inside the block (CUDA allocator, or process RSS on CPU)."""

    def __init__(self, device):
        self.device = device
        self.peak = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = _reset_rss_peak()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        elif self.start is not None:
            self.peak = max(0, _proc_status_kib("VmHWM") - self.start) * 1024


def _proc_status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_rss_peak():
    """Reset VmHWM to the current RSS and return it in KiB (None where Linux does not allow it)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_kib("VmRSS")
    except OSError:
        return None


def measure(fn, device, repeats):
    """(median seconds, peak extra bytes) of fn(); one warm-up run first."""
    fn()
    with PeakMemory(device) as mem:
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], mem.peak


def matmul_flops(device, dtype=torch.float32, size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a square matmul here (median of `repeats`): the attainable peak that CPU MFU is measured against."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds, _ = measure(lambda: a @ b, device, repeats)
    return 2 * size**3 / seconds


def read_rate(fn, batches, tokens_per_item: int, min_seconds: float, bytes_per_token: int = 2) -> tuple[float, float]:
    """(items/s, GB/s of tokens read) of calling fn(batch) over `batches` until min_seconds have passed
    (the loader benchmarks: one warm-up call, then whole passes over the batches)."""
    fn(batches[0])
    done, start = 0, time.perf_counter()
    while True:
        for batch in batches:
            fn(batch)
            done += len(batch)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            break
    return done / elapsed, done * tokens_per_item * bytes_per_token / elapsed / 1e9
