"""models.conv.conv2d against a float64 numpy convolution (`tests.np_conv`), gradients included,
inside and outside a loop; the U-Net with either conv_vjp; and what XLA:CPU compiles a
loop body's convolution gradients to."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from diffusion_jax.models import conv
from tests import np_conv, unet_forms

# (x shape, kernel shape, stride, padding, numpy's pads): the network's convs and a few more.
CASES = (
    ((2, 8, 8, 3), (3, 3, 3, 5), 1, 'SAME', ((1, 1), (1, 1))),
    ((2, 8, 8, 3), (3, 3, 3, 5), 2, 'SAME', ((0, 1), (0, 1))),  # TF's stride-2 'SAME'
    ((2, 7, 9, 3), (3, 3, 3, 5), 2, 'SAME', ((1, 1), (1, 1))),  # odd sizes
    ((2, 8, 8, 3), (3, 3, 3, 5), 2, ((1, 1), (1, 1)), ((1, 1), (1, 1))),  # 'symmetric'
    ((3, 5, 6, 4), (1, 1, 4, 2), 1, 'VALID', ((0, 0), (0, 0))),  # a 1x1 layer
    ((2, 6, 6, 3), (2, 2, 3, 4), 1, ((0, 1), (1, 0)), ((0, 1), (1, 0))),  # a subpixel conv
    ((2, 9, 9, 3), (3, 3, 3, 4), 3, 'VALID', ((0, 0), (0, 0))),
)


def _arrays(x_shape, k_shape, stride, pads):
    rng = np.random.default_rng(sum(x_shape) + sum(k_shape) + stride)
    x, kernel = rng.normal(size=x_shape), rng.normal(size=k_shape)
    out_shape = np_conv.conv(x, kernel, stride, pads).shape
    return x, kernel, rng.normal(size=out_shape)


class Conv2dTest(parameterized.TestCase):
    @parameterized.product(case=CASES, vjp=('jax', 'nhwc'))
    def test_conv2d_and_its_gradients_equal_numpys(self, case, vjp):
        x_shape, k_shape, stride, padding, pads = case
        x, kernel, dy = _arrays(x_shape, k_shape, stride, pads)

        def f(x, kernel):
            return conv.conv2d(x, kernel, stride, padding, vjp)

        out, f_vjp = jax.vjp(jax.jit(f), jnp.float32(x), jnp.float32(kernel))
        np.testing.assert_allclose(out, np_conv.conv(x, kernel, stride, pads), rtol=1e-5, atol=1e-5)
        dx, dkernel = f_vjp(jnp.float32(dy))
        want_dx, want_dkernel = np_conv.conv_grads(x, kernel, dy, stride, pads)
        np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(dkernel, want_dkernel, rtol=1e-4, atol=1e-4)

    @parameterized.parameters(CASES[1], CASES[4])
    def test_gradients_inside_a_scan_equal_numpys(self, x_shape, k_shape, stride, padding, pads):
        x, kernel, dy = _arrays(x_shape, k_shape, stride, pads)

        def grads(x, kernel, dy):
            def body(carry, scale):
                _, f_vjp = jax.vjp(
                    lambda a, k: conv.conv2d(a, k, stride, padding, 'nhwc'), x, kernel
                )
                return carry, f_vjp(scale * dy)

            return jax.lax.scan(body, 0, jnp.float32([1.0, -2.0]))[1]

        dx, dkernel = jax.jit(grads)(jnp.float32(x), jnp.float32(kernel), jnp.float32(dy))
        want_dx, want_dkernel = np_conv.conv_grads(x, kernel, dy, stride, pads)
        for i, scale in enumerate((1.0, -2.0)):
            np.testing.assert_allclose(dx[i], scale * want_dx, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(dkernel[i], scale * want_dkernel, rtol=1e-4, atol=1e-4)

    def test_bfloat16_gradients_keep_the_operands_dtypes(self):
        x = jnp.ones((2, 4, 4, 3), jnp.bfloat16)
        kernel = jnp.ones((3, 3, 3, 2), jnp.bfloat16)
        out, f_vjp = jax.vjp(lambda a, k: conv.conv2d(a, k, 1, 'SAME', 'nhwc'), x, kernel)
        self.assertEqual(out.dtype, jnp.bfloat16)
        dx, dkernel = f_vjp(jnp.ones_like(out))
        self.assertEqual((dx.dtype, dkernel.dtype), (jnp.bfloat16, jnp.bfloat16))
        # Every interior input pixel feeds 9 outputs x 2 channels; every tap 2 x 16 - edges.
        self.assertEqual(float(dx[0, 1, 1, 0]), 18.0)
        self.assertEqual(float(dkernel[1, 1, 0, 0]), 32.0)

    def test_bad_shapes_and_vjps_are_refused(self):
        with self.assertRaisesRegex(ValueError, r'\[B, H, W, C\] and \[KH, KW, C, C_out\]'):
            conv.conv2d(jnp.ones((2, 4, 4, 3)), jnp.ones((3, 3, 4, 2)))
        with self.assertRaisesRegex(ValueError, 'conv vjp'):
            conv.conv2d(jnp.ones((2, 4, 4, 3)), jnp.ones((3, 3, 3, 2)), vjp='nchw')


def _loop_body_conv_labels(vjp: str) -> list[str]:
    """The dim_labels of every convolution XLA:CPU compiles for a scan of the gradients of a
    3x3 stride-1 conv, a stride-2 conv and a 1x1 conv."""

    def loss(x, kernels):
        h = conv.conv2d(x, kernels[0], 1, 'SAME', vjp)
        h = conv.conv2d(jnp.tanh(h), kernels[1], 2, 'SAME', vjp)
        return jnp.sum(conv.conv2d(jnp.tanh(h), kernels[2], 1, 'VALID', vjp) ** 2)

    def steps(x, kernels):
        def body(kernels, _):
            return jax.tree.map(
                lambda k, g: k - 1e-3 * g, kernels, jax.grad(loss, 1)(x, kernels)
            ), None

        return jax.lax.scan(body, kernels, None, length=2)[0]

    x = jnp.ones((4, 8, 8, 8))
    kernels = [jnp.ones((3, 3, 8, 8)), jnp.ones((3, 3, 8, 8)), jnp.ones((1, 1, 8, 8))]
    hlo = jax.jit(steps).lower(x, kernels).compile().as_text()
    return re.findall(r'convolution\(.*dim_labels=(\S+?),?\s', hlo)


class LoopBodyTest(absltest.TestCase):
    @absltest.skipIf(jax.default_backend() != 'cpu', 'XLA:CPU compiles this')
    def test_nhwc_gradients_compile_to_canonical_convolutions_in_a_loop(self):
        canonical = 'b01f_01io->b01f'
        jax_labels = _loop_body_conv_labels('jax')
        nhwc_labels = _loop_body_conv_labels('nhwc')
        # The two 3x3 forwards, the stride-2 conv's input gradient and the three kernel
        # gradients (XLA makes the 1x1 conv's forward and input gradient dots).
        self.assertLen(nhwc_labels, 6)
        self.assertEqual(set(nhwc_labels), {canonical})
        # The reason for 'nhwc': JAX's kernel gradients stay convolutions over the batch axis in
        # a loop body, which XLA:CPU runs as a generic loop nest.
        self.assertEqual(jax_labels.count('f01b_i01o->01bf'), 3)


class UNetConvVjpTest(absltest.TestCase):
    def test_the_unet_is_the_same_function_either_way(self):
        unet_forms.assert_same_params_and_function(
            'conv_vjp', ('jax', 'nhwc'), ch=32, ch_mult=(1, 2), num_res_blocks=1,
            attn_resolutions=(4,), num_groups=8, upsample_impl='subpixel', nin_impl='conv',
        )  # fmt: skip


if __name__ == '__main__':
    absltest.main()
