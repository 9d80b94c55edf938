"""Tests for the DDPM U-Net and its layers (Ho et al. 2020, Appendix B).

Appendix B: a PixelCNN++-style U-Net with two residual blocks per resolution, group
normalization, self-attention at 16x16, dropout, and the Transformer sinusoidal embedding of t
(Vaswani et al. 2017, section 3.5) added in every residual block; 35.7M parameters for CIFAR10
and 114M for the 256x256 models. The details Appendix B leaves open (initializers, GroupNorm
epsilon, padding, resampling) follow the authors' released TensorFlow code
(`diffusion_tf/nn.py`, `diffusion_tf/models/unet.py`).

Numerics are checked against independent NumPy float64 references; the architecture against the
exact parameter counts of the original TensorFlow layout.
"""

import functools
import math
import re
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from configs import celeba_hq, cifar10, digits, lsun_church
from diffusion_jax import models
from diffusion_jax.models import layers, unet

_CONFIGS = {
    'cifar10': cifar10,
    'celeba_hq': celeba_hq,
    'lsun_church': lsun_church,
    'digits': digits,
}


def _key(seed: int) -> jax.Array:
    # rbg keys: threefry takes several times longer to compile on CPU.
    return jax.random.key(seed, impl='rbg')


def _jit(fn, **kwargs):
    # These tests' CPU time is almost all XLA compilation of small programs. On CPU, LLVM -O0
    # and the classic (non-MLIR) fusion emitters build the same HLO program (same numerics, no
    # fast-math) in a third of the time.
    options = None
    if jax.default_backend() == 'cpu':
        options = {'xla_backend_optimization_level': 0, 'xla_cpu_use_fusion_emitters': False}
    return jax.jit(fn, compiler_options=options, **kwargs)


def _normal(seed: int, shape, scale: float = 1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def _init(module, *args, **kwargs):
    """Jitted `module.init`: one compile instead of one dispatch per op."""
    return _jit(functools.partial(module.init, **kwargs))(_key(0), *args)


def _apply(module, variables, *args, rngs=None, **kwargs):
    """Jitted `module.apply`; keyword arguments (such as `train`) are static."""
    fn = functools.partial(module.apply, **kwargs)
    return _jit(lambda v, r, *a: fn(v, *a, rngs=r))(variables, rngs, *args)


# The tiny U-Net of the tests below: 8x8x3 inputs, attention at 4x4, 32 channels, 32 groups.
_TINY = unet.UNet(
    ch=32,
    out_ch=3,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(4,),
    dropout=0.1,
    num_groups=32,
)
_TINY_X = _normal(0, (2, 8, 8, 3))
_TINY_T = np.array([0, 999], np.int32)


@functools.cache
def _tiny_variables():
    """A fresh init of `_TINY`, shared so that the tests compile it once."""
    return _init(_TINY, _TINY_X, _TINY_T, train=False)


@functools.cache
def _tiny_apply_fn(train: bool):
    """Jitted `_TINY.apply(variables, x, t, rngs)`, shared so that the tests compile it once."""
    fn = functools.partial(_TINY.apply, train=train)
    return _jit(lambda v, x, t, rngs: fn(v, x, t, rngs=rngs))


def _param_shapes(model: unet.UNet, size: int, channels: int):
    init = functools.partial(model.init, train=False)
    x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    return jax.eval_shape(init, _key(0), x, t)


@functools.cache
def _config_model_and_shapes(name: str):
    """configs/<name>.py, its model and its parameter shapes (traced, never allocated)."""
    config = _CONFIGS[name].get_config()
    model = models.get_model(config)
    return config, model, _param_shapes(model, config.data.image_size, config.data.num_channels)


def _num_params(variables) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables))


