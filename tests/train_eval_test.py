"""Evaluation during training: EMA sample scores in TensorBoard, the best checkpoint kept."""

import os
import tempfile
from unittest import mock

import jax
import numpy as np
import pytest
from absl.testing import absltest
from tensorboard.backend.event_processing import event_accumulator

from configs import digits
from diffusion_jax import checkpointing, config_lib, generate, parallel, sampling, train, train_eval
from diffusion_jax.evaluation import digits as digits_lib


def tiny_config(num_train_steps: int):
    """A tiny digits run scored every 2 steps on 8 DDIM samples, keeping the best digits FD."""
    config = digits.get_config()
    config.model.ch = 16
    config.model.num_groups = 8
    config.model.ch_mult = (1,)
    config.training.batch_size = 8
    config.training.num_train_steps = num_train_steps
    config.training.checkpoint_every_steps = 2
    config.training.log_every_steps = 2
    config.training.sample_every_steps = 0
    config.training.eval_every_steps = 2
    config.training.eval_num_samples = 8
    config.training.best_metric = 'digits_fd'
    config.optim.warmup_steps = 0
    config.sampling.sampler = 'ddim'
    config.sampling.num_steps = 3
    config.sampling.batch_size = 4
    config.sampling.seed = 5
    return config


def _scalars(logdir: str, tag: str) -> dict[int, float]:
    acc = event_accumulator.EventAccumulator(logdir, size_guidance={'scalars': 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def _digits_fd_of_checkpoint(config, workdir: str, step: int) -> float:
    """The digits FD of 8 DDIM samples of checkpoint `step`'s EMA parameters, computed here."""
    mesh = parallel.create_mesh()
    exp, params, _ = generate.restore_ema(workdir, config, mesh, step)
    sample_fn = sampling.make_sample_fn(
        exp.model, exp.diffusion, batch_size=8, image_shape=exp.image_shape, sampler='ddim',
        num_steps=3, eta=0.0, clip_denoised=True, mesh=mesh,
    )  # fmt: skip
    images = np.asarray(parallel.to_host(sample_fn(params, jax.random.key(5), 0)))
    uint8 = np.clip(np.round((images + 1) * 127.5), 0, 255).astype(np.uint8)
    return digits_lib.digits_metrics(uint8, digits_lib.get_classifier())['digits_fd']


@pytest.mark.slow  # trains and samples
class TrainEvalTest(absltest.TestCase):
    def test_scores_are_logged_the_best_is_kept_and_the_train_step_compiles_once(self):
        config = tiny_config(num_train_steps=6)
        compiled = []

        def capture(*args, **kwargs):
            compiled.append(make_jit(*args, **kwargs))
            return compiled[-1]

        make_jit = train.make_jit_train_step
        with tempfile.TemporaryDirectory() as workdir:
            with mock.patch.object(train, 'make_jit_train_step', capture):
                train.train_and_evaluate(config, workdir)
            self.assertEqual(compiled[0]._cache_size(), 1)  # evaluating recompiled nothing
            fd = _scalars(workdir, 'eval/digits_fd')
            self.assertEqual(sorted(fd), [2, 4, 6])
            self.assertEqual(sorted(_scalars(workdir, 'eval/digits_is')), [2, 4, 6])
            for step in (2, 6):  # the logged score is the checkpoint's, recomputed here
                want = _digits_fd_of_checkpoint(config, workdir, step)
                self.assertAlmostEqual(fd[step], want, delta=1e-4 * max(1.0, abs(want)))
            best = min(fd, key=fd.get)
            kept = checkpointing.Checkpointer.read_only(
                generate.checkpoint_dir(os.path.join(workdir, train_eval.BEST_DIR))
            )
            self.assertEqual(kept.latest_valid_step(), best)
            meta = kept.restore_meta()
            kept.close()
            self.assertEqual(meta['metric'], 'digits_fd')
            self.assertAlmostEqual(meta['value'], fd[best], places=4)
            # A resumed run knows the best so far: a later step replaces it only if better.
            config.training.num_train_steps = 8
            train.train_and_evaluate(config, workdir)
            fd = _scalars(workdir, 'eval/digits_fd')
            kept = checkpointing.Checkpointer.read_only(
                generate.checkpoint_dir(os.path.join(workdir, train_eval.BEST_DIR))
            )
            self.assertEqual(kept.latest_valid_step(), min(fd, key=fd.get))
            kept.close()


class ConfigTest(absltest.TestCase):
    def test_settings_that_cannot_be_scored_are_refused(self):
        for changes, fragment in (
            ({'best_metric': 'fid'}, "'fid' needs Inception weights"),
            ({'eval_every_steps': 0}, 'needs evaluation during training'),
        ):
            config = tiny_config(4)
            config.training.update(changes)
            with self.assertRaisesRegex(config_lib.ConfigError, fragment):
                config_lib.validate(config)
        config = tiny_config(4)
        config.data.dataset = 'npz'
        config.data.path = '/data.npz'
        config.training.best_metric = ''
        with self.assertRaisesRegex(config_lib.ConfigError, 'nothing to score'):
            config_lib.validate(config)
        config.training.best_metric = 'digits_is'
        config.eval.inception_weights = '/w.npz'
        with self.assertRaisesRegex(config_lib.ConfigError, 'digits dataset only'):
            config_lib.validate(config)


if __name__ == '__main__':
    absltest.main()
