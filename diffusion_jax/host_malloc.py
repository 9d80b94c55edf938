"""glibc malloc settings that keep XLA:CPU's freed buffers for the next step (speed; Linux).

XLA:CPU allocates every execution's temporary buffers and outputs with `malloc` and frees them
when it ends. With glibc's defaults much of that memory goes back to the kernel at once:
blocks above the mmap threshold are unmapped, and the worker threads' arenas shrink or are
deleted when they empty. So each train step faults its working set back in page by page: about
9,000 page faults per step of the digits network, a sixth of the README's first command's CPU
time spent in the kernel (165 of 1,076 s), and a train step of 62 ms instead of 52 to 56 ms
(BENCHMARKS.md, "Why the CPU train step was slow").

`keep_freed_memory` raises two of glibc's thresholds with `mallopt`: blocks of up to
`MMAP_THRESHOLD` come from the heap instead of their own mapping, and a heap keeps up to
`TRIM_THRESHOLD` of free memory instead of returning it. The process then reuses its pages; its
peak resident memory grows a little (by about 0.1 GiB in the digits benchmark, 0.25 GiB in the
README's first command). The command line and the benchmarks call it where no GPU or TPU plugin
for JAX is installed (`apply_default`; accelerator hosts keep glibc's defaults: unmeasured
there). A `GLIBC_TUNABLES` environment variable that sets either threshold is the user's choice
and wins. Nothing happens on other C libraries or operating systems.
"""

import ctypes
import os
import sys

from diffusion_jax import xla_cpu  # imports no JAX

# mallopt's parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 * 2**20  # blocks up to this size come from the heap
TRIM_THRESHOLD = 2**30  # free memory a heap keeps before returning any to the kernel
TUNABLES = ('glibc.malloc.mmap_threshold', 'glibc.malloc.trim_threshold')


def glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc on Linux, else None."""
    if not sys.platform.startswith('linux'):
        return None
    try:
        version = os.confstr('CS_GNU_LIBC_VERSION')
    except (ValueError, OSError):  # not glibc (musl has no such name)
        return None
    if not version or not version.startswith('glibc'):
        return None
    return ctypes.CDLL(None)  # the symbols the process already has, libc's mallopt among them


def keep_freed_memory() -> bool:
    """Sets glibc's mmap and trim thresholds to `MMAP_THRESHOLD` and `TRIM_THRESHOLD`.

    Nothing if the C library is not glibc or `GLIBC_TUNABLES` names either threshold.

    Returns:
        Whether both were set.
    """
    tunables = os.environ.get('GLIBC_TUNABLES', '')
    if any(name in tunables for name in TUNABLES):
        return False
    libc = glibc()
    if libc is None:
        return False
    mmap_set = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    trim_set = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(mmap_set and trim_set)


def apply_default() -> bool:
    """`keep_freed_memory()` where no GPU or TPU plugin for JAX is installed, as the command line
    and the benchmarks do (`xla_cpu.accelerator_plugin_installed`).

    Returns:
        Whether both thresholds were set.
    """
    return not xla_cpu.accelerator_plugin_installed() and keep_freed_memory()
