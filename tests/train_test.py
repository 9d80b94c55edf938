"""The training system end to end on tiny models: learning, exact resume, SIGTERM, 8 devices."""

import functools
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from unittest import mock

import fast_compile
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import absltest, parameterized

from configs import cifar10, digits
from diffusion_jax import checkpointing, experiment, models, parallel, train
from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import train_state as train_state_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
_FAST_COMPILE_ENV = fast_compile.env()


def tiny_config(**training):
    """The digits config with a smaller U-Net, no sample grids and frequent logs."""
    config = digits.get_config()
    config.model.ch = 32
    config.model.num_res_blocks = 1
    config.model.dropout = 0.0
    config.training.batch_size = 32
    config.training.log_every_steps = 10
    config.training.sample_every_steps = 0
    config.training.checkpoint_every_steps = 1000
    for k, v in training.items():
        setattr(config.training, k, v)
    return config


def _fixed_batch_loss(config, params, num=256):
    """Mean L_simple of `params` on fixed real digits, t and noise (independent of the loop)."""
    from diffusion_jax import input_pipeline

    images = input_pipeline.load_images(config.data, 'train')[:num]
    x = images.astype(np.float32) / 127.5 - 1.0
    d = experiment.create_diffusion(config)
    rng = np.random.default_rng(0)
    t = jnp.asarray(rng.integers(0, d.num_timesteps, num))
    noise = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    model = models.get_model(config)

    def model_fn(x_t, t):
        return model.apply({'params': params}, x_t, t, train=False)

    return float(jnp.mean(diffusion_lib.training_losses(d, model_fn, x, t, noise)['loss']))


def _ddim_round_trip_rmse(config, params, num=64):
    """RMSE of x_0 -> x_T -> x_0 through the DDIM codec (all T steps) on held-out digits."""
    from diffusion_jax import input_pipeline, sampling

    images = input_pipeline.load_images(config.data, 'test')[:num]
    x0 = jnp.asarray(images.astype(np.float32) / 127.5 - 1.0)
    encode, decode = sampling.make_ddim_codec(
        models.get_model(config), experiment.create_diffusion(config)
    )
    latents = encode(params, x0)
    back = decode(params, latents)
    rmse = float(jnp.sqrt(jnp.mean((back - x0) ** 2)))
    print(f'DDIM round trip: latent std {float(jnp.std(latents)):.3f}, RMSE {rmse:.4f}')
    return rmse


def straight_and_resumed(make_config, straight_dir: str, resumed_dir: str):
    """The states of `make_config(num_train_steps=...)` trained 6 steps in `straight_dir`, and
    3 steps then resumed to 6 in `resumed_dir`."""
    straight = train.train_and_evaluate(make_config(num_train_steps=6), straight_dir)
    train.train_and_evaluate(make_config(num_train_steps=3), resumed_dir)
    return straight, train.train_and_evaluate(make_config(num_train_steps=6), resumed_dir)


def run_on_mock_data(config):
    """Two steps of a tfds config at batch 4 on tfds' mock data; the final state."""
    import tensorflow_datasets as tfds

    config.training.batch_size = 4
    config.training.num_train_steps = 2
    config.training.sample_every_steps = 0
    config.training.log_every_steps = 1
    with tempfile.TemporaryDirectory() as workdir, tfds.testing.mock_data(num_examples=16):
        return train.train_and_evaluate(config, workdir)


def _fresh_state_and_step(config, num_microbatches: int = 1):
    """A new TrainState of `config` (8x8x1 images) and its jitted train step, EMA decay 0.9."""
    tx, lr_fn = train_state_lib.create_optimizer(config.optim)
    state = train_state_lib.create_train_state(
        models.get_model(config), tx, jax.random.key(0), (8, 8, 1)
    )
    step = functools.partial(
        train.train_step,
        diffusion=experiment.create_diffusion(config),
        ema_decay=0.9,
        learning_rate_fn=lr_fn,
        num_microbatches=num_microbatches,
    )
    return state, jax.jit(step)


