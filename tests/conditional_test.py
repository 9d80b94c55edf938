"""Class-conditional DDPM and classifier-free guidance, against independent computations.

The guided sampler is checked against a NumPy loop of Algorithm 2 with the guidance formula of
Ho & Salimans 2022 written out; label dropout against its probability and its key; the network
against the unconditional one it must leave unchanged.
"""

import json
import math
import tempfile

import fast_compile
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest, parameterized
from train_test import run_on_mock_data, straight_and_resumed, tiny_config

from configs import digits_conditional
from diffusion_jax import config_lib, experiment, image_io, models, sampling, schedules, train
from diffusion_jax import diffusion as diffusion_lib

SHAPE = (4, 4, 1)
K = 3  # classes of the toy model; label K is the null label


class LabelShiftModel(nn.Module):
    """eps = a * x + b[y], with one shift per label (null included): a toy conditional network.

    With `out_ch` = 2C the second half is a variance output v[y], constant per label.
    """

    num_classes: int = K
    learned_var: bool = False

    @nn.compact
    def __call__(self, x, t, y=None, *, train):
        del t, train
        a = self.param('a', nn.initializers.constant(0.3), ())
        b = self.param('b', lambda *_: jnp.asarray([0.5, -0.7, 1.1, 0.2]), ())
        eps = a * x + b[y][:, None, None, None]
        if not self.learned_var:
            return eps
        v = self.param('v', lambda *_: jnp.asarray([0.1, 0.4, 0.7, 0.9]), ())
        return jnp.concatenate([eps, jnp.broadcast_to(v[y][:, None, None, None], x.shape)], -1)


def _params(model):
    return model.init(jax.random.key(0), jnp.zeros((1, *SHAPE)), jnp.zeros(1, int),
                      jnp.zeros(1, int), train=False)['params']  # fmt: skip


def _noise(rng, index, step):
    """The samplers' documented draw for image `index` at chain step `step`."""
    k = jax.random.fold_in(jax.random.fold_in(rng, index), step)
    return np.asarray(jax.random.normal(k, SHAPE), np.float64)


class GuidanceTest(parameterized.TestCase):
    @parameterized.parameters(0.0, 1.0, 3.0)
    def test_guided_ancestral_sampling_matches_a_numpy_loop(self, w):
        num_t, batch = 20, 5
        betas = np.linspace(1e-4, 0.2, num_t)
        ab = np.cumprod(1 - betas)
        d = diffusion_lib.GaussianDiffusion.create(
            schedules.get_beta_schedule('linear', num_t, beta_end=0.2), 'eps', 'fixedlarge', 'mse'
        )
        model = LabelShiftModel()
        sample_fn = sampling.make_sample_fn(
            model, d, batch_size=batch, image_shape=SHAPE, clip_denoised=False, guidance_scale=w
        )
        rng = jax.random.key(11)
        got = np.asarray(sample_fn(_params(model), rng))
        shift = np.array([0.5, -0.7, 1.1, 0.2])
        for i in range(batch):
            y = i % K  # round robin
            x = _noise(rng, i, 0)
            for t in reversed(range(num_t)):
                eps = (1 + w) * (0.3 * x + shift[y]) - w * (0.3 * x + shift[K])
                mean = (x - betas[t] / math.sqrt(1 - ab[t]) * eps) / math.sqrt(1 - betas[t])
                x = mean + (math.sqrt(betas[t]) if t else 0.0) * _noise(rng, i, t + 1)
            np.testing.assert_allclose(got[i], x, rtol=1e-4, atol=1e-4)

    def test_a_learned_variance_comes_from_the_conditional_branch(self):
        model = LabelShiftModel(learned_var=True)
        params = _params(model)
        x = np.random.default_rng(0).standard_normal((3, *SHAPE)).astype(np.float32)
        labels = np.array([0, 2, 1])
        out = np.asarray(
            sampling.model_output(model, params, jnp.asarray(x), jnp.zeros(3, int), labels, 2.0)
        )
        shift, v = np.array([0.5, -0.7, 1.1, 0.2]), np.array([0.1, 0.4, 0.7, 0.9])
        want_eps = 3.0 * (0.3 * x + shift[labels, None, None, None]) - 2.0 * (0.3 * x + shift[K])
        np.testing.assert_allclose(out[..., :1], want_eps, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out[..., 1:], np.broadcast_to(v[labels, None, None, None],
                                                                 x.shape))  # fmt: skip

    def test_ddim_and_respaced_chains_guide_too(self):
        d = diffusion_lib.GaussianDiffusion.create(
            schedules.get_beta_schedule('linear', 20, beta_end=0.2), 'eps', 'fixedlarge', 'mse'
        )
        model, params, rng = LabelShiftModel(), _params(LabelShiftModel()), jax.random.key(2)
        for kwargs in ({'sampler': 'ddim', 'num_steps': 5}, {'num_steps': 7}):
            plain, guided = (
                sampling.make_sample_fn(
                    model, d, batch_size=3, image_shape=SHAPE, guidance_scale=w, **kwargs
                )(params, rng)
                for w in (0.0, 2.0)
            )
            self.assertGreater(float(jnp.max(jnp.abs(guided - plain))), 1e-3, kwargs)

    def test_labels_choose_each_images_class_and_are_checked(self):
        d = diffusion_lib.GaussianDiffusion.create(
            schedules.get_beta_schedule('linear', 10, beta_end=0.2), 'eps', 'fixedlarge', 'mse'
        )
        model, params, rng = LabelShiftModel(), _params(LabelShiftModel()), jax.random.key(4)
        round_robin = sampling.make_sample_fn(model, d, batch_size=6, image_shape=SHAPE)
        all_twos = sampling.make_sample_fn(model, d, batch_size=6, image_shape=SHAPE, class_label=2)
        given = round_robin(params, rng, labels=np.full(6, 2))
        np.testing.assert_array_equal(given, all_twos(params, rng))
        np.testing.assert_array_equal(given[2::3], round_robin(params, rng)[2::3])  # i mod 3 = 2
        with self.assertRaisesRegex(ValueError, r'labels must be in \[0, 3\]'):
            round_robin(params, rng, labels=np.full(6, 4))
        with self.assertRaisesRegex(ValueError, r'integers \[6\]'):
            round_robin(params, rng, labels=np.zeros(5, int))

    def test_image_labels_round_robin_or_one_class(self):
        np.testing.assert_array_equal(sampling.image_labels(np.arange(7), 3, -1),
                                      [0, 1, 2, 0, 1, 2, 0])  # fmt: skip
        np.testing.assert_array_equal(sampling.image_labels(np.arange(4), 3, 1), [1, 1, 1, 1])


