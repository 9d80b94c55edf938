"""The NLL bound over a dataset, rate-distortion, and `--mode=eval` on a tiny trained workdir."""

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats
from absl.testing import absltest, parameterized
from generate_test import tiny_config

from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import (
    evaluate,
    experiment,
    image_io,
    input_pipeline,
    models,
    parallel,
    sampling,
    train,
)
from diffusion_jax.evaluation import bpd


class RateDistortionTest(parameterized.TestCase):
    def test_rate_is_the_prior_plus_the_terms_still_to_send(self):
        vb = np.array([0.5, 0.25, 0.125, 0.0625])
        mse = np.array([0.01, 0.04, 0.09, 0.16])
        out = bpd.rate_distortion(vb, 0.03, mse)
        # Having x_t (code index t), the receiver got the prior and L_{T-1}, ..., L_{t+1}.
        expected_rate = [0.03 + vb[t + 1 :].sum() for t in range(4)]
        np.testing.assert_allclose(out['rate_bpd'], expected_rate)
        np.testing.assert_allclose(out['distortion_rmse'], 127.5 * np.array([0.1, 0.2, 0.3, 0.4]))
        # With the decoder term L_0 too, the rate reaches the whole bound.
        self.assertAlmostEqual(out['rate_bpd'][0] + vb[0], 0.03 + vb.sum())


@pytest.mark.slow  # compiles the T-step NLL bound of a U-Net
class EvaluateBpdTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.config = tiny_config()
        self.model = models.get_model(self.config)
        self.diffusion = experiment.create_diffusion(self.config)
        self.params = self.model.init(
            jax.random.key(0),
            np.zeros((1, 8, 8, 1), np.float32),
            np.zeros((1,), np.int32),
            train=False,
        )['params']
        self.images = image_io.to_float(input_pipeline.load_images(self.config.data, 'test')[:5])

    def _direct(self, x, rng):
        """calc_bpd_loop on one batch, unsharded: the reference."""

        def model_fn(x_t, t):
            return self.model.apply({'params': self.params}, x_t, t, train=False)

        out = diffusion_lib.calc_bpd_loop(self.diffusion, model_fn, x, rng)
        return {k: np.asarray(v, np.float64) for k, v in out.items()}

    def test_a_respaced_bound_is_the_bound_of_the_respaced_process(self):
        mesh = parallel.create_mesh()
        kept = np.array([0, 3, 7, 12, 15, 19])  # of T = 20
        respaced = sampling.respace(self.diffusion, kept)
        rng = jax.random.key(2)
        x = jnp.asarray(self.images[:4])

        def model_fn(x_t, t):  # the respaced step t is the trained network's step kept[t]
            t_model = jnp.asarray(kept)[t]
            return self.model.apply({'params': self.params}, x_t, t_model, train=False)

        want = diffusion_lib.calc_bpd_loop(respaced, model_fn, x, rng)
        got = bpd.make_bpd_fn(self.model, self.diffusion, mesh, kept)(self.params, x, rng, None)
        self.assertEqual(got['vb'].shape, (4, 6))
        for key in ('total_bpd', 'prior_bpd', 'vb', 'xstart_mse'):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
        # Keeping T-1 keeps alpha_bar_T: the prior term is the full process's.
        full = bpd.make_bpd_fn(self.model, self.diffusion, mesh)(self.params, x, rng, None)
        np.testing.assert_allclose(got['prior_bpd'], full['prior_bpd'], rtol=1e-6)
        every = bpd.make_bpd_fn(self.model, self.diffusion, mesh, np.arange(20))
        np.testing.assert_array_equal(every(self.params, x, rng, None)['vb'], full['vb'])

    def test_padding_is_dropped_and_the_mean_is_over_real_images(self):
        mesh = parallel.create_mesh()
        bpd_fn = bpd.make_bpd_fn(self.model, self.diffusion, mesh)
        rng = jax.random.key(9)
        batches = [{'image': self.images[:4]}, {'image': self.images[4:]}]
        result = bpd.evaluate_bpd(bpd_fn, self.params, batches, mesh=mesh, batch_size=4, rng=rng)
        first = self._direct(self.images[:4], jax.random.fold_in(rng, 0))
        last = self._direct(np.repeat(self.images[4:], 4, axis=0), jax.random.fold_in(rng, 1))
        total = np.concatenate([first['total_bpd'], last['total_bpd'][:1]])
        vb = np.concatenate([first['vb'], last['vb'][:1]])
        self.assertEqual(result['num_images'], 5)
        self.assertLen(result['vb_per_t'], self.config.diffusion.num_timesteps)
        np.testing.assert_allclose(result['total_bpd'], total.mean(), rtol=1e-5)
        np.testing.assert_allclose(result['vb_per_t'], vb.mean(axis=0), rtol=1e-5)
        self.assertAlmostEqual(result['decoder_bpd'], result['vb_per_t'][0])
        # The parts add up to the whole.
        np.testing.assert_allclose(
            result['prior_bpd'] + sum(result['vb_per_t']), result['total_bpd'], rtol=1e-6
        )

    def test_the_bound_is_deterministic_for_a_seed(self):
        mesh = parallel.create_mesh()
        bpd_fn = bpd.make_bpd_fn(self.model, self.diffusion, mesh)

        def run(seed):
            return bpd.evaluate_bpd(
                bpd_fn,
                self.params,
                [{'image': self.images[:4]}],
                mesh=mesh,
                batch_size=4,
                rng=jax.random.key(seed),
            )['total_bpd']

        self.assertEqual(run(1), run(1))
        self.assertNotEqual(run(1), run(2))


