"""Host memory of one measurement: the process's resident set size (RSS), sampled while it runs.

Used where the device does not count its own bytes: JAX on CPU (`memory_stats()` is None) and
PyTorch on CPU. Imports neither framework, so both benchmark processes share it.
"""

import os
import resource
import sys
import threading

_PAGE_BYTES = os.sysconf('SC_PAGE_SIZE') if hasattr(os, 'sysconf') else 4096


def rss_bytes() -> int | None:
    """The current resident set size of this process in bytes (Linux), else None."""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * _PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return None


def max_rss_bytes() -> int:
    """`getrusage`'s peak RSS of this process since it started, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == 'darwin' else peak * 1024  # Linux reports KiB


class HostRssPeak:
    """Context manager: the highest RSS seen while the block runs, sampled every `interval_s`.

    `getrusage` alone gives the high-water mark since the process started, so every later
    measurement would inherit the largest earlier one; sampling gives each its own peak.

    Attributes (after the block):
        peak_bytes: the highest sampled RSS (bytes), or getrusage's peak where /proc is absent.
        max_rss_bytes: getrusage's peak since process start, at the end of the block.
    """

    def __init__(self, interval_s: float = 0.01):
        self.interval_s = interval_s
        self.peak_bytes: int | None = None
        self.max_rss_bytes: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _sample(self) -> None:
        rss = rss_bytes()
        if rss is not None:
            self.peak_bytes = max(self.peak_bytes or 0, rss)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> 'HostRssPeak':
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.max_rss_bytes = max_rss_bytes()
        if self.peak_bytes is None:
            self.peak_bytes = self.max_rss_bytes

    def as_dict(self) -> dict:
        """The JSON record: {'kind': 'host_rss', 'peak_bytes', 'max_rss_since_start_bytes'}."""
        return {
            'kind': 'host_rss',
            'peak_bytes': self.peak_bytes,
            'max_rss_since_start_bytes': self.max_rss_bytes,
        }