def _tiny_conditional(**training):
    """train_test's tiny digits config with the conditioning of configs/digits_conditional."""
    config = tiny_config(**{'batch_size': 16, 'log_every_steps': 1, **training})
    conditional = digits_conditional.get_config()
    config.model.num_classes = conditional.model.num_classes
    config.training.label_dropout = conditional.training.label_dropout
    config.sampling.guidance_scale = conditional.sampling.guidance_scale
    config.eval.guidance_sweep = conditional.eval.guidance_sweep
    return config


class NetworkTest(absltest.TestCase):
    def test_conditioning_adds_one_embedding_row_per_class_and_the_null_label(self):
        config = digits_conditional.get_config()
        plain = experiment.build(digits_conditional.get_config())
        config.model.num_classes = 0
        unconditional = experiment.build(config)
        self.assertEqual(unconditional.num_params, 651_041)  # the digits network, unchanged
        self.assertEqual(plain.num_params - unconditional.num_params, 11 * 4 * 32)
        self.assertEqual(plain.abstract_state.params['label_emb']['embedding'].shape, (11, 128))

    def test_a_conditional_network_needs_labels_and_an_unconditional_one_refuses_them(self):
        x, t = jnp.zeros((2, 8, 8, 1)), jnp.zeros(2, int)
        config = digits_conditional.get_config()
        model = models.get_model(config)
        with self.assertRaisesRegex(ValueError, 'pass labels y'):
            model.init(jax.random.key(0), x, t, train=False)
        config.model.num_classes = 0
        with self.assertRaisesRegex(ValueError, 'unconditional network'):
            models.get_model(config).init(jax.random.key(0), x, t, jnp.zeros(2, int), train=False)