def _leaves_equal(a, b):
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.slow  # training loops (300 steps; the CIFAR10 network)
class TrainLoopTest(parameterized.TestCase):
    def test_a_short_digits_run_learns_and_writes_a_checkpoint(self):
        config = tiny_config(num_train_steps=300)
        with tempfile.TemporaryDirectory() as workdir:
            state = train.train_and_evaluate(config, workdir)
            init = train_state_lib.create_train_state(
                models.get_model(config),
                optax.identity(),
                jax.random.split(jax.random.key(config.training.seed), 3)[0],
                experiment.image_shape(config),
            )
            before = _fixed_batch_loss(config, init.params)
            after = _fixed_batch_loss(config, state.params)
            rmse = _ddim_round_trip_rmse(config, state.ema_params)
            # An untrained eps-model outputs ~0, so its loss is E[noise^2] = 1.
            self.assertAlmostEqual(before, 1.0, delta=0.1)
            self.assertLess(after, 0.5 * before)
            # Deterministic DDIM encoding and decoding retrace each other (Song et al. 2021,
            # section 4.3): held-out digits come back to within 0.1 RMSE in [-1, 1].
            self.assertLess(rmse, 0.1)
            self.assertEqual(int(state.step), 300)
            ckpt = checkpointing.Checkpointer(
                os.path.join(workdir, 'checkpoints'), keep=3, save_every_steps=1000
            )
            self.assertEqual(ckpt.latest_valid_step(), 300)
            ckpt.close()
            self.assertTrue(os.path.exists(os.path.join(workdir, 'config.json')))
            self.assertTrue(any(f.startswith('events.out.tfevents') for f in os.listdir(workdir)))

    def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(self):
        config = tiny_config(num_train_steps=6)
        config.model.dropout = 0.1  # exercise the dropout rng stream as well
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            straight = train.train_and_evaluate(config, a)
            config.training.num_train_steps = 3
            train.train_and_evaluate(config, b)
            config.training.num_train_steps = 6
            resumed = train.train_and_evaluate(config, b)
        self.assertEqual(int(resumed.step), 6)
        self.assertTrue(_leaves_equal(straight.params, resumed.params))
        self.assertTrue(_leaves_equal(straight.ema_params, resumed.ema_params))
        self.assertTrue(_leaves_equal(straight.opt_state, resumed.opt_state))

    def test_several_steps_per_call_take_the_same_steps_logs_and_checkpoints(self):
        from tensorboard.backend.event_processing import event_accumulator

        calls = []  # (run, steps in the call)
        make_jit = train.make_jit_train_step

        def recording(*args, num_steps=1, **kwargs):
            step_fn = make_jit(*args, num_steps=num_steps, **kwargs)

            def call(state, batch, rng):
                calls[-1].append(num_steps)
                return step_fn(state, batch, rng)

            return call

        def run(workdir, num_train_steps, per_call):
            # steps_per_call 4 is lowered to 2, the greatest divisor of both cadences.
            config = tiny_config(num_train_steps=num_train_steps, log_every_steps=2,
                                 checkpoint_every_steps=2, steps_per_call=per_call)  # fmt: skip
            config.model.update(ch=16, num_groups=8, ch_mult=(1,))  # compiles in a few seconds
            calls.append([])
            with mock.patch.object(train, 'make_jit_train_step', recording):
                return train.train_and_evaluate(config, workdir)

        def losses(workdir):
            acc = event_accumulator.EventAccumulator(workdir, size_guidance={'scalars': 0})
            acc.Reload()
            return {e.step: e.value for e in acc.Scalars('loss')}

        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            one = run(a, 9, 1)
            run(b, 5, 4)  # 0 -> 2 -> 4 in calls of 2, then step 5 alone
            several = run(b, 9, 4)  # resumed at 5: step 6 alone, 6 -> 8, step 9 alone
            self.assertEqual(calls, [[1] * 9, [2, 2, 1], [1, 2, 1]])
            self.assertTrue(_leaves_equal(one.params, several.params))
            self.assertTrue(_leaves_equal(one.ema_params, several.ema_params))
            self.assertTrue(_leaves_equal(one.opt_state, several.opt_state))
            self.assertEqual(sorted(losses(a)), [2, 4, 6, 8, 9])
            self.assertEqual(sorted(losses(b)), [2, 4, 5, 6, 8, 9])
            for step, loss in losses(a).items():
                self.assertEqual(losses(b)[step], loss)
            saved = {d: sorted(os.listdir(os.path.join(d, 'checkpoints'))) for d in (a, b)}
            self.assertEqual(saved[a], ['6', '8', '9'])
            self.assertEqual(saved[b], ['6', '8', '9'])

    def test_the_cifar10_recipe_runs_on_mock_data(self):
        # The paper's recipe (tfds pipeline, random flips, optimizer, EMA) at a smaller batch, on
        # a smaller U-Net: XLA:CPU compiles the paper's network's train step in 164 s (2026-12-07,
        # 2 cores), most of this test's time, for no assertion that the next test does not make.
        config = cifar10.get_config()
        config.model.ch, config.model.ch_mult, config.model.num_res_blocks = 32, (1, 2), 1
        state = run_on_mock_data(config)
        self.assertEqual(int(state.step), 2)

    def test_the_paper_networks_train_step_traces_and_lowers_to_the_same_state(self):
        # The paper's network (35,746,307 parameters) through the train step, traced and lowered
        # to XLA (shape and dtype errors surface here), without XLA:CPU's minutes of compiling.
        config = cifar10.get_config()
        tx, lr_fn = train_state_lib.create_optimizer(config.optim)
        state = jax.eval_shape(
            lambda: train_state_lib.create_train_state(
                models.get_model(config), tx, jax.random.key(0), experiment.image_shape(config)
            )
        )
        self.assertEqual(sum(x.size for x in jax.tree.leaves(state.params)), 35_746_307)
        step = train.make_jit_train_step(
            config, experiment.create_diffusion(config), lr_fn, parallel.create_mesh()
        )
        batch = {'image': jax.ShapeDtypeStruct((4, *experiment.image_shape(config)), jnp.float32)}
        lowered = step.lower(state, batch, jax.random.key(1))
        new_state, _ = lowered.out_info
        self.assertEqual(jax.tree.structure(new_state), jax.tree.structure(state))
        for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state), strict=True):
            self.assertEqual((a.shape, a.dtype), (b.shape, b.dtype))


