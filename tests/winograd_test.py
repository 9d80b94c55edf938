"""models.winograd against a direct convolution computed tap by tap in float64 numpy
(`tests.np_conv`)."""

import flax.linen as nn
import jax
import numpy as np
from absl.testing import absltest, parameterized

from diffusion_jax.models import layers, winograd
from tests import np_conv


class WinogradTest(parameterized.TestCase):
    @parameterized.parameters(
        (2, 8, 8, 3, 5),  # the digits network's map
        (4, 4, 4, 16, 8),  # 2 x 2 tiles
        (3, 6, 10, 7, 2),  # not square
        (2, 5, 7, 3, 4),  # odd sizes: padded to even, cropped back
        (1, 1, 1, 2, 2),  # one pixel
    )
    def test_conv_and_its_gradients_match_a_direct_convolution(self, b, h, w, cin, cout):
        rng = np.random.default_rng(h * w + cin)
        x = rng.standard_normal((b, h, w, cin))
        kernel = rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)
        dy = rng.standard_normal((b, h, w, cout))
        f32 = [a.astype(np.float32) for a in (x, kernel, dy)]
        y, vjp = jax.vjp(winograd.conv3x3, f32[0], f32[1])
        dx, dkernel = vjp(f32[2])
        self.assertEqual(y.shape, (b, h, w, cout))
        # Float32 rounding of sums of up to 9 Cin terms of order 1 (measured: 2e-6 at most).
        np.testing.assert_allclose(y, np_conv.conv3x3(x, kernel), rtol=1e-5, atol=1e-5)
        expected_dx, expected_dkernel = np_conv.conv3x3_grads(x, kernel, dy)
        np.testing.assert_allclose(dx, expected_dx, rtol=1e-5, atol=1e-5)
        # The kernel gradient sums B H W terms of order 1.
        np.testing.assert_allclose(dkernel, expected_dkernel, rtol=1e-5, atol=1e-4)

    def test_a_strided_winograd_module_is_refused_and_conv3x3_falls_back_to_xla(self):
        x = np.zeros((1, 4, 4, 2), np.float32)
        module = layers.Conv3x3(3, strides=2, impl='winograd')
        with self.assertRaisesRegex(ValueError, 'stride 1 and padding 1'):
            module.init(jax.random.key(0), x)
        fallback = layers.conv3x3(3, name='conv', strides=2, impl='winograd', dtype=np.float32,
                                  param_dtype=np.float32)  # fmt: skip
        self.assertIsInstance(fallback, nn.Conv)

    def test_a_kernel_for_other_channels_is_refused(self):
        with self.assertRaisesRegex(ValueError, 'kernel of shape'):
            winograd.conv3x3(np.zeros((1, 4, 4, 3), np.float32), np.zeros((3, 3, 2, 1), np.float32))


if __name__ == '__main__':
    absltest.main()
