"""The glibc malloc thresholds the command line sets (diffusion_jax.host_malloc).

The behaviour is checked in fresh processes (malloc's settings belong to a process): freed
memory is kept for the next allocation instead of being faulted in again, and an XLA:CPU train
step faults far fewer pages in. Whatever the pytest process itself has set (a test that imports
the command line sets the thresholds there too) does not reach those processes.
"""

import json
import os
import subprocess
import sys
from unittest import mock

import pytest
from absl.testing import absltest

from diffusion_jax import host_malloc
from tests import fast_compile

_ON_GLIBC = host_malloc.glibc() is not None

# Minor page faults of touching a freed-then-reallocated 64 MiB block, after the `setup` code.
_REUSE = """
import ctypes, json, resource
{setup}
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 64 * 2**20

def touch_faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(ctypes.c_void_p(block))
    return faults

touch_faults()  # the first use of the memory faults it in either way
print(json.dumps({{'again': touch_faults(), 'pages': size // resource.getpagesize()}}))
"""

# Minor page faults of 30 steps of the digits train step at batch 64 (after 2 warm-up steps).
_TRAIN_FAULTS = """
import json, resource
{setup}
import jax, jax.numpy as jnp, numpy as np
from diffusion_jax import experiment, parallel, train
from diffusion_jax.configs import digits
config = digits.get_config()
mesh = parallel.create_mesh()
exp = experiment.build(config)
state = exp.init_state(jax.random.key(0), mesh)
shape = (config.training.batch_size, *exp.image_shape)
images = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
batch = parallel.global_batch({{'image': images}}, mesh)
rng = jax.device_put(jax.random.key(1), parallel.replicated(mesh))
step = train.make_jit_train_step(config, exp.diffusion, exp.learning_rate_fn, mesh)
for _ in range(2):
    state, metrics = jax.block_until_ready(step(state, batch, rng))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    state, metrics = step(state, batch, rng)
jax.block_until_ready(metrics)
print(json.dumps({{'faults': resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}}))
"""


def _run(code: str, **env: str) -> dict:
    environ = {k: v for k, v in fast_compile.env().items() if k != 'GLIBC_TUNABLES'}
    proc = subprocess.run(
        [sys.executable, '-c', code], cwd=fast_compile.REPO, env={**environ, **env},
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


class _FakeLibc:
    def __init__(self, result: int = 1):
        self.calls, self.result = [], result

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.result


class KeepFreedMemoryTest(absltest.TestCase):
    def test_sets_both_thresholds(self):
        libc = _FakeLibc()
        with (
            mock.patch.object(host_malloc, 'glibc', return_value=libc),
            mock.patch.dict(os.environ, {'GLIBC_TUNABLES': ''}),
        ):
            self.assertTrue(host_malloc.keep_freed_memory())
        self.assertEqual(
            sorted(libc.calls),
            sorted([(-3, 256 * 2**20), (-1, 2**30)]),  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
        )

    def test_reports_a_refused_setting(self):
        with mock.patch.object(host_malloc, 'glibc', return_value=_FakeLibc(result=0)):
            self.assertFalse(host_malloc.keep_freed_memory())

    def test_the_users_tunables_win(self):
        for tunables in ('glibc.malloc.trim_threshold=0', 'glibc.malloc.mmap_threshold=4096',
                         'glibc.malloc.check=0:glibc.malloc.mmap_threshold=4096'):  # fmt: skip
            libc = _FakeLibc()
            with (
                mock.patch.object(host_malloc, 'glibc', return_value=libc),
                mock.patch.dict(os.environ, {'GLIBC_TUNABLES': tunables}),
            ):
                self.assertFalse(host_malloc.keep_freed_memory(), tunables)
            self.assertEqual(libc.calls, [], tunables)
        libc = _FakeLibc()  # other tunables leave the thresholds to us
        with (
            mock.patch.object(host_malloc, 'glibc', return_value=libc),
            mock.patch.dict(os.environ, {'GLIBC_TUNABLES': 'glibc.malloc.check=0'}),
        ):
            self.assertTrue(host_malloc.keep_freed_memory())

    def test_nothing_without_glibc(self):
        with mock.patch.object(host_malloc, 'glibc', return_value=None):
            self.assertFalse(host_malloc.keep_freed_memory())
        with mock.patch.object(host_malloc.sys, 'platform', 'darwin'):
            self.assertIsNone(host_malloc.glibc())

    def test_accelerator_hosts_keep_glibcs_defaults(self):
        for installed in (False, True):
            libc = _FakeLibc()
            with (
                mock.patch.object(host_malloc, 'glibc', return_value=libc),
                mock.patch.object(
                    host_malloc.xla_cpu, 'accelerator_plugin_installed', return_value=installed
                ),
                mock.patch.dict(os.environ, {'GLIBC_TUNABLES': ''}),
            ):
                self.assertEqual(host_malloc.apply_default(), not installed)
            self.assertEqual(len(libc.calls), 0 if installed else 2)


@pytest.mark.skipif(not _ON_GLIBC, reason='glibc only')
class FreshProcessTest(absltest.TestCase):
    def test_the_command_line_keeps_freed_memory(self):
        default = _run(_REUSE.format(setup='import diffusion_jax'))
        ours = _run(_REUSE.format(setup='import diffusion_jax.main'))
        # glibc's default maps a 64 MiB block anew each time: its pages fault in again (fewer
        # faults than pages only where the kernel backs them with huge pages).
        self.assertGreater(default['again'], 16)
        self.assertLess(ours['again'], default['again'] / 10)
        self.assertLess(ours['again'], ours['pages'] / 100)

    def test_a_users_tunable_is_left_alone(self):
        tunables = {'GLIBC_TUNABLES': 'glibc.malloc.trim_threshold=131072'}
        ours = _run(_REUSE.format(setup='import diffusion_jax.main'), **tunables)
        self.assertGreater(ours['again'], 16)

    @pytest.mark.slow  # compiles the digits train step in two processes
    def test_the_train_step_faults_fewer_pages_in(self):
        setup = 'from diffusion_jax import host_malloc; assert host_malloc.keep_freed_memory()'
        default = _run(_TRAIN_FAULTS.format(setup=''))['faults']
        ours = _run(_TRAIN_FAULTS.format(setup=setup))['faults']
        self.assertLess(ours, default / 3, (ours, default))


if __name__ == '__main__':
    absltest.main()