def _randomize(params, seed: int, scale: float = 0.3):
    """Replaces every parameter by N(0, scale^2) noise, so zero inits do not hide any term."""
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten(
        [_normal(seed + i, leaf.shape, scale) for i, leaf in enumerate(leaves)]
    )


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _np_swish(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _np_group_norm(x: np.ndarray, scale, bias, num_groups: int, eps: float = 1e-6) -> np.ndarray:
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, num_groups, c // num_groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(b, h, w, c) * scale + bias


def _np_conv3x3_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Stride-1 3x3 convolution with TF 'SAME' padding (one zero on every side)."""
    _, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = sum(
        np.einsum('bhwi,io->bhwo', xp[:, dy : dy + h, dx : dx + w], kernel[dy, dx])
        for dy in range(3)
        for dx in range(3)
    )
    return out + bias


class ParameterCountTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ('cifar10_has_35746307', 'cifar10', 35_746_307),
        ('celeba_hq_256_has_113673219', 'celeba_hq', 113_673_219),
    )
    def test_parameter_count_matches_original_layout_exactly(self, config_name, expected):
        _, _, shapes = _config_model_and_shapes(config_name)
        self.assertEqual(_num_params(shapes), expected)

    def test_learned_variance_adds_three_output_channels_to_conv_out(self):
        config = cifar10.get_config()
        config.diffusion.model_var_type = 'learned_range'
        shapes = _param_shapes(models.get_model(config), 32, 3)
        self.assertEqual(shapes['params']['conv_out']['kernel'].shape, (3, 3, 128, 6))
        # 128 * 3 * 9 extra kernel weights and 3 extra biases.
        self.assertEqual(_num_params(shapes), 35_746_307 + 3_459)


class OutputShapeTest(parameterized.TestCase):
    @parameterized.named_parameters((name, name) for name in _CONFIGS)
    def test_output_is_float32_image_shaped_for_every_config(self, config_name):
        config, model, variables = _config_model_and_shapes(config_name)
        size, channels = config.data.image_size, config.data.num_channels
        x = jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32)
        t = jax.ShapeDtypeStruct((2,), jnp.int32)
        out = jax.eval_shape(functools.partial(model.apply, train=False), variables, x, t)
        self.assertEqual(out.shape, (2, size, size, channels))
        self.assertEqual(out.dtype, jnp.float32)

    def test_average_pool_resampling_has_no_resampling_parameters(self):
        model = _TINY.clone(resamp_with_conv=False)
        params = _param_shapes(model, 8, 3)['params']
        self.assertNotIn('down_0_downsample', params)
        self.assertNotIn('up_1_upsample', params)
        x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
        t = jax.ShapeDtypeStruct((2,), jnp.int32)
        out = jax.eval_shape(functools.partial(model.apply, train=False), {'params': params}, x, t)
        self.assertEqual(out.shape, (2, 8, 8, 3))

    @parameterized.named_parameters(('not_divisible', 7, 7), ('not_square', 8, 4))
    def test_image_must_be_square_and_divisible_by_the_downsampling(self, height, width):
        x = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
        t = jax.ShapeDtypeStruct((1,), jnp.int32)
        init = functools.partial(_TINY.init, train=False)
        with self.assertRaisesRegex(ValueError, 'divisible by 2'):
            jax.eval_shape(init, _key(0), x, t)

    def test_timesteps_must_have_shape_b(self):
        variables = _param_shapes(_TINY, 8, 3)
        x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
        for bad_shape in [(2, 1), (3,), ()]:
            t = jax.ShapeDtypeStruct(bad_shape, jnp.int32)
            with self.assertRaises(AssertionError):
                jax.eval_shape(functools.partial(_TINY.apply, train=False), variables, x, t)


class TimestepEmbeddingTest(parameterized.TestCase):
    @parameterized.named_parameters(('even_dim', 128), ('odd_dim', 7))
    def test_embedding_is_half_sin_half_cos_of_geometric_frequencies(self, dim):
        t = np.array([0, 1, 17, 500, 999])
        half = dim // 2
        freqs = np.exp(-math.log(10000) * np.arange(half, dtype=np.float64) / (half - 1))
        args = t[:, None].astype(np.float64) * freqs[None, :]
        expected = np.concatenate([np.sin(args), np.cos(args)], axis=1)
        if dim % 2:
            expected = np.pad(expected, ((0, 0), (0, 1)))
        emb = layers.get_timestep_embedding(jnp.asarray(t, jnp.int32), dim)
        self.assertEqual(emb.dtype, jnp.float32)
        self.assertEqual(emb.shape, (len(t), dim))
        # float32 arguments up to t * f = 999 carry ~1e-4 absolute error (999 * 2^-24 * few ulps).
        np.testing.assert_allclose(emb, expected, rtol=0, atol=2e-4)

    def test_iddpm_embedding_is_cos_then_sin_of_frequencies_over_half(self):
        t = np.array([0.0, 0.25, 17.0, 999.75])  # rescaled timesteps are floats
        half = 8
        freqs = np.exp(-math.log(10000) * np.arange(half, dtype=np.float64) / half)
        args = t[:, None] * freqs[None, :]
        expected = np.concatenate([np.cos(args), np.sin(args)], axis=1)
        emb = layers.get_timestep_embedding(jnp.asarray(t, jnp.float32), 2 * half, 'iddpm')
        np.testing.assert_allclose(emb, expected, rtol=0, atol=2e-4)


class AttnBlockTest(parameterized.TestCase):
    def test_attention_is_softmax_qk_over_sqrt_c_with_residual(self):
        b, h, w, c, groups = 2, 4, 4, 16, 4
        # A variance of 1e-4 makes GroupNorm's epsilon (1e-6, not PyTorch's 1e-5) visible.
        x = _normal(0, (b, h, w, c), scale=0.01)
        block = layers.AttnBlock(num_groups=groups)
        params = _randomize(_init(block, x)['params'], seed=2)
        out = _apply(block, {'params': params}, x)

        p, xn = _np(params), np.asarray(x, np.float64)
        hn = _np_group_norm(xn, p['norm']['scale'], p['norm']['bias'], groups)
        q, k, v = (hn @ p[n]['kernel'] + p[n]['bias'] for n in 'qkv')
        q, k, v = (a.reshape(b, h * w, c) for a in (q, k, v))
        logits = np.einsum('bic,bjc->bij', q, k) / np.sqrt(c)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        attended = np.einsum('bij,bjc->bic', weights, v).reshape(b, h, w, c)
        expected = xn + attended @ p['proj_out']['kernel'] + p['proj_out']['bias']
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)

    def test_heads_attend_separately_over_contiguous_channel_slices(self):
        b, h, w, c, heads, groups = 2, 4, 4, 16, 4, 4
        x = _normal(0, (b, h, w, c))
        block = layers.AttnBlock(num_heads=heads, num_groups=groups)
        params = _randomize(_init(block, x)['params'], seed=5)
        out = _apply(block, {'params': params}, x)

        p, xn = _np(params), np.asarray(x, np.float64)
        hn = _np_group_norm(xn, p['norm']['scale'], p['norm']['bias'], groups)
        q, k, v = (hn @ p[n]['kernel'] + p[n]['bias'] for n in 'qkv')
        d = c // heads
        attended = np.zeros((b, h * w, c))
        for n in range(heads):
            part = slice(n * d, (n + 1) * d)
            qn, kn, vn = (a.reshape(b, h * w, c)[..., part] for a in (q, k, v))
            logits = np.einsum('bic,bjc->bij', qn, kn) / np.sqrt(d)
            weights = np.exp(logits - logits.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            attended[..., part] = np.einsum('bij,bjc->bic', weights, vn)
        attended = attended.reshape(b, h, w, c)
        expected = xn + attended @ p['proj_out']['kernel'] + p['proj_out']['bias']
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


class ResnetBlockTest(parameterized.TestCase):
    def test_scale_shift_block_modulates_the_second_group_norm(self):
        b, s, c, groups = 2, 4, 8, 4
        x = _normal(0, (b, s, s, c))
        temb = _normal(1, (b, 12))
        block = layers.ResnetBlock(num_groups=groups, scale_shift=True, epsilon=1e-5)
        params = _randomize(_init(block, x, temb, train=False)['params'], seed=4)
        out = _apply(block, {'params': params}, x, temb, train=False)

        p, xn = _np(params), np.asarray(x, np.float64)
        self.assertEqual(p['temb_proj']['kernel'].shape, (12, 2 * c))
        norm = functools.partial(_np_group_norm, num_groups=groups, eps=1e-5)
        hn = _np_swish(norm(xn, p['norm1']['scale'], p['norm1']['bias']))
        hn = _np_conv3x3_same(hn, p['conv1']['kernel'], p['conv1']['bias'])
        emb = _np_swish(np.asarray(temb, np.float64)) @ p['temb_proj']['kernel']
        emb = (emb + p['temb_proj']['bias'])[:, None, None, :]
        scale, shift = emb[..., :c], emb[..., c:]
        hn = _np_swish(norm(hn, p['norm2']['scale'], p['norm2']['bias']) * (1 + scale) + shift)
        hn = _np_conv3x3_same(hn, p['conv2']['kernel'], p['conv2']['bias'])
        np.testing.assert_allclose(out, xn + hn, rtol=1e-4, atol=1e-4)

    def test_resnet_block_matches_numpy_with_temb_added_after_conv1(self):
        b, s, c_in, c_out, groups = 2, 4, 8, 16, 4
        x = _normal(0, (b, s, s, c_in))
        temb = _normal(1, (b, 12))
        block = layers.ResnetBlock(out_ch=c_out, dropout=0.5, num_groups=groups)
        variables = _init(block, x, temb, train=False)
        params = _randomize(variables['params'], seed=3)
        out = _apply(block, {'params': params}, x, temb, train=False)

        p, xn = _np(params), np.asarray(x, np.float64)
        hn = _np_swish(_np_group_norm(xn, p['norm1']['scale'], p['norm1']['bias'], groups))
        hn = _np_conv3x3_same(hn, p['conv1']['kernel'], p['conv1']['bias'])
        proj = _np_swish(np.asarray(temb, np.float64)) @ p['temb_proj']['kernel']
        hn = hn + (proj + p['temb_proj']['bias'])[:, None, None, :]
        hn = _np_swish(_np_group_norm(hn, p['norm2']['scale'], p['norm2']['bias'], groups))
        hn = _np_conv3x3_same(hn, p['conv2']['kernel'], p['conv2']['bias'])
        skip = xn @ p['nin_shortcut']['kernel'] + p['nin_shortcut']['bias']
        np.testing.assert_allclose(out, skip + hn, rtol=1e-4, atol=1e-4)


class AutoOptionTest(parameterized.TestCase):
    @parameterized.parameters(
        # (key, 'auto' on the CPU, on GPUs and TPUs, a named choice, an unknown name)
        ('conv_impl', 'xla', 'xla', 'im2col', 'fft'),
        ('upsample_impl', 'subpixel', 'repeat', 'repeat', 'nearest'),
        ('nin_impl', 'conv', 'dense', 'dense', 'einsum'),
        ('conv_vjp', 'nhwc', 'jax', 'jax', 'nchw'),
    )
    def test_auto_resolves_per_platform(self, key, cpu, accelerators, named, unknown):
        self.assertEqual(models.resolve(key, 'auto', 'cpu'), cpu)
        self.assertEqual(models.resolve(key, 'auto', 'gpu'), accelerators)
        self.assertEqual(models.resolve(key, 'auto', 'tpu'), accelerators)
        self.assertEqual(models.resolve(key, named, 'cpu'), named)
        with self.assertRaisesRegex(ValueError, f'config.model.{key}'):
            models.resolve(key, unknown, 'cpu')


class ConvImplTest(parameterized.TestCase):
    @parameterized.product(
        impl=('im2col', 'shifted', 'winograd'),
        case=(
            (1, 'SAME', 4),  # a 4x4 map
            (1, 'SAME', 8),  # the stride-1 convs
            (2, 'SAME', 8),  # the original's downsample: padded at the bottom and right only
            (2, ((1, 1), (1, 1)), 8),  # Improved DDPM's downsample
            (1, 'SAME', 5),  # an odd size
        ),
    )
    def test_matmul_conv_is_xla_conv_with_the_same_params(self, impl, case):
        strides, padding, size = case
        x = _normal(0, (2, size, size, 6))
        kwargs = dict(strides=strides, padding=padding, dtype=jnp.float32, param_dtype=jnp.float32)
        reference = layers.conv3x3(5, name='conv', impl='xla', **kwargs)
        ours = layers.conv3x3(5, name='conv', impl=impl, **kwargs)
        params = _init(reference, x)
        self.assertEqual(jax.tree.map(np.shape, _init(ours, x)), jax.tree.map(np.shape, params))
        jax.tree.map(np.testing.assert_array_equal, _init(ours, x), params)  # the same init
        params = _randomize(params['params'], seed=1, scale=1.0)
        out, expected = (_apply(m, {'params': params}, x) for m in (ours, reference))
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
        # The gradients, as a train step takes them, agree as well.
        cotangent = _normal(2, expected.shape)

        def grads(module):
            def f(p, x):
                return jnp.sum(module.apply({'params': p}, x) * cotangent)

            return jax.grad(f, argnums=(0, 1))(params, x)

        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
            grads(ours),
            grads(reference),
        )


class ResampleTest(parameterized.TestCase):
    def test_stride2_downsample_pads_only_bottom_right_like_tf_same(self):
        x = _normal(0, (2, 8, 8, 4))
        block = layers.Downsample(with_conv=True)
        params = _init(block, x)['params']
        out = _apply(block, {'params': params}, x)

        def conv(padding):
            y = jax.lax.conv_general_dilated(
                x,
                params['conv']['kernel'],
                (2, 2),
                padding,
                dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
            )
            return y + params['conv']['bias']

        self.assertEqual(out.shape, (2, 4, 4, 4))
        np.testing.assert_allclose(out, conv(((0, 1), (0, 1))), rtol=1e-5, atol=1e-5)
        self.assertGreater(float(jnp.max(jnp.abs(out - conv(((1, 1), (1, 1)))))), 1e-2)

    def test_symmetric_downsample_pads_one_on_every_side_like_pytorch(self):
        x = np.asarray(_normal(0, (1, 6, 6, 2)), np.float64)
        block = layers.Downsample(with_conv=True, padding='symmetric')
        params = _np(_init(block, jnp.asarray(x, jnp.float32))['params'])
        out = _apply(block, {'params': params}, jnp.asarray(x, jnp.float32))
        xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        kernel = params['conv']['kernel']
        expected = sum(  # output (i, j) reads padded rows 2i..2i+2 and columns 2j..2j+2
            np.einsum('bhwi,io->bhwo', xp[:, dy : dy + 6 : 2, dx : dx + 6 : 2], kernel[dy, dx])
            for dy in range(3)
            for dx in range(3)
        )
        np.testing.assert_allclose(out, expected + params['conv']['bias'], rtol=1e-5, atol=1e-5)

    def test_downsample_without_conv_is_2x2_average(self):
        x = np.random.default_rng(0).normal(size=(2, 6, 6, 3))
        out = layers.Downsample(with_conv=False).apply({}, jnp.asarray(x, jnp.float32))
        expected = x.reshape(2, 3, 2, 3, 2, 3).mean(axis=(2, 4))
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)

    def test_upsample_is_tf_align_corners_nearest_neighbour(self):
        s = 5
        x = np.random.default_rng(0).normal(size=(1, s, s, 2))
        out = layers.Upsample(with_conv=False).apply({}, jnp.asarray(x, jnp.float32))
        # TF1 nearest resize with align_corners=True reads source index round(i (in-1)/(out-1)).
        src = np.floor(np.arange(2 * s) * (s - 1) / (2 * s - 1) + 0.5).astype(int)
        np.testing.assert_allclose(out, x[:, src][:, :, src], rtol=1e-6, atol=1e-6)


class InitializationTest(parameterized.TestCase):
    def test_zero_initialized_output_conv_makes_fresh_model_output_near_zero(self):
        variables = _tiny_variables()
        out = _tiny_apply_fn(False)(variables, _TINY_X, _TINY_T, None)
        # Each conv_out weight has variance 1e-10 * 2 / (fan_in + fan_out), so an output over
        # 9 * 32 inputs h = swish(GroupNorm(.)) has std ~ sqrt(2e-10 * E[h^2]) ~ 1e-5; 1e-4 is
        # ~10 std. With init scale 1 the same outputs would be O(1).
        self.assertLess(float(jnp.max(jnp.abs(out))), 1e-4)
        self.assertTrue(np.all(variables['params']['conv_out']['bias'] == 0))

    def test_conv_kernel_is_fan_avg_uniform(self):
        params = _tiny_variables()['params']
        kernel = np.asarray(params['down_1_block_0']['conv1']['kernel'], np.float64)
        self.assertEqual(kernel.shape, (3, 3, 32, 64))
        fan_avg = (9 * 32 + 9 * 64) / 2
        limit = math.sqrt(3.0 / fan_avg)
        self.assertLessEqual(np.abs(kernel).max(), limit)
        # 18,432 samples: the variance estimate's relative std is ~0.7 %, so 5 % is ~7 std.
        np.testing.assert_allclose(kernel.var(), limit**2 / 3, rtol=0.05)
        self.assertTrue(np.all(params['down_1_block_0']['conv1']['bias'] == 0))


class DropoutTest(parameterized.TestCase):
    def test_dropout_is_active_only_in_train_mode(self):
        # conv2 (right after the dropout) and conv_out start near zero, which would hide it.
        leaves, treedef = jax.tree_util.tree_flatten_with_path(_tiny_variables())
        perturbed = []
        for seed, (path, leaf) in enumerate(leaves):
            names = [getattr(k, 'key', None) for k in path]
            if {'conv2', 'conv_out'} & set(names) and names[-1] == 'kernel':
                leaf = _normal(seed, leaf.shape, 0.1)
            perturbed.append(leaf)
        variables = treedef.unflatten(perturbed)

        def apply(seed, train):
            rngs = {'dropout': _key(seed)}
            return _tiny_apply_fn(train)(variables, _TINY_X, _TINY_T, rngs)

        np.testing.assert_array_equal(apply(1, train=False), apply(2, train=False))
        difference = jnp.max(jnp.abs(apply(1, train=True) - apply(2, train=True)))
        self.assertGreater(float(difference), 1e-3)


class CompileTest(parameterized.TestCase):
    def test_jit_and_grad_work_and_apply_compiles_once(self):
        params = _tiny_variables()['params']

        @chex.assert_max_traces(n=1)
        def apply(params, x, t):
            return _TINY.apply({'params': params}, x, t, train=False)

        jit_apply = _jit(apply)
        out1 = jit_apply(params, _TINY_X, _TINY_T)
        out2 = jit_apply(params, _TINY_X + 1.0, _TINY_T + 1)  # new values, the same program
        self.assertEqual(out2.shape, _TINY_X.shape)  # an eps prediction: the image's shape
        self.assertFalse(np.array_equal(out1, out2))

        def loss_fn(params):
            rngs = {'dropout': _key(1)}
            out = _TINY.apply({'params': params}, _TINY_X, _TINY_T, train=True, rngs=rngs)
            return jnp.mean((out - _TINY_X) ** 2)

        grads = _jit(jax.grad(loss_fn))(params)
        chex.assert_trees_all_equal_structs(grads, params)
        chex.assert_tree_all_finite(grads)
        # The output conv is near zero, but its own gradient is not.
        self.assertGreater(float(jnp.max(jnp.abs(grads['conv_out']['kernel']))), 0.0)


class RematTest(parameterized.TestCase):
    def test_remat_keeps_parameters_outputs_and_gradients_and_is_really_used(self):
        remat = _TINY.clone(remat=True)
        params = _tiny_variables()['params']
        chex.assert_trees_all_equal(_init(remat, _TINY_X, _TINY_T, train=False)['params'], params)
        params = _randomize(params, 3, 0.1)  # no near-zero init hides a block
        rngs = {'dropout': _key(1)}  # dropout on: the recomputation must draw the same mask

        def loss(module):
            def fn(p):
                out = module.apply({'params': p}, _TINY_X, _TINY_T, train=True, rngs=rngs)
                return jnp.mean((out - _TINY_X) ** 2), out

            return fn

        (plain_loss, plain_out), plain_grads = _jit(jax.value_and_grad(loss(_TINY), has_aux=True))(
            params
        )
        (remat_loss, remat_out), remat_grads = _jit(jax.value_and_grad(loss(remat), has_aux=True))(
            params
        )
        np.testing.assert_allclose(remat_out, plain_out, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
        leaves = jax.tree.leaves(plain_grads)
        scale = max(float(jnp.abs(g).max()) for g in leaves)
        for got, want in zip(jax.tree.leaves(remat_grads), leaves, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * scale)
        # One remat region per residual block (2 down, 2 mid, 4 up), attention block (1 down,
        # 1 mid, 2 up), Downsample, Upsample and the output head: 15.
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: loss(remat)(p)[0]))(params))
        plain = str(jax.make_jaxpr(jax.grad(lambda p: loss(_TINY)(p)[0]))(params))
        regions = r'= (?:remat2|checkpoint)\['  # the primitive's name in older and newer JAX
        self.assertEmpty(re.findall(regions, plain))
        self.assertLen(re.findall(regions, jaxpr), 15)

    def test_concat_channels_is_concatenate_with_the_same_gradients(self):
        a, b = _normal(11, (2, 4, 4, 3)), _normal(12, (2, 4, 4, 5))
        cotangent = _normal(13, (2, 4, 4, 8))
        out, vjp = jax.vjp(layers.concat_channels, a, b)
        want_out, want_vjp = jax.vjp(lambda a, b: jnp.concatenate([a, b], axis=-1), a, b)
        chex.assert_trees_all_equal(out, want_out)
        chex.assert_trees_all_equal(jax.jit(vjp)(cotangent), want_vjp(cotangent))
        chex.assert_trees_all_equal(vjp(cotangent), (cotangent[..., :3], cotangent[..., 3:]))

    def test_remat_keeps_only_block_inputs_for_the_backward_pass(self):
        # What JAX saves from the forward pass for the backward pass, before any compiler:
        # without remat every intermediate (GroupNorm statistics, swish, the [h, skip]
        # concatenations, the upsampled maps), with remat the inputs of the blocks only, of at
        # most ch * max(ch_mult) = 64 channels here (no concatenation of 96 or 128).
        from jax._src import ad_checkpoint  # saved_residuals: print_saved_residuals' data

        params = _tiny_variables()['params']

        def saved(module):
            def loss(p):
                return jnp.mean(module.apply({'params': p}, _TINY_X, _TINY_T, train=False) ** 2)

            residuals = ad_checkpoint.saved_residuals(loss, params)
            return [aval for aval, source in residuals if 'argument' not in source]

        plain, remat = saved(_TINY), saved(_TINY.clone(remat=True))
        nbytes = lambda avals: sum(a.size * a.dtype.itemsize for a in avals)  # noqa: E731
        self.assertIn(96, {a.shape[-1] for a in plain if a.ndim == 4})  # a concatenation
        self.assertLessEqual(max(a.shape[-1] for a in remat if a.ndim == 4), 64)
        self.assertLess(nbytes(remat), 0.15 * nbytes(plain))  # 9.2% measured


class RescaleTimestepsTest(parameterized.TestCase):
    def test_the_network_embeds_t_times_1000_over_t(self):
        # Improved DDPM's rescale_timesteps: the same network, fed t * 1000 / T.
        scaled = _TINY.clone(timestep_scale=1000.0 / 250)
        params = _randomize(_tiny_variables()['params'], 5, 0.1)
        t = np.array([3, 200], np.int32)
        got = _apply(scaled, {'params': params}, _TINY_X, t, train=False)
        want = _apply(_TINY, {'params': params}, _TINY_X, t * 4.0, train=False)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        plain = _apply(_TINY, {'params': params}, _TINY_X, t, train=False)
        self.assertGreater(float(jnp.max(jnp.abs(got - plain))), 1e-3)

    def test_get_model_scales_by_the_configs_t_only_when_asked(self):
        config = digits.get_config()
        self.assertEqual(models.get_model(config).timestep_scale, 1.0)
        config.model.rescale_timesteps = True
        self.assertEqual(models.get_model(config).timestep_scale, 1000.0 / 250)


class DtypeTest(parameterized.TestCase):
    def test_bfloat16_compute_keeps_float32_params_and_output(self):
        model = _TINY.clone(dtype=jnp.bfloat16, param_dtype=jnp.float32)
        variables = _param_shapes(model, 8, 3)
        for leaf in jax.tree.leaves(variables):
            self.assertEqual(leaf.dtype, jnp.float32)
        apply = functools.partial(model.apply, train=False)
        self.assertEqual(jax.eval_shape(apply, variables, _TINY_X, _TINY_T).dtype, jnp.float32)
        # The convolutions themselves run in bfloat16.
        jaxpr = jax.make_jaxpr(apply)(variables, _TINY_X, _TINY_T)
        conv_dtypes = {
            eqn.invars[0].aval.dtype
            for eqn in jaxpr.eqns
            if eqn.primitive.name == 'conv_general_dilated'
        }
        self.assertEqual(conv_dtypes, {jnp.dtype(jnp.bfloat16)})

    @parameterized.named_parameters(
        ('cpu_bf16', 'cpu', None, jnp.bfloat16, 256, None),
        ('h100_bf16', 'gpu', '9.0', jnp.bfloat16, 256, 'cudnn'),
        ('h100_f32', 'gpu', '9.0', jnp.float32, 256, None),
        ('h100_head_too_wide', 'gpu', '9.0', jnp.bfloat16, 512, None),
        ('a100_head_256', 'gpu', '8.0', jnp.float16, 256, None),
        ('a100_head_128', 'gpu', '8.0', jnp.float16, 128, 'cudnn'),
        ('v100', 'gpu', '7.0', jnp.bfloat16, 128, None),
        ('head_not_multiple_of_8', 'gpu', '9.0', jnp.bfloat16, 12, None),
        ('rocm_has_no_capability', 'gpu', 'rocm', jnp.bfloat16, 128, None),
    )
    def test_attention_uses_cudnn_only_where_it_supports_the_call(
        self, backend, capability, dtype, head_dim, expected
    ):
        class FakeDevice:
            def __init__(self):
                if capability != 'rocm':
                    self.compute_capability = capability

        with (
            mock.patch.object(jax, 'default_backend', return_value=backend),
            mock.patch.object(jax, 'devices', return_value=[FakeDevice()]),
        ):
            max_head_dim = layers.cudnn_max_head_dim()
        # The per-call choice is pure: it needs no device once the machine's limit is known.
        self.assertEqual(layers.attention_implementation(dtype, head_dim, max_head_dim), expected)

    def test_the_answer_for_a_given_device_asks_no_other(self):
        # E.g. a compile-only GPU on a machine without one (`benchmarks.gpu_compile`).
        def no_device_query(*args, **kwargs):
            raise AssertionError("queried this machine's devices")

        cases = (('gpu', '9.0', 256), ('gpu', '8.6', 128), ('gpu', '7.5', None), ('cpu', '', None))
        for platform, capability, expected in cases:
            device = mock.Mock(platform=platform, compute_capability=capability)
            with (
                mock.patch.object(jax, 'default_backend', side_effect=no_device_query),
                mock.patch.object(jax, 'devices', side_effect=no_device_query),
            ):
                self.assertEqual(layers.cudnn_max_head_dim(device), expected, platform + capability)
                config = digits.get_config()
                self.assertEqual(models.get_model(config, device).cudnn_max_head_dim, expected)

    def test_get_model_asks_the_devices_once_and_tracing_never_does(self):
        config = digits.get_config()
        config.model.dtype = 'bfloat16'
        config.model.attn_resolutions = [4]  # 64-channel attention at 4x4, plus the middle one
        with (
            mock.patch.object(jax, 'default_backend', return_value='gpu'),
            mock.patch.object(jax, 'devices', return_value=[mock.Mock(compute_capability='9.0')]),
        ):
            model = models.get_model(config)
        self.assertEqual(model.cudnn_max_head_dim, 256)

        implementations = []
        real_attention = jax.nn.dot_product_attention

        def recording_attention(*args, implementation=None, **kwargs):
            implementations.append(implementation)
            return real_attention(*args, **kwargs)  # XLA's: this machine may have no cuDNN

        def no_device_query(*args, **kwargs):
            raise AssertionError('the model queried the devices while it was traced')

        with (
            mock.patch.object(jax, 'default_backend', side_effect=no_device_query),
            mock.patch.object(jax, 'devices', side_effect=no_device_query),
            mock.patch.object(jax.nn, 'dot_product_attention', side_effect=recording_attention),
        ):
            shapes = _param_shapes(model, 8, 1)
        # num_res_blocks = 1: one attention block at 4x4 on the down path, two on the up path
        # (num_res_blocks + 1), one in the middle.
        self.assertEqual(implementations, ['cudnn'] * 4)
        # The choice is a plain attribute, not a parameter: checkpoints load either way.
        chex.assert_trees_all_equal_shapes_and_dtypes(
            shapes, _param_shapes(model.clone(cudnn_max_head_dim=None), 8, 1)
        )


class GetModelTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ('fixedlarge', 'fixedlarge', 3),
        ('fixedsmall', 'fixedsmall', 3),
        ('learned', 'learned', 6),
        ('learned_range', 'learned_range', 6),
    )
    def test_out_ch_doubles_for_learned_variances(self, model_var_type, out_ch):
        config = cifar10.get_config()
        config.diffusion.model_var_type = model_var_type
        self.assertEqual(models.get_model(config).out_ch, out_ch)

    def test_unpacks_config_into_plain_fields(self):
        config = digits.get_config()
        config.model.ch_mult = [1, 2]
        config.model.attn_resolutions = [4]
        config.model.dtype = 'bfloat16'
        model = models.get_model(config)
        self.assertIsInstance(model, unet.UNet)
        self.assertEqual(model.out_ch, 1)
        self.assertIsInstance(model.ch_mult, tuple)
        self.assertEqual(model.ch_mult, (1, 2))
        self.assertEqual(model.attn_resolutions, (4,))
        self.assertEqual(model.dtype, jnp.bfloat16)
        self.assertEqual(model.param_dtype, jnp.float32)

    def test_unknown_model_name_raises_naming_the_choices(self):
        config = cifar10.get_config()
        config.model.name = 'resnet'
        with self.assertRaisesRegex(ValueError, r"unknown model 'resnet'.*ddpm_unet"):
            models.get_model(config)

    def test_unknown_dtype_raises(self):
        config = cifar10.get_config()
        config.model.dtype = 'float8'
        with self.assertRaisesRegex(ValueError, 'float32'):
            models.get_model(config)


if __name__ == '__main__':
    absltest.main()
