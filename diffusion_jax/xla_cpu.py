"""XLA:CPU options for this project's programs (speed; remat's memory), set before JAX starts.

jaxlib 0.10's XLA:CPU hands convolutions and dots to YNNPACK by default. On the digits network's
small maps (8x8 and 4x4, 32 to 128 channels) XLA's own (Eigen) convolutions are faster: the
train step takes about 70 ms instead of 93 ms at batch 64 on two cores (BENCHMARKS.md, "Why the
CPU train step was slow"), with the same HLO program and results equal within float32
rounding; YNNPACK's dots are as fast as the alternative and are kept. So, unless the user's
XLA_FLAGS already say which YNNPACK fusions to use, `apply_defaults` keeps only YNNPACK's dots.
The command line (`diffusion_jax.main`, on import) and the benchmarks call it; a Python program
that wants the same calls it before its first JAX computation, since XLA reads XLA_FLAGS once,
when JAX starts a backend (afterwards it changes nothing). The library itself leaves XLA_FLAGS
alone, so the tests run jaxlib's defaults. The flag concerns the CPU backend only: GPU and TPU
programs are compiled as before.

The second default makes `config.model.remat` save memory on a CPU. `jax.checkpoint` keeps its
recomputation apart from the forward pass with optimization barriers; XLA:CPU removes them early
(its `cse_barrier_expander` pass, before scheduling) and its common-subexpression elimination
then merges the recomputation back into the forward pass, so the compiled program keeps every
activation as if remat were off (BENCHMARKS.md, "Memory of the 256x256 train step"). XLA:GPU and
TPU remove the barriers only after scheduling. Disabling that pass keeps them; a program without
barriers (any without remat) compiles to the same executable. `xla_disable_hlo_passes` is read
by every backend's compiler, so it is added only where no accelerator plugin for JAX (CUDA,
ROCm, TPU) is installed.
"""

import importlib.metadata
import importlib.util
import os
import sys

YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type'
# YNNPACK for single dots only (jaxlib 0.10's default also sends it single convolutions).
DEFAULT_FLAGS = (f'{YNN_FLAG}=individual_dot',)
# YNNPACK for dots and convolutions: what jaxlib 0.10.2 does without the flag for a program of
# convolutions and dots (the same compiled HLO); other programs may differ in other fusions.
JAXLIB_DEFAULT_FLAGS = (f'{YNN_FLAG}=individual_dot,individual_convolution',)
# Keeps jax.checkpoint's optimization barriers through XLA:CPU's CSE (CPU-only hosts).
KEEP_BARRIERS_FLAG = '--xla_disable_hlo_passes=cse_barrier_expander'
# The jaxlib versions whose XLA knows the flag, and XLA:CPU's `--xla_cpu_opt_preset` that the
# tests use (XLA aborts on an unknown one; 0.10.2, 0.11.2 and 0.12.1 checked): [0.10, 0.13).
JAXLIB_VERSIONS = ((0, 10), (0, 13))


def accelerator_plugin_installed() -> bool:
    """Whether JAX may find a GPU or TPU backend here: a `jax_plugins` package or entry point
    (jaxlib's CUDA and ROCm plugins) or libtpu."""
    if importlib.metadata.entry_points(group='jax_plugins'):
        return True
    return any(importlib.util.find_spec(name) for name in ('jax_plugins', 'libtpu'))


def default_flags() -> tuple[str, ...]:
    """`DEFAULT_FLAGS`, and `KEEP_BARRIERS_FLAG` unless an accelerator plugin is installed."""
    return DEFAULT_FLAGS + (() if accelerator_plugin_installed() else (KEEP_BARRIERS_FLAG,))


def jaxlib_knows_the_flag() -> bool:
    """Whether the installed jaxlib is one of `JAXLIB_VERSIONS`."""
    try:
        version = importlib.metadata.version('jaxlib')
        major_minor = tuple(int(part) for part in version.split('.')[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return JAXLIB_VERSIONS[0] <= major_minor < JAXLIB_VERSIONS[1]


def _backends_started() -> bool:
    if 'jax' not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:  # a JAX without that module: assume the worst, leave the flags alone
        return True
    started = getattr(xla_bridge, 'backends_are_initialized', None)
    return True if started is None else bool(started())


def apply_defaults() -> bool:
    """Appends each of `default_flags()` to XLA_FLAGS unless XLA_FLAGS name that flag already;
    nothing if JAX's backends run already or the installed jaxlib is not one of
    `JAXLIB_VERSIONS`.

    Returns:
        Whether XLA_FLAGS was changed.
    """
    return _apply_defaults()


def xla_flags_name(flag: str) -> bool:
    """Whether XLA_FLAGS mention `flag` ('--name' or '--name=value': its name counts)."""
    return flag.split('=')[0] in os.environ.get('XLA_FLAGS', '')


def _apply_defaults() -> bool:
    if not jaxlib_knows_the_flag() or _backends_started():
        return False
    current = os.environ.get('XLA_FLAGS', '')
    added = [flag for flag in default_flags() if not xla_flags_name(flag)]
    if added:
        os.environ['XLA_FLAGS'] = ' '.join([*current.split(), *added])
    return bool(added)
