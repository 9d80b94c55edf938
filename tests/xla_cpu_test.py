"""The XLA:CPU default the command line sets (diffusion_jax.xla_cpu), in fresh processes.

Each test starts Python anew: XLA reads XLA_FLAGS once, when JAX starts its first backend.
"""

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

    def test_the_command_line_adds_the_flag(self):
        self.assertEqual(_run(_PRINT_FLAGS, None).split(), list(xla_cpu.DEFAULT_FLAGS))

    def test_other_flags_are_kept(self):
        out = _run(_PRINT_FLAGS, '--xla_force_host_platform_device_count=2')
        self.assertEqual(
            out.split(), ['--xla_force_host_platform_device_count=2', *xla_cpu.DEFAULT_FLAGS]
        )

    def test_the_users_own_ynn_setting_wins(self):
        own = f'{xla_cpu.YNN_FLAG}=individual_dot,individual_convolution'
        self.assertEqual(_run(_PRINT_FLAGS, own).split(), [own])

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
                expected = ['--a=1', *xla_cpu.DEFAULT_FLAGS] if added else ['--a=1']
                self.assertEqual(os.environ['XLA_FLAGS'].split(), expected)

    @pytest.mark.slow  # compiles in two processes
    def test_the_flag_takes_convolutions_away_from_ynnpack(self):
        ours = _run(_CONV_HLO, None)
        jaxlib_default = _run(_CONV_HLO, _JAXLIB_DEFAULT)
        self.assertIn('ynn', jaxlib_default.lower())  # the default this flag changes
        self.assertNotIn('ynn', ours.lower())
        self.assertIn('convolution(', ours)


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