class StepsPerCallTest(absltest.TestCase):
    def test_steps_per_call_divides_every_cadence(self):
        config = tiny_config(steps_per_call=10, log_every_steps=100, checkpoint_every_steps=1000)
        self.assertEqual(train.steps_per_call(config.training), 10)
        config.training.sample_every_steps = 25
        self.assertEqual(train.steps_per_call(config.training), 5)
        config.training.eval_every_steps = 4
        self.assertEqual(train.steps_per_call(config.training), 1)
        config.training.update(steps_per_call=3, sample_every_steps=0, eval_every_steps=0)
        self.assertEqual(train.steps_per_call(config.training), 1)

    def test_non_finite_flags_of_a_call_count_step_by_step(self):
        checker = train._NonFiniteSteps(max_in_a_row=3)
        checker.check(4, np.array([0.0, 1.0, 0.0, 1.0]))  # steps 1..4, read on the next call
        with self.assertLogs(level='WARNING') as logs:
            checker.check(8, np.array([1.0, 0.0, 0.0, 0.0]))
        self.assertEqual(checker.total, 2)
        self.assertIn('step 2: non-finite', logs.output[0])
        self.assertIn('step 4: non-finite', logs.output[1])
        checker.check(9, np.float32(1.0))  # reads steps 5..8: step 5 follows step 4 in a row
        self.assertEqual((checker.in_a_row, checker.total), (0, 3))
        checker.check(12, np.array([1.0, 1.0, 1.0]))  # reads step 9's flag; the row starts
        with self.assertRaisesRegex(FloatingPointError, r'3 steps in a row \(up to step 11\)'):
            checker.check(None, None)


