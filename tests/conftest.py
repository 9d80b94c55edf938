"""Test-session setup: one persistent XLA compilation cache for the whole test run.

Many tests compile the same small programs (the digits train step, the samplers) again and
again: in-process, in both pytest-xdist workers, and in the `python -m diffusion_jax.main`
subprocesses that the fault-injection, multi-host and bad-input tests start. JAX's persistent
cache compiles each program once per run. It is set through the environment before JAX is
imported, so the workers and every subprocess inherit it; a size limit turns on JAX's file
locks, so that concurrent processes never read a half-written entry. The directory is new for
each run and removed at its end: nothing carries over between runs. A cache directory already
set in the environment is used as it is.

Only programs that took at least a second to compile are cached. With a size limit, JAX's cache
takes one lock for the whole directory on every read and write, and every write lists the
directory and reads each entry's access time (`jax._src.lru_cache`), so a write costs time in
proportion to the entries already there. Caching everything (JAX's eager operations included)
put about 1,250 entries in the cache for three test files alone, and the suite's writes cost
time quadratic in the entries: the fast tier took 6 min 48 s with every program cached and
3 min 20 s with this threshold (2026-12-07), which leaves about 15 entries, the programs worth
sharing.

The cache changes how long tests take, never what they compute: a cached program is the same
XLA executable that compiling would give.

In this process, `jax_disable_most_optimizations` compiles with XLA's backend optimisation level
0, as `fast_compile.py` does for the subprocesses, and XLA:CPU's fast-compile preset is added to
XLA_FLAGS, which the subprocesses inherit: the same computations (XLA:CPU uses no fast-math
either way; float32 sums may round differently), less optimised code, compiled in a fraction of
the time. No test times anything. The numerics tests compare against NumPy with their own
tolerances and pass with it; a module that needed the optimised compile would be listed in
`_FULLY_OPTIMIZED` with the reason.

`tiny_workdir` is one tiny digits run (trained and sampled in-process through main, once per
session and pytest-xdist worker) that tests share instead of each training their own (today the
bad-input tests; generate_test and evaluate_test still train theirs, in slow tests).
`pytest -m "not slow"` is the fast tier (see the README).
"""

import os
import shutil
import tempfile

import fast_compile  # imports no JAX

from diffusion_jax import xla_cpu  # imports no JAX

# The test processes run jaxlib's own XLA:CPU defaults (but the preset below), even where a
# test imports the command line (whose import would set `xla_cpu.DEFAULT_FLAGS` before JAX
# starts): the tests' tolerances were measured with them. Subprocesses start afresh;
# `tests/xla_cpu_test.py` checks the command line's default in processes of its own.
xla_cpu.apply_defaults = lambda: False

_OWNED_CACHE_DIR = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    _OWNED_CACHE_DIR = tempfile.mkdtemp(prefix='diffusion_jax_tests_xla_cache_')
    os.environ['JAX_COMPILATION_CACHE_DIR'] = _OWNED_CACHE_DIR
    os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '1')
    os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(4 * 2**30))


# XLA:CPU's fast-compile preset for this process and, through the environment, every
# subprocess (`fast_compile.py`); XLA reads XLA_FLAGS when JAX starts a backend. Not where a GPU
# or TPU plugin is installed, whose own XLA reads the same variable.
if not (xla_cpu.accelerator_plugin_installed() or xla_cpu.xla_flags_name('--xla_cpu_opt_preset')):
    os.environ['XLA_FLAGS'] = ' '.join(
        [*os.environ.get('XLA_FLAGS', '').split(), *fast_compile.PRESET_FLAGS]
    )

import jax  # noqa: E402  (after the cache settings above, which JAX reads at import)
import pytest  # noqa: E402

jax.config.update('jax_disable_most_optimizations', True)

# Test modules that must compile fully optimised, with the reason (none needs it today).
_FULLY_OPTIMIZED: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _optimized_compile_where_needed(request):
    """Turns the optimisations back on around the tests of the `_FULLY_OPTIMIZED` modules."""
    if request.node.path.name not in _FULLY_OPTIMIZED:
        yield
        return
    jax.clear_caches()  # the flag is not part of JAX's in-memory cache keys
    jax.config.update('jax_disable_most_optimizations', False)
    try:
        yield
    finally:
        jax.config.update('jax_disable_most_optimizations', True)
        jax.clear_caches()


@pytest.fixture(scope='session')
def tiny_workdir(tmp_path_factory) -> str:
    """A workdir of `cli.TINY_DIGITS`: checkpoints at steps 2 and 4, then samples_4.npz.

    Made once per session (per xdist worker) by `--mode=train` and `--mode=sample` through
    main, in-process. Shared: a test that writes into a workdir copies this one first.
    """
    import cli

    workdir = str(tmp_path_factory.mktemp('tiny') / 'workdir')
    for mode in ('train', 'sample'):
        result = cli.run_main(*cli.tiny_digits_args(workdir), f'--mode={mode}')
        assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isfile(os.path.join(workdir, 'samples', 'samples_4.npz'))
    return workdir


def pytest_unconfigure(config) -> None:
    del config
    if _OWNED_CACHE_DIR is not None:
        shutil.rmtree(_OWNED_CACHE_DIR, ignore_errors=True)


# Tests that take minutes (subprocesses, the full-size CIFAR10 network, the Inception network),
# by node id fragment, in pairs of about equal cost. They are collected first and, with
# `--maxschedchunk=1` (pyproject's addopts), pytest-xdist hands each worker two tests to start
# and then one test at a time to whichever worker is free: the long tests start early and no
# worker is left running one of them at the end while the other sits idle. The two multi-host
# tests, which start process pairs for minutes, are far apart in the list.
_SLOW_FIRST = (
    'test_two_hosts_train_checkpoint_resume_and_sample_like_one',
    'fault_injection_test.py',
    'test_the_cifar10_recipe_runs_on_mock_data',
    'test_a_short_digits_run_learns',
    'SameResultsTest',
    'MicrobatchTest',
    'test_train_sample_eval_on_digits_load_no_tensorflow',
    'test_streamed_fid_and_is_of_a_resumed_run',
    'test_resumed_run_is_bit_identical',
    'MultiDeviceTest',
    'PreemptionTest',
    'test_sigterm_to_one_host',
    'EvalModeTest',
    'DeviceCountTest',
)


def pytest_collection_modifyitems(config, items) -> None:
    """Moves the `_SLOW_FIRST` tests to the front, in that order; the rest keep theirs."""
    del config

    def rank(item) -> int:
        return next(
            (i for i, part in enumerate(_SLOW_FIRST) if part in item.nodeid), len(_SLOW_FIRST)
        )

    items.sort(key=rank)
