"""SIGKILL at random moments, some in the middle of a checkpoint save: no work beyond the last
complete checkpoint is lost, and the resumed runs end exactly where an uninterrupted run ends.

Each round starts `python -m diffusion_jax.main` on a tiny digits model that checkpoints every
3 steps, waits for a kill moment and SIGKILLs it. Kill moments alternate between "as soon as an
orbax tmp directory (a save in progress) appears" and "a random delay after training started".
The last round runs to the end. The final parameters, EMA and optimizer state must equal those
of one uninterrupted run bit for bit.
"""

import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import time

import fast_compile
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl.testing import absltest

from diffusion_jax import checkpointing

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 60
CHECKPOINT_EVERY = 3
TMP_MARK = '.orbax-checkpoint-tmp'  # orbax's TMP_DIR_SUFFIX
ENV = fast_compile.env()


def _command(workdir: str) -> list[str]:
    return [
        sys.executable,
        '-m',
        'diffusion_jax.main',
        '--config=configs/digits.py',
        f'--workdir={workdir}',
        '--config.model.ch=16',
        '--config.model.num_groups=8',
        '--config.training.batch_size=16',
        f'--config.training.num_train_steps={NUM_STEPS}',
        f'--config.training.checkpoint_every_steps={CHECKPOINT_EVERY}',
        '--config.training.keep_checkpoints=2',
        '--config.training.sample_every_steps=0',
        '--config.training.log_every_steps=1',
    ]


def _final_state(workdir: str):
    """The newest checkpoint's state as a nested dict of numpy arrays (no target needed)."""
    ckpt = checkpointing.Checkpointer(
        os.path.join(workdir, 'checkpoints'), keep=2, save_every_steps=CHECKPOINT_EVERY
    )
    try:
        step = ckpt.latest_valid_step()
        args = ocp.args.Composite(state=ocp.args.StandardRestore())  # no target: numpy leaves
        state = ckpt._manager.restore(step, args=args)['state']
    finally:
        ckpt.close()
    return step, state


def _tmp_dirs(checkpoints: pathlib.Path) -> list[str]:
    if not checkpoints.is_dir():
        return []
    return [p.name for p in checkpoints.iterdir() if TMP_MARK in p.name]


@pytest.mark.slow
class SigkillTest(absltest.TestCase):
    def test_random_sigkills_including_mid_save_end_bit_identical(self):
        rng = random.Random(1234)
        with tempfile.TemporaryDirectory() as reference, tempfile.TemporaryDirectory() as faulted:
            done = subprocess.run(
                _command(reference), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600
            )
            self.assertEqual(done.returncode, 0, done.stderr[-3000:])

            checkpoints = pathlib.Path(faulted, 'checkpoints')
            mid_save_kills, killed_steps, logs = 0, [], []
            for round_index in range(4):
                log_path = pathlib.Path(faulted, f'log_{round_index}.txt')
                with open(log_path, 'w') as log:
                    proc = subprocess.Popen(
                        _command(faulted), cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT
                    )
                    try:
                        tmp_seen = self._wait_and_kill(
                            proc, log_path, checkpoints, rng, mid_save=round_index % 2 == 0
                        )
                    finally:
                        if proc.poll() is None:
                            proc.kill()
                        proc.wait()
                text = log_path.read_text()
                logs.append(text)
                if proc.returncode == 0:
                    break  # the run finished before the kill moment came
                self.assertEqual(proc.returncode, -signal.SIGKILL, text[-2000:])
                left = _tmp_dirs(checkpoints)
                mid_save_kills += bool(tmp_seen and left)
                killed_steps.append(text.count('steps/s'))
            else:  # every round was killed: one more, uninterrupted
                finish = subprocess.run(
                    _command(faulted),
                    cwd=REPO,
                    env=ENV,
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                self.assertEqual(finish.returncode, 0, finish.stderr[-3000:])
                logs.append(finish.stderr)

            # At least one kill landed while a save was in progress, and the next start said so.
            self.assertGreaterEqual(mid_save_kills, 1, killed_steps)
            self.assertTrue(any('an interrupted save left it incomplete' in t for t in logs))
            self.assertEmpty(_tmp_dirs(checkpoints))

            ref_step, ref_state = _final_state(reference)
            got_step, got_state = _final_state(faulted)
            self.assertEqual(ref_step, NUM_STEPS)
            self.assertEqual(got_step, NUM_STEPS)
            ref_leaves = jax.tree_util.tree_leaves_with_path(ref_state)
            got_leaves = jax.tree_util.tree_leaves_with_path(got_state)
            self.assertEqual([p for p, _ in ref_leaves], [p for p, _ in got_leaves])
            for (path, expected), (_, actual) in zip(ref_leaves, got_leaves, strict=True):
                np.testing.assert_array_equal(
                    np.asarray(actual), np.asarray(expected), err_msg=jax.tree_util.keystr(path)
                )

    def _wait_and_kill(self, proc, log_path, checkpoints, rng, *, mid_save: bool) -> bool:
        """Waits for this round's kill moment and SIGKILLs; returns whether a save was running."""
        deadline = time.time() + 300
        # Wait for training to start (the first step line), so every kill costs some steps.
        while 'steps/s' not in log_path.read_text():
            if proc.poll() is not None:
                return False
            self.assertLess(time.time(), deadline, log_path.read_text()[-2000:])
            time.sleep(0.02)
        if mid_save:  # kill the moment a tmp directory (a save in progress) exists
            while proc.poll() is None and time.time() < deadline:
                if _tmp_dirs(checkpoints):
                    proc.send_signal(signal.SIGKILL)
                    return True
                time.sleep(0.001)
            return False
        time.sleep(rng.uniform(0.0, 1.5))  # a random moment
        if proc.poll() is None:
            tmp_seen = bool(_tmp_dirs(checkpoints))
            proc.send_signal(signal.SIGKILL)
            return tmp_seen
        return False


if __name__ == '__main__':
    absltest.main()