@pytest.mark.slow  # compiles two train steps
class MicrobatchTest(absltest.TestCase):
    def test_four_slices_take_the_same_steps_as_the_whole_batch(self):
        config = tiny_config()
        config.optim.warmup_steps = 0
        images = np.random.default_rng(0).uniform(-1, 1, (3, 16, 8, 8, 1)).astype(np.float32)
        runs = {}
        for k in (1, 4):
            state, step = _fresh_state_and_step(config, num_microbatches=k)
            s, metrics = state, []
            for batch in images:
                s, m = step(s, {'image': jnp.asarray(batch)}, jax.random.key(1))
                metrics.append(m)
            runs[k] = s, metrics
        (whole, m1), (sliced, m4) = runs[1], runs[4]
        self.assertEqual(int(sliced.step), 3)
        for a, b in zip(m1, m4, strict=True):  # the same examples, t and noise: same losses
            for key in ('loss', 'mse', 'loss_q0', 'loss_q1', 'loss_q2', 'loss_q3', 'grad_norm'):
                np.testing.assert_allclose(b[key], a[key], rtol=2e-6, err_msg=key)
        # Adam's first moment (a running mean of the gradients) is linear in them: it agrees
        # within float32 rounding of the summation order, relative to each entry, with a floor
        # at 1e-6 of the largest entry for gradients that are zero but for rounding (the biases
        # just before the output GroupNorm, whose conv_out starts at zero: about 1e-10).
        mu = [optax.tree_utils.tree_get(s.opt_state, 'mu') for s in (whole, sliced)]
        floor = 1e-6 * max(float(np.abs(m).max()) for m in jax.tree.leaves(mu[0]))
        for a, b in zip(jax.tree.leaves(mu[0]), jax.tree.leaves(mu[1]), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=floor)
        # Adam divides by sqrt(v) + 1e-8: an entry whose gradient is rounding noise moves by
        # lr times noise / 1e-8, which no tolerance bounds. Every other parameter agrees to 1%
        # of one step's size (lr = 1e-3).
        lr = config.optim.learning_rate
        params = zip(jax.tree.leaves(whole.params), jax.tree.leaves(sliced.params), strict=True)
        for (a, b), m in zip(params, jax.tree.leaves(mu[0]), strict=True):
            determined = np.abs(np.asarray(m)) > floor
            np.testing.assert_allclose(b[determined], a[determined], rtol=0, atol=0.01 * lr)
        self.assertFalse(_leaves_equal(whole.params, state.params))  # the steps did move them

    def test_the_mean_gradient_of_four_slices_is_the_whole_batchs(self):
        config = tiny_config()
        model = models.get_model(config)
        params = model.init(
            jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros(1, int), train=False
        )
        rng = np.random.default_rng(1)
        x = jnp.asarray(rng.uniform(-1, 1, (16, 8, 8, 1)), jnp.float32)
        t = jnp.asarray(rng.integers(0, 250, 16))
        noise = jnp.asarray(rng.standard_normal((16, 8, 8, 1)), jnp.float32)
        diffusion = experiment.create_diffusion(config)
        out = {
            k: jax.jit(
                lambda p, b, k=k: train._loss_and_grads(
                    p, model.apply, diffusion, b, jax.random.key(2), k
                )
            )(params['params'], (x, t, noise, None, None))
            for k in (1, 4)
        }
        np.testing.assert_allclose(out[4][0]['loss'], out[1][0]['loss'], rtol=1e-6)
        leaves = list(zip(jax.tree.leaves(out[1][1]), jax.tree.leaves(out[4][1]), strict=True))
        # float32 rounding: relative to each entry, plus a floor at 1e-6 of the largest entry
        # for gradients that are zero but for rounding (biases just before a GroupNorm).
        scale = max(float(np.abs(whole).max()) for whole, _ in leaves)
        for whole, sliced in leaves:
            np.testing.assert_allclose(sliced, whole, rtol=1e-4, atol=1e-6 * scale)
        # The mean over slices, not the sum: a second check that the scale is right.
        norms = [optax.tree.norm(out[k][1]) for k in (1, 4)]
        np.testing.assert_allclose(norms[1], norms[0], rtol=1e-5)
        # Loss weights (importance-sampled t) weigh each example in every slice alike.
        weights = jnp.asarray(rng.uniform(0.5, 2.0, 16), jnp.float32)

        def grads(k, batch):
            step = jax.jit(lambda p, b: train._loss_and_grads(
                p, model.apply, diffusion, b, jax.random.key(2), k))  # fmt: skip
            return step(params['params'], batch)[1]

        weighted = [grads(k, (x, t, noise, None, weights)) for k in (1, 4)]
        for whole, sliced in zip(*map(jax.tree.leaves, weighted), strict=True):
            np.testing.assert_allclose(sliced, whole, rtol=1e-4, atol=1e-6 * scale)
        moved = optax.tree.norm(jax.tree.map(jnp.subtract, weighted[0], out[1][1]))
        self.assertGreater(float(moved), 1e-6)  # the weights did change the gradient

    def test_a_slice_count_that_does_not_divide_the_batch_is_refused(self):
        from diffusion_jax import config_lib

        config = tiny_config(num_microbatches=5)
        with self.assertRaisesRegex(
            config_lib.ConfigError, r'num_microbatches: 5 does not divide .* 32 .*e\.g\. 4'
        ):
            config_lib.validate(config)