class LabelDropoutTest(absltest.TestCase):
    def test_the_dropped_fraction_is_the_probability_and_only_null_replaces(self):
        labels = jnp.asarray(np.arange(100_000) % 10, jnp.int32)
        dropped = np.asarray(train.drop_labels(labels, jax.random.key(0), 0.1, 10))
        null = dropped == 10
        self.assertAlmostEqual(null.mean(), 0.1, delta=0.003)  # about 3 binomial sigmas (0.00095)
        np.testing.assert_array_equal(dropped[~null], np.asarray(labels)[~null])
        again = np.asarray(train.drop_labels(labels, jax.random.key(0), 0.1, 10))
        np.testing.assert_array_equal(again, dropped)  # a function of the key
        other = np.asarray(train.drop_labels(labels, jax.random.key(1), 0.1, 10))
        self.assertFalse(np.array_equal(other, dropped))
        np.testing.assert_array_equal(train.drop_labels(labels, jax.random.key(0), 0.0, 10),
                                      labels)  # fmt: skip

    def test_the_train_step_sees_null_labels_at_the_configured_rate(self):
        seen = []

        class Recorder(nn.Module):
            @nn.compact
            def __call__(self, x, t, y=None, *, train):
                jax.debug.callback(lambda v: seen.append(np.asarray(v)), y)
                return x * self.param('w', nn.initializers.zeros, ())

        config = _tiny_conditional(label_dropout=0.5)
        exp = experiment.build(config)
        model = Recorder()
        from diffusion_jax import train_state as tsl

        state = tsl.TrainState.create(apply_fn=model.apply, params={'w': jnp.float32(0)},
                                      tx=exp.tx, ema_params={'w': jnp.float32(0)})  # fmt: skip
        batch = {'image': jnp.zeros((400, 8, 8, 1)), 'label': jnp.asarray(np.arange(400) % 10)}
        step = jax.jit(lambda s, b: train.train_step(
            s, b, jax.random.key(3), diffusion=exp.diffusion, ema_decay=0.9,
            learning_rate_fn=exp.learning_rate_fn, num_classes=10, label_dropout=0.5))  # fmt: skip
        step(state, batch)
        jax.effects_barrier()
        y = np.concatenate(seen)
        self.assertBetween((y == 10).mean(), 0.42, 0.58)  # 400 coins of p = 0.5: sigma 0.025
        kept = y != 10
        np.testing.assert_array_equal(y[kept], (np.arange(400) % 10)[kept])


class ConfigTest(absltest.TestCase):
    def test_conditioning_settings_need_a_conditional_model(self):
        config = digits_conditional.get_config()
        config.model.num_classes = 0
        with self.assertRaises(config_lib.ConfigError) as caught:
            config_lib.validate(config)
        message = str(caught.exception)
        for key in ('training.label_dropout', 'sampling.guidance_scale', 'eval.guidance_sweep'):
            self.assertIn(f'config.{key}:', message)
        config_lib.validate(config, weights_from_checkpoint=True)  # sampling: checked later

    def test_a_class_beyond_the_model_is_refused(self):
        config = digits_conditional.get_config()
        config.sampling.class_label = 10
        with self.assertRaisesRegex(config_lib.ConfigError, r'class_label: 10 is not a class'):
            config_lib.validate(config)
        config.sampling.class_label = 9
        config_lib.validate(config)

    def test_checkpoints_from_before_conditioning_count_as_unconditional(self):
        stored = digits_conditional.get_config().to_dict()
        del stored['model']['num_classes']
        config = digits_conditional.get_config()
        self.assertEqual(
            config_lib.weight_changes(stored, config),
            ['config.model.num_classes: checkpoint 0, now 10'],
        )


class GridTest(absltest.TestCase):
    def test_rows_by_class_puts_each_class_on_its_own_row(self):
        images = np.arange(23, dtype=np.uint8).reshape(23, 1, 1, 1)
        labels = np.arange(23) % 5
        ordered, ncol = image_io.rows_by_class(images, labels)
        self.assertEqual(ncol, 4)  # classes 3 and 4 have 4 images each
        rows = ordered[:, 0, 0, 0].reshape(5, 4)
        np.testing.assert_array_equal(rows % 5, np.repeat(np.arange(5)[:, None], 4, axis=1))
        np.testing.assert_array_equal(rows[0], [0, 5, 10, 15])
        same, none = image_io.rows_by_class(images, np.zeros(23, int))
        self.assertIsNone(none)
        np.testing.assert_array_equal(same, images)


_EIGHT_DEVICES = """
import jax, numpy as np
from configs import digits_conditional
from diffusion_jax import experiment, parallel
config = digits_conditional.get_config()
config.model.ch, config.model.num_res_blocks = 32, 1
config.diffusion.num_timesteps = 12
exp = experiment.build(config)
params = exp.init_state(jax.random.key(0), parallel.create_mesh(jax.devices()[:1])).ema_params
params = jax.device_get(params)
rng = jax.random.key(5)
ref = np.asarray(exp.sampler(None, batch_size=13)(params, rng))
for devices in (jax.devices()[:1], jax.devices()):
    mesh = parallel.create_mesh(devices)
    for batch in (5, 8):
        fn = exp.sampler(mesh, batch_size=batch)
        got = np.concatenate([np.asarray(fn(params, rng, start)) for start in range(0, 13, batch)])
        np.testing.assert_allclose(got[:13], ref, rtol=1e-5, atol=1e-5)
        labels = np.arange(batch) % 3
        fixed = np.asarray(fn(params, rng, 0, labels=labels))
        one = np.asarray(exp.sampler(None, batch_size=batch)(params, rng, 0, labels=labels))
        np.testing.assert_allclose(fixed, one, rtol=1e-5, atol=1e-5)
    print('MATCH', len(devices))
"""