def _eigh_fd(f1: np.ndarray, f2: np.ndarray) -> float:
    """FD of two feature sets from np.mean/np.cov, with Tr sqrtm(S1 S2) from eigenvalues."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


class _KilledError(Exception):
    pass


class FidTest(parameterized.TestCase):
    @pytest.mark.slow  # the Inception network
    def test_streamed_fid_and_is_of_a_resumed_run_equal_whole_set_moments_of_the_network(self):
        from diffusion_jax import generate
        from diffusion_jax.evaluation import inception

        with tempfile.TemporaryDirectory() as tmp:
            weights = os.path.join(tmp, 'inception.npz')
            params = inception.random_params(jax.random.key(0))
            inception.save_params(weights, params, source_sha256='0' * 64)
            gen = np.random.default_rng(0)
            real = gen.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
            np.savez(os.path.join(tmp, 'real.npz'), images=real)
            samples = gen.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
            config = tiny_config()
            config.data.dataset, config.data.path = 'npz', os.path.join(tmp, 'real.npz')
            config.eval.inception_weights = weights
            config.eval.batch_size = 4
            with self.assertRaisesRegex(evaluate.EvalError, 'inception_sha256'):
                evaluate.load_inception(config)  # not converted from the official file
            config.eval.inception_sha256 = ''
            with self.assertLogs(level='WARNING') as logs:
                loaded = evaluate.load_inception(config)
            self.assertIn('will not be comparable', logs.output[0])
            mesh = parallel.create_mesh()
            feature_fn = inception.make_feature_fn(loaded, mesh=mesh)

            calls = []

            def sampler(params, rng, first_index):
                del params, rng
                calls.append(first_index)
                if len(calls) == 2:  # the first run dies while drawing its second batch
                    raise _KilledError
                rows = np.zeros((4, 8, 8, 1), np.float32)
                chunk = samples[first_index : first_index + 4]
                rows[: len(chunk)] = chunk / np.float32(127.5) - 1
                return rows

            def streamed_run():
                streamed = evaluate.StreamingFidIs(feature_fn, mesh, len(samples))
                generate.generate_to_npz(
                    sampler, None, path=os.path.join(tmp, 'samples.npz'), num_samples=5,
                    batch_size=4, seed=0, spec={}, on_batch=streamed,
                )  # fmt: skip
                return streamed

            with self.assertRaises(_KilledError):
                streamed_run()
            streamed = streamed_run()  # images 0-3 replayed from the shard, image 4 drawn
            with self.assertRaisesRegex(evaluate.EvalError, 'compute_reference=True'):
                evaluate.fid_is(config, mesh, streamed)
            config.eval.compute_reference = True
            got = evaluate.fid_is(config, mesh, streamed)
            cached = evaluate.reference_stats_path(config)
            self.assertEqual(os.path.dirname(cached), tmp)  # next to the data
            mtime = os.path.getmtime(cached)
            self.assertEqual(evaluate.fid_is(config, mesh, streamed), got)  # reads the cache
            self.assertEqual(os.path.getmtime(cached), mtime)

            # The whole sets at once: the same network (it defines the metric; chunks of 4 are
            # the shape already compiled, compiling Inception on CPU takes a minute), then the
            # moments, the distance and the score in NumPy / SciPy, not `fid`.
            def network(images):
                rgb = np.repeat(images, 3, axis=-1)
                pools, logits = [], []
                for i in range(0, len(rgb), 4):
                    chunk = rgb[i : i + 4]
                    pad = np.zeros((4 - len(chunk), *chunk.shape[1:]), np.uint8)
                    pool, logit = feature_fn(np.concatenate([chunk, pad]))
                    pools.append(np.asarray(pool, np.float64)[: len(chunk)])
                    logits.append(np.asarray(logit, np.float64)[: len(chunk)])
                return np.concatenate(pools), np.concatenate(logits)

            f_real, _ = network(real)
            f_fake, logits = network(samples)
            np.testing.assert_allclose(got['fid'], _eigh_fd(f_fake, f_real), rtol=1e-3)
            p = scipy.special.softmax(logits, axis=-1)
            kl = [scipy.stats.entropy(row, p.mean(0)) for row in p]
            # 5 samples make one split (splits never hold fewer than 100 images).
            np.testing.assert_allclose(got['inception_score'], np.exp(np.mean(kl)), rtol=1e-4)

    def test_a_missing_weights_file_is_refused_with_the_way_to_get_it(self):
        config = tiny_config()
        config.eval.inception_weights = '/nonexistent/inception.npz'
        with self.assertRaisesRegex(evaluate.EvalError, 'no Inception weights file.*convert_'):
            evaluate.load_inception(config)

    def test_no_weights_setting_skips_fid_with_the_way_to_get_it(self):
        config = tiny_config()
        self.assertIsNone(evaluate.load_inception(config))
        with self.assertLogs(level='WARNING') as logs:
            got = evaluate.fid_is(config, parallel.create_mesh(), None)
        self.assertEqual(got, {'fid': 'skipped', 'inception_score': 'skipped'})
        self.assertIn('convert_inception', logs.output[0])


@pytest.mark.slow  # trains, then the whole eval mode
class EvalModeTest(parameterized.TestCase):
    def test_eval_mode_writes_the_table_plots_and_reports_fid_as_skipped(self):
        with tempfile.TemporaryDirectory() as workdir:
            config = tiny_config()
            train.train_and_evaluate(config, workdir)
            config.eval.bpd = True
            config.eval.num_bpd_images = 8
            config.eval.batch_size = 4
            config.eval.num_samples = 12
            with self.assertLogs(level='WARNING') as logs:
                metrics = evaluate.run_eval_mode(config, workdir)
            self.assertTrue(any('FID/IS skipped' in line for line in logs.output))
            step = config.training.num_train_steps
            with open(os.path.join(workdir, 'eval', f'metrics_{step}.json')) as f:
                saved = json.load(f)
            self.assertEqual(saved, json.loads(json.dumps(metrics)))
            self.assertEqual(saved['fid'], 'skipped')
            self.assertEqual(saved['nll_images'], 8)
            self.assertEqual(saved['num_samples'], 12)
            self.assertBetween(saved['digits_is'], 1.0, 10.0)
            self.assertBetween(saved['real_heldout_digits_is'], 9.0, 10.0)
            with open(os.path.join(workdir, 'eval', f'bpd_{step}.json')) as f:
                self.assertLen(json.load(f)['rate_bpd'], config.diffusion.num_timesteps)
            for name in (f'bpd_per_t_{step}.png', f'rate_distortion_{step}.png'):
                self.assertTrue(os.path.getsize(os.path.join(workdir, 'eval', name)) > 1000)
            config.eval.bpd_num_steps = '5,5'  # the bound of a 10-step respaced process
            respaced = evaluate.run_eval_mode(config, workdir)
            self.assertEqual(respaced['nll_terms'], 10)
            self.assertNotEqual(respaced['nll_bpd'], metrics['nll_bpd'])
            with open(os.path.join(workdir, 'eval', f'bpd_{step}.json')) as f:
                self.assertLen(json.load(f)['vb_per_t'], 10)


if __name__ == '__main__':
    absltest.main()
