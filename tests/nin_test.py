"""layers.nin / layers.Conv1x1 (the 1x1 layers as XLA convolutions) against the same layer in
float64 numpy, and the U-Net with either form of its 1x1 layers."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from diffusion_jax.models import layers
from tests import unet_forms


def _rng_arrays(seed: int, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape) for shape in shapes]


class NinTest(parameterized.TestCase):
    @parameterized.parameters(
        (2, 4, 4, 8, 16),  # wider out
        (3, 2, 5, 96, 32),  # a digits up-path shortcut's channels, not square
        (1, 1, 1, 3, 2),  # one pixel
    )
    def test_conv1x1_equals_the_channel_matmul_in_float64(self, b, h, w, cin, cout):
        x, kernel, bias, dy = _rng_arrays(0, (b, h, w, cin), (cin, cout), (cout,), (b, h, w, cout))
        layer = layers.Conv1x1(cout)
        params = {'params': {'kernel': jnp.asarray(kernel, jnp.float32),
                             'bias': jnp.asarray(bias, jnp.float32)}}  # fmt: skip
        x32 = jnp.asarray(x, jnp.float32)
        out, vjp = jax.vjp(jax.jit(layer.apply), params, x32)
        np.testing.assert_allclose(
            out, np.einsum('bhwc,cd->bhwd', x, kernel) + bias, rtol=1e-5, atol=1e-5
        )
        dparams, dx = vjp(jnp.asarray(dy, jnp.float32))
        np.testing.assert_allclose(dx, np.einsum('bhwd,cd->bhwc', dy, kernel), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(
            dparams['params']['kernel'], np.einsum('bhwc,bhwd->cd', x, dy), rtol=1e-4, atol=1e-4
        )
        np.testing.assert_allclose(
            dparams['params']['bias'], dy.sum(axis=(0, 1, 2)), rtol=1e-4, atol=1e-4
        )

    @parameterized.parameters(jnp.float32, jnp.bfloat16)
    def test_nin_has_the_same_params_and_function_either_way(self, dtype):
        x = jnp.asarray(_rng_arrays(1, (2, 3, 3, 6))[0], dtype)
        dtypes = {'dtype': dtype, 'param_dtype': jnp.float32}
        nets = {impl: layers.nin(5, name=None, impl=impl, **dtypes) for impl in ('dense', 'conv')}
        params = {impl: net.init(jax.random.key(3), x) for impl, net in nets.items()}
        jax.tree.map(np.testing.assert_array_equal, params['conv'], params['dense'])
        outs = {impl: net.apply(params['dense'], x) for impl, net in nets.items()}
        self.assertEqual(outs['conv'].dtype, outs['dense'].dtype)
        tolerance = 1e-6 if dtype == jnp.float32 else 1e-2
        np.testing.assert_allclose(
            np.asarray(outs['conv'], np.float32),
            np.asarray(outs['dense'], np.float32),
            rtol=tolerance,
            atol=tolerance,
        )

    def test_unknown_nin_impl_is_refused(self):
        with self.assertRaisesRegex(ValueError, "unknown nin impl 'einsum'"):
            layers.nin(4, name='q', impl='einsum', dtype=jnp.float32, param_dtype=jnp.float32)

    def test_conv1x1_refuses_a_flat_input(self):
        with self.assertRaises(AssertionError):
            layers.Conv1x1(4).init(jax.random.key(0), jnp.zeros((2, 3)))

    def test_unet_has_the_same_params_and_outputs_either_way(self):
        # Shortcuts on both paths and an attention block at 4x4 besides the middle one's.
        init = unet_forms.assert_same_params_and_function(
            'nin_impl', ('dense', 'conv'), ch=32, ch_mult=(1, 2), num_res_blocks=1,
            attn_resolutions=(4,),
        )  # fmt: skip
        self.assertIn('nin_shortcut', init['params']['up_0_block_0'])
        self.assertIn('q', init['params']['down_1_attn_0'])


if __name__ == '__main__':
    absltest.main()
