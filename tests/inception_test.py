"""The FID Inception network with random weights: size, shapes, resize, sharding, weight files."""

import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap

import jax
import numpy as np
import pytest
from absl.testing import absltest, parameterized
from flax import traverse_util

from diffusion_jax.evaluation import convert_inception, inception

REPO = pathlib.Path(__file__).resolve().parents[1]


def _bilinear_reference(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """torch's interpolate(mode='bilinear', align_corners=False) on [H, W], in float64 loops."""
    h, w = x.shape
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            # Half-pixel centres; source coordinates below 0 are clamped to 0.
            sy = max((i + 0.5) * h / out_h - 0.5, 0.0)
            sx = max((j + 0.5) * w / out_w - 0.5, 0.0)
            y0, x0 = min(int(sy), h - 1), min(int(sx), w - 1)
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            dy, dx = sy - y0, sx - x0
            out[i, j] = (1 - dy) * ((1 - dx) * x[y0, x0] + dx * x[y0, x1]) + dy * (
                (1 - dx) * x[y1, x0] + dx * x[y1, x1]
            )
    return out


def _torch_style_state_dict(params) -> dict[str, np.ndarray]:
    """The inverse of the converter, written independently: torch names and layouts."""
    state = {}
    for path, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(value)
        *module, leaf = path
        name = '.'.join(module)
        if leaf == 'kernel' and module[-1] == 'conv':
            state[f'{name}.weight'] = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        elif module == ['fc']:
            state['fc.weight' if leaf == 'kernel' else 'fc.bias'] = (
                value.T if value.ndim == 2 else value
            )
        else:
            torch_leaf = {
                'scale': 'weight',
                'bias': 'bias',
                'mean': 'running_mean',
                'var': 'running_var',
            }
            state[f'{name}.{torch_leaf[leaf]}'] = value
            if leaf == 'var':
                state[f'{name}.num_batches_tracked'] = np.array(0)
    return state


class InceptionTest(parameterized.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.params = inception.random_params(jax.random.key(0))

    def test_the_network_has_torchvisions_inception_v3_size_with_1008_classes(self):
        # torchvision's inception_v3 has 27,161,264 parameters with its auxiliary classifier
        # (3,326,696) and 1000 classes; the FID graph has no aux head and 1008 classes (+16,392).
        # Running BatchNorm statistics are buffers in torch, parameters here: counted apart.
        flat = traverse_util.flatten_dict(self.params)
        stats = sum(v.size for k, v in flat.items() if k[-1] in ('mean', 'var'))
        learned = sum(v.size for k, v in flat.items() if k[-1] not in ('mean', 'var'))
        self.assertEqual(learned, 27_161_264 - 3_326_696 + 16_392)
        scales = sum(v.size for k, v in flat.items() if k[-1] == 'scale')
        self.assertEqual(stats, 2 * scales)

    @parameterized.parameters((32, 32), (8, 8), (320, 300))
    @pytest.mark.slow  # the Inception network
    def test_features_and_logits_have_the_standard_shapes(self, h, w):
        images = np.random.default_rng(0).integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        pool, logits = inception.make_feature_fn(self.params)(images)
        self.assertEqual(pool.shape, (2, inception.NUM_FEATURES))
        self.assertEqual(logits.shape, (2, inception.NUM_LOGITS))
        self.assertEqual((pool.dtype, logits.dtype), (np.float32, np.float32))
        self.assertTrue(np.all(np.asarray(pool) >= 0))  # the mean of ReLU outputs
        self.assertTrue(np.all(np.isfinite(np.asarray(logits))))

    @parameterized.parameters(((5, 7), (11, 13)), ((12, 10), (5, 4)), ((4, 4), (299, 299)))
    def test_resize_is_torchs_bilinear_with_half_pixel_centres(self, size_in, size_out):
        x = np.random.default_rng(1).uniform(size=size_in)
        got = inception.resize_bilinear(x[None, :, :, None], *size_out)
        expected = _bilinear_reference(x, *size_out)
        np.testing.assert_allclose(np.asarray(got)[0, :, :, 0], expected, atol=1e-5)

    def test_preprocess_resizes_to_299_and_scales_x_over_255_to_minus_one_one(self):
        images = np.random.default_rng(2).integers(0, 256, (1, 6, 5, 3), dtype=np.uint8)
        images[0, 0, 0] = (0, 255, 51)
        got = np.asarray(inception.preprocess(images))
        self.assertEqual(got.shape, (1, 299, 299, 3))
        # The top-left output pixel samples the input's corner (clamped).
        np.testing.assert_allclose(got[0, 0, 0], [-1.0, 1.0, -0.6], atol=1e-6)
        expected = 2.0 * _bilinear_reference(images[0, :, :, 1] / 255.0, 299, 299) - 1.0
        np.testing.assert_allclose(got[0, :, :, 1], expected, atol=1e-5)

    def test_wrong_inputs_are_refused(self):
        with self.assertRaisesRegex(ValueError, 'expected uint8'):
            inception.make_feature_fn(self.params)(np.zeros((1, 8, 8, 3), np.float32))

    def test_random_params_differ_within_each_batchnorm(self):
        # Otherwise a converter that swapped weight/running_var or bias/running_mean would
        # round-trip unnoticed.
        bn = self.params['Mixed_5b']['branch1x1']['bn']
        values = [np.asarray(bn[k]) for k in ('scale', 'bias', 'mean', 'var')]
        for i in range(4):
            for j in range(i):
                self.assertFalse(np.array_equal(values[i], values[j]))

    def test_weights_round_trip_through_the_converter(self):
        state = _torch_style_state_dict(self.params)
        self.assertIn('Mixed_7c.branch_pool.conv.weight', state)
        self.assertEqual(state['Conv2d_1a_3x3.conv.weight'].shape, (32, 3, 3, 3))
        self.assertEqual(state['Mixed_6b.branch7x7_2.conv.weight'].shape, (128, 128, 1, 7))
        self.assertEqual(state['fc.weight'].shape, (1008, 2048))
        flat = convert_inception.convert_state_dict(state)
        expected = traverse_util.flatten_dict(self.params, sep='/')
        self.assertEqual(set(flat), set(expected))
        for key, value in expected.items():
            self.assertEqual(flat[key].dtype, np.float32, key)
            np.testing.assert_array_equal(flat[key], value, err_msg=key)

    @pytest.mark.slow  # a subprocess
    def test_the_converter_command_writes_a_file_that_load_params_reads(self):
        state = _torch_style_state_dict(self.params)
        expected = traverse_util.flatten_dict(self.params, sep='/')
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = os.path.join(tmp, 'state.npz'), os.path.join(tmp, 'out', 'w.npz')
            np.savez(src, **state)
            self.assertEqual(convert_inception.main(['convert_inception', src, dst]), 0)
            self.assertEqual(os.listdir(os.path.dirname(dst)), ['w.npz'])  # no temporary left
            with open(src, 'rb') as g:
                source_sha256 = hashlib.sha256(g.read()).hexdigest()
            with np.load(dst) as f:
                self.assertEqual(str(f['_source_sha256']), source_sha256)
                self.assertEqual(int(f['_format']), inception.FORMAT_VERSION)
            # Not the official source file: refused by default, accepted with a warning by ''.
            with self.assertRaisesRegex(inception.InceptionWeightsError, source_sha256):
                inception.load_params(dst)
            with self.assertLogs(level='WARNING') as logs:
                loaded = inception.load_params(dst, source_sha256='')
            self.assertIn('will not be comparable', logs.output[0])
            self.assertEqual(
                inception.load_params(dst, source_sha256=source_sha256[:12]).keys(), loaded.keys()
            )
            for key, value in traverse_util.flatten_dict(loaded, sep='/').items():
                np.testing.assert_array_equal(value, expected[key], err_msg=key)

    def test_unknown_missing_or_misshapen_tensors_are_refused(self):
        state = _torch_style_state_dict(self.params)
        error = convert_inception.ConversionError
        with self.assertRaisesRegex(error, 'AuxLogits.fc.weight'):
            convert_inception.convert_state_dict({**state, 'AuxLogits.fc.weight': np.zeros(3)})
        with self.assertRaisesRegex(error, 'Mixed_6a.branch3x3.conv.weight'):
            bad = {**state, 'Mixed_6a.branch3x3.conv.weight': np.zeros((384, 288))}
            convert_inception.convert_state_dict(bad)
        missing = dict(state)
        del missing['Mixed_7b.branch3x3_2a.bn.running_var']
        with self.assertRaisesRegex(error, r'Mixed_7b/branch3x3_2a/bn/var .*missing'):
            convert_inception.convert_state_dict(missing)
        state['fc.bias'] = np.zeros(1000, np.float32)
        with self.assertRaisesRegex(error, r'fc/bias: shape \(1000,\)'):
            convert_inception.convert_state_dict(state)

    def test_load_params_names_the_fix_or_the_bad_key(self):
        with self.assertRaisesRegex(inception.InceptionWeightsError, 'convert_inception'):
            inception.load_params('/nonexistent/inception.npz')
        flat = dict(traverse_util.flatten_dict(self.params, sep='/'))
        error = inception.InceptionWeightsError

        def write(path, arrays, **meta):
            np.savez(path, **meta, **arrays)

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, 'w.npz')
            good = {
                '_format': np.int32(inception.FORMAT_VERSION),
                '_source_sha256': np.str_(inception.OFFICIAL_SHA256_PREFIX + '0' * 56),
                '_params_sha256': np.str_(inception.params_sha256(flat)),
            }
            write(path, flat, **good)
            self.assertEqual(
                set(traverse_util.flatten_dict(inception.load_params(path), sep='/')), set(flat)
            )
            write(path, flat, **{**good, '_format': np.int32(inception.FORMAT_VERSION + 1)})
            with self.assertRaisesRegex(error, 'format version'):
                inception.load_params(path)
            # One changed weight: the stored checksum no longer matches.
            damaged = {**flat, 'fc/bias': flat['fc/bias'] + 1e-3}
            write(path, damaged, **good)
            with self.assertRaisesRegex(error, 'is damaged'):
                inception.load_params(path)
            write(path, flat, **{**good, '_source_sha256': np.str_('ab' * 32)})
            with self.assertRaisesRegex(error, 'SHA-256 abab.*not from the expected 6726825d'):
                inception.load_params(path)
            bad = {**flat, 'Mixed_5b/branch1x1/conv/kernel': np.zeros((1, 1, 192, 63), np.float32)}
            write(path, bad, **{**good, '_params_sha256': np.str_(inception.params_sha256(bad))})
            with self.assertRaisesRegex(error, 'Mixed_5b/branch1x1/conv/kernel has shape'):
                inception.load_params(path)
            with open(path, 'wb') as f:
                f.write(b'PK\x03\x04 truncated')
            with self.assertRaisesRegex(error, 'cannot read'):
                inception.load_params(path)

    @pytest.mark.slow  # a subprocess
    def test_the_converter_command_fails_in_one_line_on_a_missing_file(self):
        proc = subprocess.run(
            [sys.executable, '-m', 'diffusion_jax.evaluation.convert_inception', '/no/x.pth', 'y'],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(proc.returncode, 2)
        self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
        self.assertTrue(proc.stderr.startswith('error: '), proc.stderr)
        self.assertIn('/no/x.pth', proc.stderr)


_SHARDED = textwrap.dedent("""
    import jax, numpy as np
    from diffusion_jax import parallel
    from diffusion_jax.evaluation import inception
    assert jax.device_count() == 2
    params = inception.random_params(jax.random.key(0))
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    sharded_fn = inception.make_feature_fn(params, mesh=parallel.create_mesh())
    sharded = sharded_fn(images)
    single = inception.make_feature_fn(params)(images)
    assert len(sharded[0].sharding.device_set) == 2
    for a, b in zip(sharded, single):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    try:
        sharded_fn(images[:3])
        raise AssertionError('a batch of 3 over 2 devices was accepted')
    except parallel.BatchSizeError as e:
        assert 'multiple of 2' in str(e), e
    print('ok')
""")


@pytest.mark.slow  # the Inception network
class ShardedTest(parameterized.TestCase):
    def test_sharded_features_equal_unsharded_ones(self):
        env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
        env['PYTHONPATH'] = str(REPO)
        proc = subprocess.run(
            [sys.executable, '-c', _SHARDED], env=env, capture_output=True, text=True, timeout=300
        )
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        self.assertIn('ok', proc.stdout)


if __name__ == '__main__':
    absltest.main()