@pytest.mark.slow  # each test compiles its own train step (a minute on 2 cores)
class TrainStepTest(parameterized.TestCase):
    def test_ema_is_the_decayed_average_and_the_first_step_has_learning_rate_zero(self):
        config = tiny_config()
        model = models.get_model(config)
        tx, lr_fn = train_state_lib.create_optimizer(config.optim)
        state = train_state_lib.create_train_state(model, tx, jax.random.key(0), (8, 8, 1))
        step = jax.jit(
            lambda s, b, r: train.train_step(
                s,
                b,
                r,
                diffusion=experiment.create_diffusion(config),
                ema_decay=0.9,
                learning_rate_fn=lr_fn,
            )
        )
        batch = {'image': jnp.zeros((4, 8, 8, 1))}
        s1, m1 = step(state, batch, jax.random.key(1))
        # The original warm-up is lr * step / warmup: zero at step 0, so nothing moves.
        self.assertEqual(float(m1['learning_rate']), 0.0)
        self.assertTrue(_leaves_equal(s1.params, state.params))
        s2, m2 = step(s1, batch, jax.random.key(1))
        expected_lr = config.optim.learning_rate / config.optim.warmup_steps
        self.assertAlmostEqual(float(m2['learning_rate']), expected_lr, places=9)
        for p_new, e_old, e_new in zip(
            jax.tree.leaves(s2.params),
            jax.tree.leaves(s1.ema_params),
            jax.tree.leaves(s2.ema_params),
            strict=True,
        ):
            np.testing.assert_allclose(e_new, 0.9 * e_old + 0.1 * p_new, rtol=1e-6, atol=1e-7)
        for key in ('loss', 'mse', 'vb', 'grad_norm', 'loss_q0', 'loss_q3'):
            self.assertIn(key, m2)

    def test_extra_emas_are_the_decayed_averages_of_their_rates(self):
        config = tiny_config()
        config.optim.warmup_steps = 0
        tx, lr_fn = train_state_lib.create_optimizer(config.optim)
        state = train_state_lib.create_train_state(
            models.get_model(config), tx, jax.random.key(0), (8, 8, 1), num_extra_ema=2
        )
        step = jax.jit(lambda s, b: train.train_step(
            s, b, jax.random.key(1), diffusion=experiment.create_diffusion(config),
            ema_decay=0.9, learning_rate_fn=lr_fn, ema_decays=(0.5, 0.0)))  # fmt: skip
        batch = {'image': jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)))}
        s1 = step(state, batch)[0]
        s2 = step(s1, batch)[0]
        trees = [s2.params, s1.ema_params, s2.ema_params, s1.extra_ema['ema_1'],
                 s2.extra_ema['ema_1'], s2.extra_ema['ema_2']]  # fmt: skip
        for p, e_old, e_new, half_old, half_new, zero in zip(*map(jax.tree.leaves, trees),
                                                              strict=True):  # fmt: skip
            np.testing.assert_allclose(e_new, 0.9 * e_old + 0.1 * p, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(half_new, 0.5 * half_old + 0.5 * p, rtol=1e-6, atol=1e-7)
            np.testing.assert_array_equal(zero, p)
        self.assertFalse(_leaves_equal(s2.params, state.params))

    def test_a_non_finite_step_changes_nothing_but_the_step(self):
        config = tiny_config()
        config.optim.warmup_steps = 0
        state, step = _fresh_state_and_step(config)
        clean = np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
        poisoned = clean.copy()
        poisoned[2, 3, 4, 0] = np.nan
        s1, m1 = step(state, {'image': jnp.asarray(poisoned)}, jax.random.key(1))
        self.assertEqual(float(m1['nonfinite']), 1.0)
        self.assertEqual(int(s1.step), 1)
        self.assertTrue(_leaves_equal(s1.params, state.params))
        self.assertTrue(_leaves_equal(s1.ema_params, state.ema_params))
        self.assertTrue(_leaves_equal(s1.opt_state, state.opt_state))
        s2, m2 = step(s1, {'image': jnp.asarray(clean)}, jax.random.key(1))
        self.assertEqual(float(m2['nonfinite']), 0.0)
        self.assertFalse(_leaves_equal(s2.params, s1.params))

    @pytest.mark.slow  # a 30-step training loop
    def test_too_many_non_finite_steps_in_a_row_stop_the_run_with_the_checkpoint_intact(self):
        from diffusion_jax import input_pipeline

        clean_iterator = input_pipeline.train_iterator

        def poisoned_after_5(data_config, **kwargs):
            for i, batch in enumerate(clean_iterator(data_config, **kwargs), kwargs['start_step']):
                if i >= 5:
                    batch = {'image': np.full_like(batch['image'], np.nan)}
                yield batch

        config = tiny_config(num_train_steps=30, checkpoint_every_steps=4, max_nonfinite_steps=3)
        with tempfile.TemporaryDirectory() as workdir:
            with (
                mock.patch.object(input_pipeline, 'train_iterator', poisoned_after_5),
                self.assertLogs(level='WARNING') as logs,
                self.assertRaisesRegex(FloatingPointError, r'3 steps in a row \(up to step 8\)'),
            ):
                train.train_and_evaluate(config, workdir)
            skipped = [line for line in logs.output if 'update skipped' in line]
            self.assertLen(skipped, 3)
            self.assertIn('step 6: non-finite', skipped[0])
            steps = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
            # Step 8 is saved before step 8's own flag is read; it holds step 5's parameters.
            self.assertEqual(steps, ['4', '8'])
            ckpt = checkpointing.Checkpointer(
                os.path.join(workdir, 'checkpoints'), keep=3, save_every_steps=4
            )
            target = train_state_lib.create_train_state(
                models.get_model(config),
                train_state_lib.create_optimizer(config.optim)[0],
                jax.random.key(0),
                (8, 8, 1),
            )
            restored, _ = ckpt.restore(target)
            ckpt.close()
            self.assertTrue(all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored)))

    def test_the_cpu_compile_options_take_the_same_steps_as_xlas_defaults(self):
        config = tiny_config()
        config.model.ch_mult = (1,)  # one level: a smaller step to compile twice
        d = experiment.create_diffusion(config)
        model = models.get_model(config)
        tx, lr_fn = train_state_lib.create_optimizer(config.optim)
        mesh = parallel.create_mesh()
        with mock.patch.dict(os.environ, {'XLA_FLAGS': ''}):
            self.assertEqual(
                train.train_step_compiler_options(mesh), train.CPU_TRAIN_STEP_COMPILER_OPTIONS
            )
            step = train.make_jit_train_step(config, d, lr_fn, mesh)
        level, preset = (
            '--xla_backend_optimization_level=0',
            '--xla_cpu_opt_preset=CPU_OPT_PRESET_DEFAULT',
        )
        with mock.patch.dict(os.environ, {'XLA_FLAGS': level}):  # the flag's option is dropped
            self.assertEqual(
                train.train_step_compiler_options(mesh),
                {'xla_cpu_opt_preset': 'CPU_OPT_PRESET_FAST_COMPILE'},
            )
        with mock.patch.dict(os.environ, {'XLA_FLAGS': f'{preset} {level}'}):
            self.assertIsNone(train.train_step_compiler_options(mesh))
        step_fn = functools.partial(train.train_step, diffusion=d, learning_rate_fn=lr_fn)
        defaults = jax.jit(  # XLA's default preset, whatever the tests' XLA_FLAGS say
            functools.partial(step_fn, ema_decay=config.optim.ema_decay),
            compiler_options={'xla_cpu_opt_preset': 'CPU_OPT_PRESET_DEFAULT'},
        )
        rng = jax.random.key(2)
        states = []
        for fn in (step, defaults):
            state = train_state_lib.create_train_state(model, tx, jax.random.key(0), (8, 8, 1))
            state = jax.device_put(state, parallel.replicated(mesh))
            for i in range(3):
                images = np.random.default_rng(i).uniform(-1, 1, (32, 8, 8, 1)).astype('f4')
                batch = jax.device_put({'image': images}, parallel.batch_sharding(mesh))
                state, metrics = fn(state, batch, rng)
            states.append((jax.device_get(state.params), float(metrics['loss'])))
        (p_cpu, loss_cpu), (p_default, loss_default) = states
        np.testing.assert_allclose(loss_cpu, loss_default, rtol=1e-5)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p_cpu, p_default
        )

    def test_loss_by_quarter_matches_the_per_example_losses(self):
        config = tiny_config()
        d = experiment.create_diffusion(config)
        model = models.get_model(config)
        tx, lr_fn = train_state_lib.create_optimizer(config.optim)
        state = train_state_lib.create_train_state(model, tx, jax.random.key(0), (8, 8, 1))
        batch = {'image': jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (64, 8, 8, 1)))}
        rng = jax.random.key(5)
        step = jax.jit(
            lambda s, b, r: train.train_step(
                s, b, r, diffusion=d, ema_decay=0.9, learning_rate_fn=lr_fn
            )
        )
        _, metrics = step(state, batch, rng)
        # Recompute t the way the step documents it: fold_in(rng, step), split 3, randint.
        t_rng = jax.random.split(jax.random.fold_in(rng, 0), 3)[0]
        t = np.asarray(jax.random.randint(t_rng, (64,), 0, d.num_timesteps))
        quarters = [
            (t >= q * d.num_timesteps / 4) & (t < (q + 1) * d.num_timesteps / 4) for q in range(4)
        ]
        counts = [int(m.sum()) for m in quarters]
        self.assertEqual(sum(counts), 64)
        weighted = sum(c * float(metrics[f'loss_q{q}']) for q, c in enumerate(counts) if c)
        np.testing.assert_allclose(weighted / 64, float(metrics['loss']), rtol=1e-5)


