"""Sampling from a workdir: `--mode=sample`, resumable npz shards, device-count invariance."""

import glob
import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap

import fast_compile
import jax
import numpy as np
import pytest
from absl.testing import absltest, parameterized
from PIL import Image

from configs import digits
from diffusion_jax import (
    checkpointing,
    config_lib,
    experiment,
    generate,
    image_io,
    models,
    parallel,
    sampling,
    train,
)

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config():
    """Digits with a very small U-Net and T=20, trained for a few steps: fast to sample."""
    config = digits.get_config()
    config.model.ch = 16
    config.model.num_groups = 8
    config.model.num_res_blocks = 1
    config.diffusion.num_timesteps = 20
    config.training.batch_size = 16
    config.training.num_train_steps = 3
    config.training.log_every_steps = 1
    config.training.sample_every_steps = 0
    config.sampling.num_samples = 7
    config.sampling.batch_size = 4
    return config


def run_main(*args):
    return subprocess.run(
        [sys.executable, '-m', 'diffusion_jax.main', *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


class _KilledError(Exception):
    pass


def _dies_after(sample_fn, calls):
    """`sample_fn` that raises (like a killed process) once it has been called `calls` times."""
    count = [0]

    def wrapped(*args):
        if count[0] == calls:
            raise _KilledError
        count[0] += 1
        return sample_fn(*args)

    return wrapped


@pytest.mark.slow  # trains its own workdir and compiles samplers
class GenerateTest(parameterized.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls._tmp = tempfile.TemporaryDirectory()
        cls.workdir = os.path.join(cls._tmp.name, 'run')
        cls.config = tiny_config()
        train.train_and_evaluate(cls.config, cls.workdir)
        sample_fn, cls.params, _, cls.step = generate.load_sampler(
            cls.workdir, cls.config, batch_size=4
        )
        cls.sample_fn = staticmethod(sample_fn)  # a plain function, not a method

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()
        super().tearDownClass()

    def setUp(self):
        super().setUp()
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.out = tmp.name

    def _generate(
        self, path, sample_fn=None, batch_size=4, num_samples=7, spec=None, on_batch=None
    ):
        """Runs generate_to_npz; returns the images of the file it wrote."""
        generate.generate_to_npz(
            sample_fn or self.sample_fn,
            self.params,
            path=path,
            num_samples=num_samples,
            batch_size=batch_size,
            seed=0,
            spec=spec or {'checkpoint_step': self.step},
            on_batch=on_batch,
        )
        with np.load(path) as f:
            return f['images']

    def test_load_sampler_returns_the_checkpoints_ema_params(self):
        state = train.train_and_evaluate(self.config, self.workdir)  # restores, trains nothing
        self.assertEqual(self.step, self.config.training.num_train_steps)
        for a, b in zip(
            jax.tree.leaves(self.params), jax.tree.leaves(state.ema_params), strict=True
        ):
            np.testing.assert_array_equal(a, b)

    def test_the_npz_holds_exactly_the_images_of_one_unsharded_call(self):
        path = os.path.join(self.out, 'samples.npz')
        images = self._generate(path)
        self.assertEqual(images.shape, (7, 8, 8, 1))
        self.assertEqual(images.dtype, np.uint8)
        # Independent of the batch size: one call of 7 images, no mesh, no shards.
        config = self.config
        direct = sampling.make_sample_fn(
            models.get_model(config),
            experiment.create_diffusion(config),
            batch_size=7,
            image_shape=experiment.image_shape(config),
        )
        expected = image_io.to_uint8(direct(self.params, jax.random.key(0)))
        np.testing.assert_array_equal(images, expected)
        self.assertFalse(os.path.exists(path + '.partial'))

    @parameterized.parameters((4, 1, 4), (4, 1, 3), (3, 2, 4))
    def test_a_killed_run_resumes_to_the_same_file(self, first_batch, killed_after, second_batch):
        whole = self._generate(os.path.join(self.out, 'whole.npz'))
        path = os.path.join(self.out, 'resumed.npz')
        with self.assertRaises(_KilledError):
            self._generate(path, _dies_after(self.sample_fn, killed_after), first_batch)
        shards = glob.glob(os.path.join(path + '.partial', 'images_*.npz'))
        self.assertLen(shards, killed_after)
        self.assertFalse(os.path.exists(path))
        if second_batch != 4:
            sample_fn, *_ = generate.load_sampler(
                self.workdir, self.config, batch_size=second_batch
            )
        else:
            sample_fn = self.sample_fn
        calls = []
        resumed = self._generate(path, lambda *a: calls.append(a[2]) or sample_fn(*a), second_batch)
        # Only the images that were missing are drawn again.
        done = min(7, killed_after * first_batch)
        self.assertEqual(calls, list(range(done, 7, second_batch)))
        np.testing.assert_array_equal(resumed, whole)
        with open(path, 'rb') as f, open(os.path.join(self.out, 'whole.npz'), 'rb') as g:
            self.assertEqual(np.load(f)['images'].tobytes(), np.load(g)['images'].tobytes())

    @parameterized.parameters((4, 0), (4, 1), (3, 2))
    def test_on_batch_sees_every_image_once_in_order_also_after_a_resume(self, batch, killed):
        whole = self._generate(os.path.join(self.out, 'whole.npz'))
        path = os.path.join(self.out, 'streamed.npz')
        if killed:
            with self.assertRaises(_KilledError):
                self._generate(path, _dies_after(self.sample_fn, killed), batch)
        seen = []

        def on_batch(images, n, start):
            self.assertEqual(images.dtype, np.uint8)
            self.assertEqual(images.shape[0], 4)  # the rows of one compiled batch
            seen.append((start, np.asarray(images)[:n]))

        self._generate(path, on_batch=on_batch)
        starts = [start for start, _ in seen]
        self.assertEqual(starts, [0, 4] if batch == 4 else [0, 4, 6])
        if batch == 3:  # replayed: the partial run's 6 images in batches of 4, then image 6
            self.assertEqual([len(rows) for _, rows in seen], [4, 2, 1])
        np.testing.assert_array_equal(np.concatenate([rows for _, rows in seen]), whole)

    def test_a_partial_run_with_other_settings_is_refused_and_kept(self):
        path = os.path.join(self.out, 'samples.npz')
        with self.assertRaises(_KilledError):
            self._generate(path, _dies_after(self.sample_fn, 1))
        before = {p: pathlib.Path(p).read_bytes() for p in glob.glob(path + '.partial/*')}
        with self.assertRaisesRegex(generate.SampleError, r'sampler differ.*delete the folder'):
            self._generate(path, spec={'checkpoint_step': self.step, 'sampler': 'ddim'})
        after = {p: pathlib.Path(p).read_bytes() for p in glob.glob(path + '.partial/*')}
        self.assertEqual(before, after)

    @pytest.mark.slow  # a subprocess
    def test_interpolation_strip_and_npz_from_the_command_line(self):
        args = [
            '--config=configs/digits.py',
            f'--workdir={self.workdir}',
            '--mode=sample',
            '--config.sampling.num_samples=5',
            '--config.sampling.batch_size=5',
            '--config.sampling.interpolate=0,3',
            '--config.sampling.interpolate_t=10',
            '--config.sampling.interpolate_num=5',
        ]
        proc = run_main(*args)
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        samples = os.path.join(self.workdir, 'samples')
        with np.load(os.path.join(samples, f'samples_{self.step}.npz')) as f:
            self.assertEqual(f['images'].shape, (5, 8, 8, 1))
        with Image.open(os.path.join(samples, f'samples_{self.step}.png')) as im:
            self.assertGreater(im.size[0], 8)
        # The strip: source a, 5 interpolants, source b in one row of 8x8 cells with 2-pixel
        # padding (72 x 12 pixels), upscaled for viewing.
        with Image.open(os.path.join(samples, f'interpolate_{self.step}_0_3_t10.png')) as im:
            width, height = im.size
        self.assertEqual(width * 12, height * 72)
        self.assertGreaterEqual(width, 7 * 32)

    @pytest.mark.slow  # a subprocess (bad_input_test has it in-process)
    def test_sample_mode_without_a_checkpoint_fails_in_one_line(self):
        proc = run_main('--config=configs/digits.py', f'--workdir={self.out}', '--mode=sample')
        self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
        last = proc.stderr.strip().splitlines()[-1]
        self.assertIn('no checkpoint in', last)
        self.assertIn('train first', last)


_EIGHT_DEVICES = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from generate_test import tiny_config
    from diffusion_jax import generate, parallel
    out, count, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    assert jax.device_count() == count, jax.devices()
    config, rng = tiny_config(), jax.random.key(5)
    # load_sampler shards over every device: 8 images split evenly; 5 are drawn as 8 (on 8
    # devices) and cut, where they used to be refused.
    sample8, params, _, _ = generate.load_sampler(workdir, config, batch_size=8)
    sample5, *_ = generate.load_sampler(workdir, config, batch_size=5)
    images8, images5 = sample8(params, rng, 3), sample5(params, rng, 3)
    assert len(images8.sharding.device_set) == count
    assert images5.shape == (5, 8, 8, 1), images5.shape
    padded, real = sample5.sample_padded(params, rng, 3)
    assert real == 5 and padded.shape[0] == -(-5 // count) * count, (real, padded.shape)
    assert padded.sharding == parallel.batch_sharding(sample5.mesh), padded.sharding
    np.savez(out, images8=np.asarray(images8), images5=np.asarray(images5),
             padded=np.asarray(padded))
""")


@pytest.mark.slow  # trains a tiny model
class SeveralEmaTest(absltest.TestCase):
    def test_sampling_ema_decay_picks_the_ema_of_that_rate(self):
        config = tiny_config()
        config.optim.ema_decays = (0.0, 0.5)  # 0.0: the EMA is the trained parameters
        config.optim.warmup_steps, config.optim.learning_rate = 0, 0.01
        with tempfile.TemporaryDirectory() as workdir:
            state = train.train_and_evaluate(config, workdir)
            config.sampling.ema_decay = 0.0
            _, params, _, _ = generate.load_sampler(workdir, config, batch_size=4)
            for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(state.params),
                                 strict=True):  # fmt: skip
                np.testing.assert_array_equal(got, want)
            config.sampling.ema_decay = None
            _, primary, _, _ = generate.load_sampler(workdir, config, batch_size=4)
            for got, want in zip(jax.tree.leaves(primary), jax.tree.leaves(state.ema_params),
                                 strict=True):  # fmt: skip
                np.testing.assert_array_equal(got, want)
            self.assertFalse(np.array_equal(jax.tree.leaves(primary)[0],
                                            jax.tree.leaves(params)[0]))  # fmt: skip
            config.sampling.ema_decay = 0.9
            with self.assertRaisesRegex(config_lib.ConfigError, r'no EMA of rate 0\.9 .*0\.5'):
                generate.load_sampler(workdir, config, batch_size=4)
            config.sampling.ema_decay = None
            config.optim.ema_decays = (0.5,)
            with self.assertRaisesRegex(config_lib.ConfigError, 'ema_decays: checkpoint'):
                train.train_and_evaluate(config, workdir)


class MergeConfigTest(parameterized.TestCase):
    def test_the_checkpoint_decides_the_network_and_the_caller_the_sampling(self):
        stored = tiny_config().to_dict()
        stored['data']['data_dir'] = '/where/training/read/it'
        caller = digits.get_config()
        caller.sampling.num_samples = 3
        caller.data.data_dir = '/here'
        merged = config_lib.with_checkpoint_weights(stored, caller)
        self.assertEqual(merged.model.ch, 16)
        self.assertEqual(merged.model.num_groups, 8)
        self.assertEqual(merged.diffusion.num_timesteps, 20)
        self.assertEqual(merged.sampling.num_samples, 3)
        self.assertEqual(merged.data.data_dir, '/here')
        self.assertEqual(caller.model.ch, 32)  # the caller's config is not modified


@pytest.mark.slow  # 8 CPU devices need a fresh process
class DeviceCountTest(parameterized.TestCase):
    def test_eight_devices_draw_the_same_images_as_one_for_any_batch_size(self):
        results = []
        with tempfile.TemporaryDirectory() as tmp:
            # One untrained checkpoint (the initial state) that both processes sample from.
            config, workdir = tiny_config(), os.path.join(tmp, 'run')
            exp = experiment.build(config)
            state = exp.init_state(jax.random.key(1), parallel.create_mesh())
            ckpt_dir = generate.checkpoint_dir(workdir)
            with checkpointing.Checkpointer(ckpt_dir, keep=1, save_every_steps=1) as ckpt:
                ckpt.save(0, state, meta={'config': config.to_dict()}, force=True)
            for count in (1, 8):
                out = os.path.join(tmp, f'{count}.npz')
                env = fast_compile.env(count)
                env['PYTHONPATH'] = os.pathsep.join([str(REPO / 'tests'), str(REPO)])
                proc = subprocess.run(
                    [sys.executable, '-c', _EIGHT_DEVICES, out, str(count), workdir],
                    cwd=REPO,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
                with np.load(out) as f:
                    results.append(dict(f))
        one, eight = results
        # Same keys per image; only the batch per device differs (8 vs 1 image per conv call).
        np.testing.assert_allclose(eight['images8'], one['images8'], atol=1e-5)
        np.testing.assert_allclose(eight['images5'], one['images5'], atol=1e-5)
        # Image i is image i whatever the batch: batch 5 is the first 5 of batch 8, and its
        # padding rows are images 3 + 5, 3 + 6, 3 + 7.
        np.testing.assert_allclose(eight['images5'], eight['images8'][:5], atol=1e-5)
        np.testing.assert_allclose(eight['padded'], eight['images8'], atol=1e-5)
        self.assertEqual(one['padded'].shape[0], 5)  # one device: nothing to pad


if __name__ == '__main__':
    absltest.main()
