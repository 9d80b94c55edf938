"""XLA flags for the tests' subprocesses on CPU: compile in about a third of the time.

LLVM -O0 and the classic (non-MLIR) fusion emitters build the same HLO program with the same
numerics (XLA:CPU uses no fast-math either way); only the machine code is less optimised. The
tests that start `python -m diffusion_jax.main` or a worker script spend most of their time
compiling small programs, so they pass these flags in the subprocess's environment.
"""

import importlib.metadata
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

FLAGS = ('--xla_backend_optimization_level=0',)
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
