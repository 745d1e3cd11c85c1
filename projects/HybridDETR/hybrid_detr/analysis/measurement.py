"""Measuring a piece of work on a device: waiting for it to finish, and the memory it takes.

- `synchronize(device)`: waits for the queued GPU work (a no-op on the CPU), so that a host timer
  around a call covers the call.
- Resident memory of a process (Linux, `/proc/PID/status`): `peak_rss_bytes` (VmHWM, the peak so
  far), `rss_bytes` (VmRSS, now) and `reset_peak_rss` (VmHWM back to VmRSS). VmHWM rather than
  `getrusage`'s ru_maxrss: Linux carries ru_maxrss across exec, so a process started by a big parent
  would report the parent's peak, and wait4's figure of a child counts the parent's memory before the exec.
- `PeakMemory(device)`: the extra peak memory of a block over what was in use before it (CUDA: the
  caching allocator's peak of allocated bytes; CPU: the peak resident memory, every page touched).
"""
import torch

__all__ = ["synchronize", "peak_rss_bytes", "rss_bytes", "reset_peak_rss", "PeakMemory"]


def synchronize(device) -> None:
    """Waits until the work queued on `device` (a torch.device or its name) is done; a no-op on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _process_bytes(field: str, pid) -> int:
    """A memory field of /proc/PID/status in bytes. Another process's is 0 once it is gone (an exited
    process not yet reaped has no memory fields); this process's is always there, or an error."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        if pid == "self":
            raise
        return 0
    if pid == "self":
        raise RuntimeError(f"{field} not in /proc/self/status")
    return 0


def peak_rss_bytes(pid="self") -> int:
    """The process's peak resident memory so far (VmHWM), in bytes; 0 for a process that is gone."""
    return _process_bytes("VmHWM", pid)


def rss_bytes(pid="self") -> int:
    """The process's resident memory now (VmRSS), in bytes; 0 for a process that is gone."""
    return _process_bytes("VmRSS", pid)


def reset_peak_rss() -> bool:
    """Resets this process's VmHWM to its current RSS (Linux >= 4.0); False when not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """`with PeakMemory(device) as memory: ...`, then `memory.bytes`: the block's peak memory above
    what was in use when it began.

    CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, minus what was allocated
    before (the device is synchronised on entry and exit). CPU: the peak resident memory (VmHWM, reset
    on entry) minus the resident memory on entry; it counts every page the block touched (torch's
    allocations and the allocator's overhead), not only live tensors. Where VmHWM cannot be reset,
    the peak so far is the baseline, which may under-count.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.bytes = 0

    def __enter__(self):
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = rss_bytes() if reset_peak_rss() else peak_rss_bytes()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = peak_rss_bytes()
        self.bytes = max(0, peak - self._base)
        return False