@pytest.mark.slow  # 8 CPU devices need a fresh process
class DeviceCountTest(absltest.TestCase):
    def test_guided_images_do_not_depend_on_batch_or_device_count(self):
        proc = fast_compile.run_on_devices(_EIGHT_DEVICES, 8)
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        self.assertIn('MATCH 1', proc.stdout)
        self.assertIn('MATCH 8', proc.stdout)


def _leaves_equal(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return all(np.array_equal(x, y) for x, y in pairs)


@pytest.mark.slow  # trains three short runs
class ConditionalTrainingTest(absltest.TestCase):
    def test_a_resumed_conditional_run_is_bit_identical(self):
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            straight, resumed = straight_and_resumed(_tiny_conditional, a, b)
            with open(f'{b}/classes.json') as f:
                self.assertEqual(json.load(f), [str(d) for d in range(10)])
        self.assertTrue(_leaves_equal(straight.params, resumed.params))
        self.assertTrue(_leaves_equal(straight.ema_params, resumed.ema_params))
        self.assertTrue(_leaves_equal(straight.opt_state, resumed.opt_state))
        emb = straight.params['label_emb']['embedding']
        init = (
            experiment.build(_tiny_conditional())
            .init_state(jax.random.split(jax.random.key(0), 3)[0], _mesh())
            .params['label_emb']['embedding']
        )
        moved = np.abs(np.asarray(emb) - np.asarray(init)).max(axis=1)
        self.assertTrue(np.all(moved > 0))  # every class and the null label were trained

    def test_the_cifar10_conditional_recipe_runs_on_mock_data(self):
        from configs import cifar10_conditional

        config = cifar10_conditional.get_config()
        # The recipe on a smaller U-Net: its labels, dropout and guidance are the point here
        # (the full network's XLA:CPU compile alone takes minutes; train_test runs it once).
        config.model.ch, config.model.ch_mult, config.model.num_res_blocks = 32, (1, 2), 1
        state = run_on_mock_data(config)
        self.assertEqual(int(state.step), 2)
        unconditional = cifar10_conditional.get_config()
        unconditional.model.ch, unconditional.model.num_classes = 32, 0
        unconditional.model.ch_mult, unconditional.model.num_res_blocks = (1, 2), 1
        plain = experiment.build(unconditional).num_params
        self.assertEqual(sum(x.size for x in jax.tree.leaves(state.params)), plain + 11 * 128)


@pytest.mark.slow  # trains, samples and evaluates a tiny conditional model
class SampleAndEvalTest(absltest.TestCase):
    def test_samples_carry_labels_and_eval_reports_accuracy_and_the_sweep(self):
        from diffusion_jax import evaluate, generate

        config = _tiny_conditional(num_train_steps=3)
        config.optim.warmup_steps, config.optim.learning_rate = 0, 0.01  # away from conv_out=0
        config.optim.ema_decay = 0.0  # sample with the trained weights themselves
        config.diffusion.num_timesteps = 8
        config.sampling.num_samples = 23
        config.sampling.batch_size = 10
        config.eval.num_samples = 20
        config.eval.batch_size = 100
        config.eval.guidance_sweep = (0.0, 1.0, 2.5)
        with tempfile.TemporaryDirectory() as workdir:
            train.train_and_evaluate(config, workdir)
            path = generate.run_sample_mode(config, workdir)
            with np.load(path) as f:
                np.testing.assert_array_equal(f['labels'], np.arange(23) % 10)
                self.assertEqual(f['images'].shape, (23, 8, 8, 1))
            metrics = evaluate.run_eval_mode(config, workdir)
            with open(f'{workdir}/eval/guidance_3.json') as f:
                rows = json.load(f)
            with np.load(f'{workdir}/eval/samples_3_w2.5.npz') as f:
                np.testing.assert_array_equal(f['labels'], np.arange(20) % 10)
                guided = f['images']
            with np.load(f'{workdir}/eval/samples_3_w0.npz') as f:
                self.assertFalse(np.array_equal(f['images'], guided))  # w changed the samples
            with open(f'{workdir}/eval/guidance_3.png', 'rb') as f:
                self.assertEqual(f.read(8), b'\x89PNG\r\n\x1a\n')
        self.assertEqual([row['guidance_scale'] for row in rows], [0.0, 1.0, 2.5])
        self.assertEqual(rows[1]['digits_accuracy'], metrics['digits_accuracy'])  # w = 1 reused
        for row in rows:
            self.assertBetween(row['digits_accuracy'], 0.0, 1.0)
            self.assertGreater(row['real_heldout_digits_accuracy'], 0.95)


def _mesh():
    from diffusion_jax import parallel

    return parallel.create_mesh()


if __name__ == '__main__':
    absltest.main()
