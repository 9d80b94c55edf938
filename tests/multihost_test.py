"""Two real processes joined by `jax.distributed` on this machine (CPU devices, gloo collectives).

Each process has 2 CPU devices, so the job sees one 4-device mesh over 2 hosts: the multi-host
paths (per-host data, global batches, collective checkpoints, lead-process outputs) run for real.
"""

import glob
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def _env(devices_per_process: int) -> dict[str, str]:
    env = dict(os.environ)
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices_per_process}'
    env['PYTHONPATH'] = os.pathsep.join([str(REPO / 'tests'), str(REPO)])
    return env


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


if __name__ == '__main__':
    absltest.main()
