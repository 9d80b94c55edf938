"""XLA:CPU options that make this project's programs faster, set before JAX starts its CPU backend.

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
"""

import importlib.metadata
import os
import sys

YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type'
# YNNPACK for single dots only (jaxlib 0.10's default also sends it single convolutions).
DEFAULT_FLAGS = (f'{YNN_FLAG}=individual_dot',)
# YNNPACK for dots and convolutions: what jaxlib 0.10.2 does without the flag for a program of
# convolutions and dots (the same compiled HLO); other programs may differ in other fusions.
JAXLIB_DEFAULT_FLAGS = (f'{YNN_FLAG}=individual_dot,individual_convolution',)
# The jaxlib versions whose XLA knows the flag (XLA aborts on an unknown one): [0.10, 0.13).
JAXLIB_VERSIONS = ((0, 10), (0, 13))


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
    """Appends `DEFAULT_FLAGS` to XLA_FLAGS unless they are set, JAX's backends run already or
    the installed jaxlib is not one of `JAXLIB_VERSIONS`.

    Returns:
        Whether XLA_FLAGS was changed.
    """
    return _apply_defaults()


def _apply_defaults() -> bool:
    current = os.environ.get('XLA_FLAGS', '')
    if YNN_FLAG in current or not jaxlib_knows_the_flag() or _backends_started():
        return False
    os.environ['XLA_FLAGS'] = ' '.join([*current.split(), *DEFAULT_FLAGS])
    return True
