"""Time and peak memory of a forward + backward pass, measured the same way by every benchmark.

Peak memory is the memory above what exists when `measure` is called (the inputs):
- CUDA: torch.cuda.max_memory_allocated() after torch.cuda.reset_peak_memory_stats(), minus the
  allocation at the reset;
- CPU: the process's peak resident set size (VmHWM in /proc/self/status, reset by writing 5 to
  /proc/self/clear_refs) minus its resident size at the reset (torch's CPU allocator returns large
  blocks to the OS, so this is the peak of the tensors alive at once, plus a few MB of noise).
Run each measured function in its own process, so one's allocator state cannot leak into another's.
"""
import statistics
import time

import torch


def rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(step, repeats, device):
    """{seconds: median of `repeats` calls of `step` after one warm-up call, peak_mib: peak memory above
    the current allocation over all calls}. `step` runs forward + backward and drops the gradients."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS: the baseline is the process with its inputs, now
        base = rss_kib("VmRSS") * 1024
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        step()
        sync()
        if i:  # the first call is a warm-up
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss_kib("VmHWM") * 1024
    return {"seconds": statistics.median(times), "peak_mib": (peak - base) / 2**20}
