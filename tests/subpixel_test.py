"""models.subpixel and Upsample(impl='subpixel') against nearest-neighbour x2 then a 3x3 conv
computed tap by tap in float64 numpy (`tests.np_conv`)."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from diffusion_jax.models import layers, subpixel
from tests import np_conv, unet_forms


def _np_upsample_conv(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """conv3x3 'SAME' (zero padding 1) of each pixel repeated 2 x 2, in float64."""
    return np_conv.conv3x3(np.repeat(np.repeat(x, 2, axis=1), 2, axis=2), kernel)


def _np_upsample_conv_grads(x: np.ndarray, kernel: np.ndarray, dy: np.ndarray) -> tuple:
    """The gradients of sum(_np_upsample_conv(x, kernel) * dy): the conv's adjoints, then each
    2 x 2 block of the upsampled gradient summed back onto its source pixel."""
    up = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
    dup, dkernel = np_conv.conv3x3_grads(up, kernel, dy)
    b, h, w, c = x.shape
    return dup.reshape(b, h, 2, w, 2, c).sum(axis=(2, 4)), dkernel


def _rng_arrays(seed: int, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape) for shape in shapes]


class SubpixelTest(parameterized.TestCase):
    @parameterized.parameters(
        (2, 4, 4, 8, 8),  # the digits network's upsample: 4x4 -> 8x8
        (3, 2, 5, 3, 6),  # not square, Cin != Cout
        (1, 1, 1, 4, 2),  # one pixel: every output reads the zero border
        (2, 3, 7, 5, 5),  # odd sizes
    )
    def test_equals_repeat_then_conv_in_float64(self, b, h, w, cin, cout):
        x, kernel, dy = _rng_arrays(0, (b, h, w, cin), (3, 3, cin, cout), (b, 2 * h, 2 * w, cout))
        expected = _np_upsample_conv(x, kernel)
        f = jax.jit(subpixel.upsample_conv3x3)
        x32, kernel32 = jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32)
        out, vjp = jax.vjp(f, x32, kernel32)
        self.assertEqual(out.shape, (b, 2 * h, 2 * w, cout))
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
        dx, dkernel = vjp(jnp.asarray(dy, jnp.float32))
        expected_dx, expected_dkernel = _np_upsample_conv_grads(x, kernel, dy)
        np.testing.assert_allclose(dx, expected_dx, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(dkernel, expected_dkernel, rtol=1e-4, atol=1e-4)

    def test_kernel_of_the_wrong_shape_is_refused(self):
        with self.assertRaisesRegex(ValueError, 'for an input of 3 channels'):
            subpixel.upsample_conv3x3(jnp.zeros((1, 2, 2, 3)), jnp.zeros((3, 3, 4, 5)))

    @parameterized.parameters(jnp.float32, jnp.bfloat16)
    def test_upsample_module_has_the_same_params_and_function_either_way(self, dtype):
        x = jnp.asarray(_rng_arrays(1, (2, 4, 4, 6))[0], jnp.float32)
        modules = {
            impl: layers.Upsample(impl=impl, dtype=dtype, param_dtype=jnp.float32)
            for impl in ('repeat', 'subpixel')
        }
        inits = {impl: m.init(jax.random.key(3), x) for impl, m in modules.items()}
        self.assertEqual(
            jax.tree_util.tree_structure(inits['subpixel']),
            jax.tree_util.tree_structure(inits['repeat']),
        )
        jax.tree.map(np.testing.assert_array_equal, inits['subpixel'], inits['repeat'])
        # A random bias too, so that a dropped bias would show.
        params = jax.tree.map(
            lambda p: jnp.asarray(np.random.default_rng(p.size).normal(size=p.shape), p.dtype),
            inits['repeat'],
        )
        out = {impl: m.apply(params, x) for impl, m in modules.items()}
        self.assertEqual(out['subpixel'].dtype, dtype)
        tolerance = 1e-5 if dtype == jnp.float32 else 5e-2
        np.testing.assert_allclose(
            np.asarray(out['subpixel'], np.float32),
            np.asarray(out['repeat'], np.float32),
            rtol=tolerance,
            atol=tolerance,
        )
        kernel = np.asarray(params['params']['conv']['kernel'], np.float64)
        bias = np.asarray(params['params']['conv']['bias'], np.float64)
        expected = _np_upsample_conv(np.asarray(x, np.float64), kernel) + bias
        np.testing.assert_allclose(
            np.asarray(out['subpixel'], np.float32), expected, rtol=tolerance, atol=tolerance
        )

    def test_unknown_upsample_impl_is_refused(self):
        with self.assertRaisesRegex(ValueError, 'upsample impl'):
            layers.Upsample(impl='bilinear').init(jax.random.key(0), jnp.zeros((1, 2, 2, 3)))

    def test_unet_has_the_same_params_and_outputs_either_way(self):
        unet_forms.assert_same_params_and_function(
            'upsample_impl', ('repeat', 'subpixel'), ch=32, ch_mult=(1, 2), num_res_blocks=1,
            attn_resolutions=(),
        )  # fmt: skip


if __name__ == '__main__':
    absltest.main()