_EIGHT_DEVICES = textwrap.dedent(
    """
    import jax, numpy as np
    from configs import digits
    from diffusion_jax import experiment, models, parallel, train, train_state as tsl
    assert jax.device_count() == 8, jax.devices()
    config = digits.get_config()
    config.model.ch, config.model.num_res_blocks, config.model.dropout = 32, 1, 0.1
    model, d = models.get_model(config), experiment.create_diffusion(config)
    tx, lr_fn = tsl.create_optimizer(config.optim)
    batch = {'image': np.random.default_rng(0).uniform(-1, 1, (16, 8, 8, 1)).astype('f4')}
    for slices in (1, 2):  # 2: the microbatch scan, each device's 2 rows split over the slices
        config.training.num_microbatches = slices
        results = []
        for devices in (jax.devices()[:1], jax.devices()):
            mesh = parallel.create_mesh(devices)
            state = tsl.create_train_state(model, tx, jax.random.key(0), (8, 8, 1))
            state = jax.device_put(state, parallel.replicated(mesh))
            step = train.make_jit_train_step(config, d, lr_fn, mesh)
            for i in range(3):
                b = jax.device_put(batch, parallel.batch_sharding(mesh))
                state, metrics = step(state, b, jax.random.key(1))
                if i == 1:
                    two_steps = jax.device_get(state.params)
            results.append((jax.device_get(state.params), float(metrics['loss'])))
        (p1, l1), (p8, l8) = results
        np.testing.assert_allclose(l8, l1, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
        print('MATCH', slices, l1, l8)
    # Two steps in one call (training.steps_per_call) on the 8 devices, each of two microbatches
    # as in the last run: its first two steps.
    state = tsl.create_train_state(model, tx, jax.random.key(0), (8, 8, 1))
    state = jax.device_put(state, parallel.replicated(mesh))
    pair = train.make_jit_train_step(config, d, lr_fn, mesh, num_steps=2)
    b = jax.device_put(batch, parallel.batch_sharding(mesh))
    state, metrics = pair(state, (b, b), jax.random.key(1))
    assert metrics['nonfinite_steps'].shape == (2,), metrics['nonfinite_steps']
    for a, b in zip(jax.tree.leaves(two_steps), jax.tree.leaves(jax.device_get(state.params))):
        np.testing.assert_array_equal(b, a)
    print('MATCH two steps per call')
    """
)


