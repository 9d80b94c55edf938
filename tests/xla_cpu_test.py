"""The XLA:CPU default the command line sets (diffusion_jax.xla_cpu), in fresh processes.

Each test starts Python anew: XLA reads XLA_FLAGS once, when JAX starts its first backend.
"""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from absl.testing import absltest

from diffusion_jax import xla_cpu
from tests import fast_compile

_JAXLIB_DEFAULT = ' '.join(xla_cpu.JAXLIB_DEFAULT_FLAGS)
_PRINT_FLAGS = 'import os, diffusion_jax.main; print(os.environ.get("XLA_FLAGS", ""))'
# The train step's kind of work: a conv's forward pass and both gradients, compiled.
_CONV_HLO = """
import jax, jax.numpy as jnp
import diffusion_jax.main
def f(x, w):
    numbers = ('NHWC', 'HWIO', 'NHWC')
    y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=numbers)
    return jnp.sum(y * y)
x, w = jnp.ones((8, 8, 8, 32)), jnp.ones((3, 3, 32, 32))
print(jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, w).compile().as_text())
"""


def _run(code: str, xla_flags: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    if xla_flags is not None:
        env['XLA_FLAGS'] = xla_flags
    proc = subprocess.run(
        [sys.executable, '-c', code], cwd=fast_compile.REPO, env=env,
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    return proc.stdout


class ApplyDefaultsTest(absltest.TestCase):
    def test_the_package_alone_leaves_the_flags_alone(self):
        code = _PRINT_FLAGS.replace('diffusion_jax.main', 'diffusion_jax.models')
        self.assertEqual(_run(code, None).strip(), '')

    def test_the_command_line_adds_the_flags(self):
        self.assertEqual(_run(_PRINT_FLAGS, None).split(), list(xla_cpu.default_flags()))

    def test_other_flags_are_kept(self):
        out = _run(_PRINT_FLAGS, '--xla_force_host_platform_device_count=2')
        self.assertEqual(
            out.split(), ['--xla_force_host_platform_device_count=2', *xla_cpu.default_flags()]
        )

    def test_the_users_own_settings_win(self):
        own_ynn = f'{xla_cpu.YNN_FLAG}=individual_dot,individual_convolution'
        own_passes = '--xla_disable_hlo_passes=algsimp'
        barriers = [f for f in xla_cpu.default_flags() if f == xla_cpu.KEEP_BARRIERS_FLAG]
        self.assertEqual(_run(_PRINT_FLAGS, own_ynn).split(), [own_ynn, *barriers])
        both = f'{own_ynn} {own_passes}'
        self.assertEqual(_run(_PRINT_FLAGS, both).split(), both.split())

    def test_the_barrier_flag_only_where_no_accelerator_plugin_is_installed(self):
        # xla_disable_hlo_passes reaches every backend's compiler: a GPU or TPU host keeps XLA's.
        for installed in (False, True):
            with absltest.mock.patch.object(
                xla_cpu, 'accelerator_plugin_installed', return_value=installed
            ):
                flags = xla_cpu.default_flags()
            self.assertEqual(flags[: len(xla_cpu.DEFAULT_FLAGS)], xla_cpu.DEFAULT_FLAGS)
            self.assertEqual(xla_cpu.KEEP_BARRIERS_FLAG in flags, not installed)
        entry_point = importlib.metadata.EntryPoint(
            'xla_cuda13', 'jax_plugins.xla_cuda13', 'jax_plugins'
        )
        with absltest.mock.patch('importlib.metadata.entry_points', return_value=[entry_point]):
            self.assertTrue(xla_cpu.accelerator_plugin_installed())
        with (
            absltest.mock.patch('importlib.metadata.entry_points', return_value=[]),
            absltest.mock.patch('importlib.util.find_spec', return_value=None),
        ):
            self.assertFalse(xla_cpu.accelerator_plugin_installed())

    def test_nothing_changes_once_jax_runs(self):
        code = 'import jax; jax.devices(); ' + _PRINT_FLAGS
        self.assertEqual(_run(code, None).strip(), '')

    def test_only_jaxlibs_known_to_have_the_flag_get_it(self):
        # XLA aborts on a flag it does not know: outside [0.10, 0.13) nothing is added.
        for version, added in (('0.9.2', False), ('0.10.2', True), ('0.12.9', True),
                               ('0.13.0', False), ('weird', False)):  # fmt: skip
            with (
                absltest.mock.patch.dict(os.environ, {'XLA_FLAGS': '--a=1'}),
                absltest.mock.patch.object(xla_cpu, '_backends_started', return_value=False),
                absltest.mock.patch('importlib.metadata.version', return_value=version),
            ):
                # The logic of apply_defaults (tests/conftest.py makes that one a no-op here).
                self.assertEqual(xla_cpu._apply_defaults(), added, version)
                expected = ['--a=1', *xla_cpu.default_flags()] if added else ['--a=1']
                self.assertEqual(os.environ['XLA_FLAGS'].split(), expected)

    @pytest.mark.slow  # compiles in two processes
    def test_the_flag_takes_convolutions_away_from_ynnpack(self):
        ours = _run(_CONV_HLO, None)
        jaxlib_default = _run(_CONV_HLO, _JAXLIB_DEFAULT)
        self.assertIn('ynn', jaxlib_default.lower())  # the default this flag changes
        self.assertNotIn('ynn', ours.lower())
        self.assertIn('convolution(', ours)


# XLA's compiled temporaries of a small U-Net's gradient, without and with remat.
_REMAT_MEMORY = """
import jax, jax.numpy as jnp
import diffusion_jax.main
from diffusion_jax.models import unet
net = unet.UNet(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                dropout=0.0)
x, t = jnp.ones((16, 16, 16, 3)), jnp.zeros((16,), jnp.int32)
params = jax.eval_shape(lambda: net.init(jax.random.key(0), x, t, train=False))['params']
for remat in (False, True):
    m = net.clone(remat=remat)
    loss = lambda p: jnp.mean(m.apply({'params': p}, x, t, train=False) ** 2)
    print(jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes)
"""


@pytest.mark.slow  # compiles a U-Net's gradient twice in each of two processes
class RematMemoryTest(absltest.TestCase):
    def _temporaries(self, extra_flags: str) -> tuple[int, int]:
        # LLVM -O0 (`fast_compile`): the same HLO and buffer assignment.
        plain, remat = (int(n) for n in fast_compile.run_python(_REMAT_MEMORY, extra_flags).split())
        return plain, remat

    def test_the_command_lines_flags_make_remat_save_memory_on_a_cpu(self):
        if xla_cpu.accelerator_plugin_installed():
            self.skipTest('the barrier flag is added on CPU-only hosts only')
        plain, remat = self._temporaries('')
        self.assertLess(remat, 0.5 * plain)  # 35% measured
        # Why the flag is there: with XLA:CPU's own pass list the recomputation is merged back
        # into the forward pass ('--xla_disable_hlo_passes=' names the flag, disables nothing).
        plain_default, remat_default = self._temporaries(' --xla_disable_hlo_passes=')
        self.assertEqual(plain_default, plain)
        self.assertGreater(remat_default, 0.9 * plain_default)  # 98% measured


_GRADS = """
import sys
import jax, jax.numpy as jnp, numpy as np
import diffusion_jax.main
from diffusion_jax import experiment
from diffusion_jax.configs import digits
exp = experiment.build(digits.get_config())
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((16, 8, 8, 1)), jnp.float32)
t = jnp.asarray(rng.integers(0, 250, 16))
params = exp.model.init(jax.random.key(0), x, t, train=False)['params']
noise = lambda p: 0.05 * jnp.asarray(rng.standard_normal(p.shape), p.dtype)
params = jax.tree.map(lambda p: p + noise(p), params)
loss = lambda p: jnp.mean(exp.model.apply({'params': p}, x, t, train=False) ** 2)
value, grads = jax.jit(jax.value_and_grad(loss))(params)
leaves = jax.tree_util.tree_flatten_with_path(grads)[0]
flat = {'/'.join(str(p.key) for p in path): np.asarray(g) for path, g in leaves}
np.savez(sys.argv[1], value=np.asarray(value), **flat)
"""


@pytest.mark.slow  # compiles the digits U-Net's gradient in two processes
class SameResultsTest(absltest.TestCase):
    def test_the_digits_gradient_is_jaxlibs_within_float32_rounding(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        results = {}
        for name, flags in (('ours', None), ('default', _JAXLIB_DEFAULT)):
            path = os.path.join(tmp, f'{name}.npz')
            # LLVM -O0 (`fast_compile`): the same convolution routing (YNNPACK's or XLA's own)
            # and numerics, in about two thirds of the compile time.
            env = fast_compile.env()
            if flags:
                env['XLA_FLAGS'] += ' ' + flags
            subprocess.run([sys.executable, '-c', _GRADS, path], cwd=fast_compile.REPO, env=env,
                           check=True, timeout=300)  # fmt: skip
            with np.load(path) as f:
                results[name] = {k: f[k] for k in f.files}
        ours, default = results['ours'], results['default']
        self.assertEqual(sorted(ours), sorted(default))
        self.assertGreater(len(ours), 100)
        for key in ours:
            scale = np.abs(default[key]).max()
            np.testing.assert_allclose(ours[key], default[key], rtol=0, atol=1e-4 * scale + 1e-7)


if __name__ == '__main__':
    absltest.main()
