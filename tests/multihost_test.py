"""Two real processes joined by `jax.distributed` on this machine (CPU devices, gloo collectives).

Each process has 2 CPU devices, so the job sees one 4-device mesh over 2 hosts: the multi-host
paths (per-host data, global batches, collective checkpoints, lead-process outputs) run for real.
"""

import glob
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import fast_compile
import numpy as np
import pytest
import scipy.stats
from absl.testing import absltest, parameterized

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 600

# Trains the tiny config of generate_test, then saves this process's copy of the parameters.
_WORKER = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from absl import logging
    from diffusion_jax import parallel, train
    logging.set_verbosity(logging.INFO)
    from generate_test import tiny_config
    workdir, out, steps, port, pid, nproc = sys.argv[1:7]
    if int(nproc) > 1:
        parallel.initialize_distributed(f'localhost:{port}', int(nproc), int(pid))
    config = tiny_config()
    config.training.num_train_steps = int(steps)
    config.training.checkpoint_every_steps = 10
    config.training.sample_every_steps = 20
    state = train.train_and_evaluate(config, workdir)
    local = {
        'params/' + '/'.join(str(k.key) for k in path): np.asarray(leaf.addressable_data(0))
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)
    }
    np.savez(out, step=int(state.step), process_count=jax.process_count(),
             device_count=jax.device_count(), **local)
""")


# FID's multi-host plumbing with a cheap stand-in for the Inception network.
# 1. The streaming path of --mode=eval: NUM images drawn by a stand-in sampler (image i comes from
#    fold_in(key(0), i)), killed after 3 batches, resumed and killed after 5, then resumed:
#    generate_to_npz replays the shards and draws the rest into StreamingFidIs, under tracemalloc.
# 2. Uneven per-host chunk lists through _features, and the reference statistics of the digits
#    reference split read by both hosts.
_FID_WORKER = textwrap.dedent("""
    import sys, tracemalloc
    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental import multihost_utils
    from diffusion_jax import evaluate, generate, parallel
    from diffusion_jax.evaluation import fid
    from generate_test import tiny_config
    from multihost_test import BATCH, NUM, SHAPE, draw
    out, stats_path, samples_path, port, pid, nproc = sys.argv[1:7]
    parallel.initialize_distributed(f'localhost:{port}', int(nproc), int(pid))
    mesh = parallel.create_mesh()

    @jax.jit
    def features(images):  # uint8 [B, H, W, 3] -> ([B, 7] "pool", [B, 4] "logits")
        x = images.astype(jnp.float32)
        pool = jnp.concatenate([x.mean((1, 2)), x.std((1, 2)), x[:, :1, 0, 0]], axis=-1)
        return pool, pool[:, :4]

    sampler = jax.jit(draw, out_shardings=parallel.batch_sharding(mesh))

    class Killed(Exception):
        pass

    def dies_after(shards):  # also compiles the Inception input and the features
        warm = evaluate.StreamingFidIs(features, mesh, NUM)

        def on_batch(images, n, start):
            warm(images, n, start)
            if start == (shards - 1) * BATCH:
                raise Killed
        return on_batch

    def run(on_batch):
        generate.generate_to_npz(
            lambda params, rng, first: sampler(first), None, path=samples_path,
            num_samples=NUM, batch_size=BATCH, seed=0, spec={}, on_batch=on_batch)

    # Killed after 3 shards, then resumed and killed after 5: the second run also compiles the
    # replay of finished shards, so the traced run below compiles nothing but the closing
    # barrier (warmed here too). Compiling allocates host memory that has nothing to do with N.
    for shards in (3, 5):
        try:
            run(dies_after(shards))
        except Killed:
            pass
    multihost_utils.sync_global_devices('warm the barrier')
    streamed = evaluate.StreamingFidIs(features, mesh, NUM)
    tracemalloc.start()
    run(streamed)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f'traced peak host memory {peak} bytes for {NUM * np.prod(SHAPE)} bytes of samples')
    result = {'peak': peak, 'count': streamed.stats.count, 'is': streamed.scores.result()}
    result['sample_mu'], result['sample_sigma'] = streamed.stats.mean, streamed.stats.covariance
    crops = np.asarray(parallel.to_host(generate.to_uint8(sampler(0))))[:, :4, :4]
    # Process 0 has three chunks (4, 4 and 1 rows), process 1 one chunk of 2 rows.
    uneven = [crops[:4], crops[4:8], crops[8:9]] if int(pid) == 0 else [crops[9:11]]
    stats = fid.RunningStats()
    evaluate._features(features, mesh, uneven, (4, 4, 3), 8, stats)
    result['uneven_mu'], result['uneven_sigma'] = stats.mean, stats.covariance
    config = tiny_config()
    config.eval.compute_reference = True
    config.eval.reference_stats = stats_path
    result['ref_mu'], result['ref_sigma'] = evaluate._reference(config, features, mesh, 8)
    np.savez(out, **result)
