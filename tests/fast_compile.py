"""XLA flags for the tests' processes on CPU: compile in a fraction of the time.

LLVM -O0, XLA:CPU's fast-compile preset and (before jaxlib 0.11) the classic fusion emitters
build the same computations (XLA:CPU uses no fast-math either way): only the compiler's effort
differs, and with it the order of some float32 sums (the preset's digits train step differs
from XLA's default one by 1.5e-8 in the parameters after 10 steps). The tests spend most of
their time compiling small programs, so the subprocesses that start `python -m
diffusion_jax.main` or a worker script pass these flags in their environment, and
`conftest.py` adds `PRESET_FLAGS` to the test processes' own.

The preset (`--xla_cpu_opt_preset`, the mode XLA runs its own CPU tests in) skips XLA:CPU's
compile-time-expensive optimisation passes: the digits train step compiled in 10.9 s instead of
36.0 s with the flags below and ran at 325 instead of 457 ms per step (2026-12-07, 2 cores, in
the same busy half hour). jaxlib 0.10.2, 0.11.2 and 0.12.1 know the flag (their binaries name it);
XLA aborts on a flag it does not know, so other versions go without it.
"""

import importlib.metadata
import os
import pathlib
import subprocess
import sys

from diffusion_jax import xla_cpu  # imports no JAX

REPO = pathlib.Path(__file__).resolve().parents[1]

# Only for the jaxlib versions whose XLA was checked to know the preset (`xla_cpu.JAXLIB_VERSIONS`).
PRESET_FLAGS = (
    ('--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE',) if xla_cpu.jaxlib_knows_the_flag() else ()
)
FLAGS = ('--xla_backend_optimization_level=0', *PRESET_FLAGS)
# XLA of jaxlib 0.11+ has no classic CPU emitters and aborts on the flag.
if tuple(int(p) for p in importlib.metadata.version('jaxlib').split('.')[:2]) < (0, 11):
    FLAGS += ('--xla_cpu_use_fusion_emitters=false',)


def xla_flags(device_count: int | None = None) -> str:
    """The XLA_FLAGS value: the fast-compile flags, and a forced CPU device count if given."""
    flags = list(FLAGS)
    if device_count is not None:
        flags.append(f'--xla_force_host_platform_device_count={device_count}')
    return ' '.join(flags)


def env(device_count: int | None = None, **extra: str) -> dict[str, str]:
    """This process's environment with `xla_flags(device_count)` and `extra` set."""
    return {**os.environ, 'XLA_FLAGS': xla_flags(device_count), **extra}


def run_on_devices(code: str, device_count: int) -> subprocess.CompletedProcess:
    """Runs Python `code` in a fresh process with `device_count` CPU devices, from the repository
    root (which it can import, tests/ included through sys.path), capturing its output."""
    return subprocess.run(
        [sys.executable, '-c', code],
        env=env(device_count, PYTHONPATH=str(REPO)),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def run_python(code: str, extra_flags: str = '') -> str:
    """Runs Python `code` in a fresh process from the repository root with `xla_flags()` and
    `extra_flags`; returns its stdout (raises CalledProcessError if it fails)."""
    environ = env()
    environ['XLA_FLAGS'] += extra_flags
    return subprocess.run(
        [sys.executable, '-c', code],
        env=environ,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