@pytest.mark.slow  # 8 CPU devices need a fresh process
class MultiDeviceTest(parameterized.TestCase):
    def test_eight_devices_match_one_device_on_the_same_global_batch(self):
        env = fast_compile.env(8, PYTHONPATH=str(REPO))
        proc = subprocess.run(
            [sys.executable, '-c', _EIGHT_DEVICES],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        self.assertIn('MATCH 1 ', proc.stdout)  # one slice
        self.assertIn('MATCH 2 ', proc.stdout)  # two microbatches
        self.assertIn('MATCH two steps per call', proc.stdout)


@pytest.mark.slow  # trains in a subprocess
class PreemptionTest(parameterized.TestCase):
    def _main(self, workdir, *overrides):
        return [
            sys.executable,
            '-m',
            'diffusion_jax.main',
            '--config=configs/digits.py',
            f'--workdir={workdir}',
            '--config.model.ch=32',
            '--config.model.num_res_blocks=1',
            '--config.training.batch_size=16',
            '--config.training.sample_every_steps=0',
            '--config.training.log_every_steps=5',
            *overrides,
        ]

    def test_sigterm_saves_a_checkpoint_exits_cleanly_and_the_next_start_resumes(self):
        with tempfile.TemporaryDirectory() as workdir:
            log_path = os.path.join(workdir, 'log.txt')
            with open(log_path, 'w') as log:
                proc = subprocess.Popen(
                    self._main(workdir, '--config.training.num_train_steps=100000'),
                    cwd=REPO,
                    env=_FAST_COMPILE_ENV,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
                try:
                    deadline = time.time() + 300
                    while 'step 10/' not in pathlib.Path(log_path).read_text():
                        self.assertIsNone(proc.poll(), pathlib.Path(log_path).read_text()[-2000:])
                        self.assertLess(time.time(), deadline, 'training never reached step 10')
                        time.sleep(0.5)
                    proc.send_signal(signal.SIGTERM)
                    self.assertEqual(proc.wait(timeout=120), 0)
                finally:
                    if proc.poll() is None:
                        proc.kill()
            ckpt = checkpointing.Checkpointer(
                os.path.join(workdir, 'checkpoints'), keep=3, save_every_steps=1000
            )
            saved = ckpt.latest_valid_step()
            ckpt.close()
            self.assertIsNotNone(saved)
            self.assertGreaterEqual(saved, 10)
            again = subprocess.run(
                self._main(workdir, f'--config.training.num_train_steps={saved + 2}'),
                cwd=REPO,
                env=_FAST_COMPILE_ENV,
                capture_output=True,
                text=True,
                timeout=300,
            )
            self.assertEqual(again.returncode, 0, again.stderr[-3000:])
            self.assertIn(f'resumed from step {saved}', again.stderr)


if __name__ == '__main__':
    absltest.main()