""")
NUM, BATCH, SHAPE = 1024, 16, (32, 32, 3)


def draw(first_index):
    """The stand-in sampler: images first_index, ..., + BATCH - 1, each from fold_in(key(0), i)."""
    import jax

    def one(i):
        return jax.random.uniform(jax.random.fold_in(jax.random.key(0), i), SHAPE, minval=-1)

    return jax.vmap(one)(first_index + jax.numpy.arange(BATCH))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def _env(devices_per_process: int) -> dict[str, str]:
    pythonpath = os.pathsep.join([str(REPO / 'tests'), str(REPO)])
    return fast_compile.env(devices_per_process, PYTHONPATH=pythonpath)


def _run_together(commands: list[list[str]], env: dict[str, str]) -> list[str]:
    """Starts every command at once; returns their outputs; fails if any exits non-zero."""
    procs = [
        subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for cmd in commands
    ]
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        outputs.append(out)
    for proc, out in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            raise AssertionError(f'exit {proc.returncode}:\n{out[-4000:]}')
    return outputs


def _train(workdir: str, outdir: str, steps: int, num_processes: int, devices: int) -> list[dict]:
    port = _free_port()
    commands = [
        [
            sys.executable,
            '-c',
            _WORKER,
            workdir,
            os.path.join(outdir, f'params_{pid}.npz'),
            str(steps),
            str(port),
            str(pid),
            str(num_processes),
        ]
        for pid in range(num_processes)
    ]
    logs = _run_together(commands, _env(devices))
    results = []
    for pid in range(num_processes):
        with np.load(os.path.join(outdir, f'params_{pid}.npz')) as f:
            results.append({k: f[k] for k in f.files})
        results[-1]['params'] = sorted(k for k in f.files if k.startswith('params/'))
    return results, logs


@pytest.mark.multihost
@pytest.mark.slow
class TwoProcessTest(parameterized.TestCase):
    def test_two_hosts_train_checkpoint_resume_and_sample_like_one(self):
        with tempfile.TemporaryDirectory() as tmp:
            pair_dir, single_dir = os.path.join(tmp, 'pair'), os.path.join(tmp, 'single')
            os.makedirs(pair_dir)
            os.makedirs(single_dir)
            (p0, p1), _ = _train(os.path.join(tmp, 'w_pair'), pair_dir, 20, 2, 2)
            self.assertEqual((int(p0['process_count']), int(p0['device_count'])), (2, 4))
            self.assertEqual(int(p0['step']), 20)
            self.assertNotEmpty(p0['params'])
            for key in p0['params']:  # both hosts hold the same parameters, bit for bit
                np.testing.assert_array_equal(p0[key], p1[key], err_msg=key)

            # One process with the same 4 devices and global batch takes the same steps.
            (single,), _ = _train(os.path.join(tmp, 'w_single'), single_dir, 20, 1, 4)
            self.assertEqual((int(single['process_count']), int(single['device_count'])), (1, 4))
            for key in p0['params']:
                np.testing.assert_allclose(p0[key], single[key], rtol=1e-4, atol=1e-5, err_msg=key)

            workdir = os.path.join(tmp, 'w_pair')
            steps = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
            self.assertEqual(steps, ['10', '20'])
            # Written by process 0 only: one grid, no stray temporary files.
            samples = sorted(os.listdir(os.path.join(workdir, 'samples')))
            self.assertEqual(samples, ['grid_00000020.png'])

            # A restarted pair resumes from step 20 and goes on together.
            (q0, q1), logs = _train(workdir, pair_dir, 30, 2, 2)
            self.assertEqual(int(q0['step']), 30)
            for log in logs:
                self.assertIn('resumed from step 20', log)
            for key in q0['params']:
                np.testing.assert_array_equal(q0[key], q1[key], err_msg=key)

            # --mode=sample through the command line: the npz is written once, by process 0.
            port = _free_port()
            commands = [
                [
                    sys.executable,
                    '-m',
                    'diffusion_jax.main',
                    '--config=configs/digits.py',
                    f'--workdir={workdir}',
                    '--mode=sample',
                    '--config.sampling.num_samples=10',
                    '--config.sampling.batch_size=8',
                    f'--coordinator_address=localhost:{port}',
                    '--num_processes=2',
                    f'--process_id={pid}',
                ]
                for pid in range(2)
            ]
            _run_together(commands, _env(2))
            with np.load(os.path.join(workdir, 'samples', 'samples_30.npz')) as f:
                self.assertEqual(f['images'].shape, (10, 8, 8, 1))
            self.assertEqual(glob.glob(os.path.join(workdir, 'samples', '*partial*')), [])
            self.assertEqual(glob.glob(os.path.join(workdir, 'samples', '.*')), [])

    def test_streamed_fid_of_a_resumed_eval_holds_no_host_all_samples(self):
        from generate_test import tiny_config

        from diffusion_jax import image_io, input_pipeline

        def features(images):  # the worker's stand-in, in NumPy
            x = np.asarray(images, np.float64)
            if x.shape[-1] == 1:
                x = np.repeat(x, 3, axis=-1)
            return np.concatenate([x.mean((1, 2)), x.std((1, 2)), x[:, :1, 0, 0]], axis=-1)

        with tempfile.TemporaryDirectory() as tmp:
            stats_path, samples_path = os.path.join(tmp, 'ref.npz'), os.path.join(tmp, 's.npz')
            port = _free_port()
            commands = [
                [sys.executable, '-c', _FID_WORKER, os.path.join(tmp, f'out_{pid}.npz'),
                 stats_path, samples_path, str(port), str(pid), '2']
                for pid in range(2)
            ]  # fmt: skip
            logs = _run_together(commands, _env(2))
            outs = []
            for pid in range(2):
                with np.load(os.path.join(tmp, f'out_{pid}.npz')) as f:
                    outs.append({k: f[k] for k in f.files})
            samples = np.concatenate([image_io.to_uint8(draw(i)) for i in range(0, NUM, BATCH)])
            with np.load(samples_path) as f:  # the whole file, written once from the shards
                np.testing.assert_array_equal(f['images'], samples)
            want = features(samples)  # float64; the workers' stand-in computes in float32
            for out, log in zip(outs, logs, strict=True):  # the same statistics on both hosts
                self.assertEqual(int(out['count']), NUM)
                np.testing.assert_allclose(out['sample_mu'], want.mean(0), rtol=1e-5)
                np.testing.assert_allclose(
                    out['sample_sigma'], np.cov(want, rowvar=False), rtol=1e-4, atol=1e-6
                )
                # IS of the stand-in "logits" with 10 splits, by scipy's KL per split.
                p = np.exp(want[:, :4]) / np.exp(want[:, :4]).sum(1, keepdims=True)
                scores = [
                    np.exp(np.mean([scipy.stats.entropy(r, part.mean(0)) for r in part]))
                    for part in (p[i * NUM // 10 : (i + 1) * NUM // 10] for i in range(10))
                ]
                np.testing.assert_allclose(out['is'], [np.mean(scores), np.std(scores)], rtol=1e-5)
                # No host held the samples: traced host memory stays under a quarter of them.
                self.assertLess(int(out['peak']), samples.nbytes // 4, log[-2000:])
                print(re.search(r'traced peak .*', log)[0])  # shown with pytest -s
            # Uneven chunk lists of 4x4 crops: every row of both hosts once (4 + 4 + 1 and 2 rows).
            crops = features(samples[:11, :4, :4])
            for out in outs:
                np.testing.assert_allclose(out['uneven_mu'], crops.mean(0), rtol=1e-5)
                np.testing.assert_allclose(
                    out['uneven_sigma'], np.cov(crops, rowvar=False), rtol=1e-4, atol=1e-6
                )
            # Reference statistics of the whole reference split, read by both hosts, written once.
            config = tiny_config()
            real = features(input_pipeline.load_images(config.data, config.eval.reference_split))
            with np.load(stats_path) as f:
                self.assertEqual(int(f['count']), len(real))
                np.testing.assert_allclose(f['mu'], real.mean(0), rtol=1e-6)
                np.testing.assert_allclose(
                    f['sigma'], np.cov(real, rowvar=False), rtol=1e-5, atol=1e-6
                )
            np.testing.assert_allclose(outs[0]['ref_mu'], real.mean(0), rtol=1e-6)
            names = ['out_0.npz', 'out_1.npz', 'ref.npz', 's.npz']
            self.assertEqual(sorted(os.listdir(tmp)), names)

    def test_sigterm_to_one_host_saves_both_at_the_same_step_and_exits_0(self):
        with tempfile.TemporaryDirectory() as tmp:
            workdir, port = os.path.join(tmp, 'w'), _free_port()
            procs, logs = [], []
            for pid in range(2):
                logs.append(pathlib.Path(tmp, f'log_{pid}.txt'))
                with open(logs[-1], 'w') as log:
                    procs.append(
                        subprocess.Popen(
                            [
                                sys.executable,
                                '-m',
                                'diffusion_jax.main',
                                '--config=configs/digits.py',
                                f'--workdir={workdir}',
                                '--config.model.ch=16',
                                '--config.model.num_groups=8',
                                '--config.training.batch_size=8',
                                '--config.training.num_train_steps=100000',
                                '--config.training.sample_every_steps=0',
                                '--config.training.log_every_steps=1',
                                f'--coordinator_address=localhost:{port}',
                                '--num_processes=2',
                                f'--process_id={pid}',
                            ],
                            cwd=REPO,
                            env=_env(2),
                            stdout=log,
                            stderr=subprocess.STDOUT,
                        )
                    )
            try:
                deadline = time.time() + TIMEOUT
                while not all('step 5/' in log.read_text() for log in logs):
                    for proc, log in zip(procs, logs, strict=True):
                        self.assertIsNone(proc.poll(), log.read_text()[-3000:])
                    self.assertLess(time.time(), deadline, logs[0].read_text()[-3000:])
                    time.sleep(0.2)
                procs[1].send_signal(signal.SIGTERM)  # the preemption notice reaches one host
                codes = [proc.wait(timeout=TIMEOUT) for proc in procs]
            finally:
                for proc in procs:
                    if proc.poll() is None:
                        proc.kill()
            texts = [log.read_text() for log in logs]
            self.assertEqual(codes, [0, 0], texts[1][-3000:])
            saved = [re.findall(r'preemption requested: saving step (\d+)', t) for t in texts]
            self.assertLen(saved[0], 1, texts[0][-3000:])
            self.assertEqual(saved[0], saved[1])  # the step both hosts agreed on
            step = saved[0][0]
            self.assertGreaterEqual(int(step), 5)
            self.assertIn(step, os.listdir(os.path.join(workdir, 'checkpoints')))
            self.assertTrue(
                os.path.isfile(os.path.join(workdir, 'checkpoints', step, '_CHECKPOINT_METADATA'))
            )


if __name__ == '__main__':
    absltest.main()
