"""Checkpointing: exact round trips, retention, incomplete and corrupt steps, preemption.

Each restore happens in a NEW Checkpointer (a new orbax manager reading the directory), as after
a restart, and is compared bit for bit with the state that was saved.
"""

import os
import pathlib
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized
from flax.training import train_state

from diffusion_jax import checkpointing, preemption

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


class _TrainState(train_state.TrainState):
    ema_params: Any
    rng: jax.Array


def _create_state(seed: int, num_updates: int = 2) -> _TrainState:
    """A tiny train state after `num_updates` jitted Adam steps (non-zero moments, step array)."""
    rng = jax.random.key(seed)
    k1, k2, k3 = jax.random.split(rng, 3)
    params = {
        'dense': {'kernel': jax.random.normal(k1, (3, 4)), 'bias': jnp.zeros((4,))},
        'scale': jax.random.normal(k2, (2,), dtype=jnp.bfloat16),
    }
    state = _TrainState.create(
        apply_fn=None,
        params=params,
        tx=optax.adam(1e-2),
        ema_params=params,
        rng=jax.random.key_data(k3),  # uint32[2]
    )

    @jax.jit
    def update(state):
        grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, state.params)
        state = state.apply_gradients(grads=grads)
        ema = optax.incremental_update(state.params, state.ema_params, 0.1)
        return state.replace(ema_params=ema)

    for _ in range(num_updates):
        state = update(state)
    return state


def _assert_trees_identical(test, actual, expected):
    test.assertEqual(jax.tree.structure(actual), jax.tree.structure(expected))
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        test.assertEqual(np.asarray(a).dtype, np.asarray(e).dtype)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def _state_dict(value: float) -> dict[str, Any]:
    return {'w': jnp.full((2, 3), value, jnp.float32), 'n': np.arange(3, dtype=np.int32)}


def _tempdir(test: absltest.TestCase) -> str:
    # tempfile, not create_tempdir: absl's test flags are unparsed under pytest.
    return test.enter_context(tempfile.TemporaryDirectory())


class CheckpointerTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.directory = _tempdir(self)

    def _checkpointer(self, keep=3, save_every_steps=1):
        ckpt = checkpointing.Checkpointer(
            self.directory, keep=keep, save_every_steps=save_every_steps
        )
        self.addCleanup(ckpt.close)
        return ckpt

    def _save_steps(self, steps, keep=5):
        with self._checkpointer(keep=keep) as ckpt:
            for step in steps:
                self.assertTrue(ckpt.save(step, _state_dict(step), meta={'step': step}))

    def test_round_trip_in_a_new_checkpointer_is_bit_identical(self):
        saved = _create_state(seed=0)
        meta = {'step': 2, 'config': {'model': {'ch': 8, 'ch_mult': [1, 2]}, 'lr': 2e-4}}
        with self._checkpointer() as ckpt:
            self.assertTrue(ckpt.save(2, saved, meta=meta))

        target = _create_state(seed=1, num_updates=0)
        restored, restored_meta = self._checkpointer().restore(target)

        self.assertIsInstance(restored, _TrainState)
        _assert_trees_identical(self, restored.params, saved.params)
        _assert_trees_identical(self, restored.ema_params, saved.ema_params)
        _assert_trees_identical(self, restored.opt_state, saved.opt_state)
        _assert_trees_identical(self, restored.rng, saved.rng)
        self.assertEqual(int(restored.step), 2)
        self.assertEqual(restored_meta, meta)
        # The restored optimizer state keeps training: one more step matches an uninterrupted run.
        grads = jax.tree.map(jnp.ones_like, saved.params)
        _assert_trees_identical(
            self,
            restored.apply_gradients(grads=grads).params,
            saved.apply_gradients(grads=grads).params,
        )

    def test_save_returns_once_arrays_are_off_the_device_so_they_may_be_donated(self):
        state = {'w': jnp.arange(100_000, dtype=jnp.float32)}
        expected = np.asarray(state['w']).copy()
        with self._checkpointer() as ckpt:
            ckpt.save(1, state, meta={})
            state['w'].delete()  # What donate_argnums=0 does to the buffer in the next step.
        restored, _ = self._checkpointer().restore({'w': jnp.zeros(100_000)})
        np.testing.assert_array_equal(restored['w'], expected)

    def test_restore_keeps_numpy_leaves_numpy_and_jax_leaves_jax(self):
        with self._checkpointer() as ckpt:
            ckpt.save(1, _state_dict(1.0), meta={'step': 1})
        restored, _ = self._checkpointer().restore(_state_dict(0.0))
        self.assertIsInstance(restored['w'], jax.Array)
        self.assertIsInstance(restored['n'], np.ndarray)
        _assert_trees_identical(self, restored, _state_dict(1.0))

    def test_keep_2_retains_the_two_newest_steps(self):
        with self._checkpointer(keep=2) as ckpt:
            for step in range(1, 6):
                self.assertTrue(ckpt.save(step, _state_dict(step), meta={'step': step}))
        self.assertCountEqual(os.listdir(self.directory), ['4', '5'])
        self.assertEqual(self._checkpointer(keep=2).latest_valid_step(), 5)

    def test_save_every_2_skips_odd_steps_unless_forced(self):
        ckpt = self._checkpointer(keep=10, save_every_steps=2)
        saved = {step: ckpt.save(step, _state_dict(step), meta={}) for step in range(1, 6)}
        # Step 1 is saved too: orbax always saves into a directory without checkpoints.
        self.assertEqual(saved, {1: True, 2: True, 3: False, 4: True, 5: False})
        self.assertTrue(ckpt.save(5, _state_dict(5), meta={}, force=True))
        ckpt.close()
        self.assertCountEqual(os.listdir(self.directory), ['1', '2', '4', '5'])

    def test_forced_save_of_an_already_saved_step_is_a_no_op(self):
        with self._checkpointer() as ckpt:
            self.assertTrue(ckpt.save(3, _state_dict(3), meta={'step': 3}))
            # The preemption path: scheduled save of step 3, then a forced one of the same step.
            self.assertFalse(ckpt.save(3, _state_dict(99), meta={'step': 99}, force=True))
        state, meta = self._checkpointer().restore(_state_dict(0))
        self.assertEqual(meta, {'step': 3})
        _assert_trees_identical(self, state, _state_dict(3))

    def test_meta_that_is_not_json_raises_value_error(self):
        with self.assertRaisesRegex(ValueError, 'JSON'):
            self._checkpointer().save(1, _state_dict(1), meta={'x': object()})

    def test_incomplete_step_dirs_are_skipped_with_a_warning_and_kept(self):
        self._save_steps([1, 2, 3])
        bare = os.path.join(self.directory, '9')
        os.mkdir(bare)
        copy = os.path.join(self.directory, '7')
        shutil.copytree(os.path.join(self.directory, '3'), copy)
        os.remove(os.path.join(copy, '_CHECKPOINT_METADATA'))

        ckpt = self._checkpointer()
        with self.assertLogs(level='WARNING') as logs:
            self.assertEqual(ckpt.latest_valid_step(), 3)
        warnings = '\n'.join(logs.output)
        self.assertIn(f'Skipping incomplete checkpoint directory {bare} ', warnings)
        self.assertIn(f'Skipping incomplete checkpoint directory {copy} ', warnings)
        with self.assertLogs(level='WARNING'):
            state, meta = ckpt.restore(_state_dict(0))
        self.assertEqual(meta, {'step': 3})
        _assert_trees_identical(self, state, _state_dict(3))
        self.assertTrue(os.path.isdir(bare))
        self.assertTrue(os.path.isdir(copy))
        with self.assertRaisesRegex(checkpointing.CheckpointError, 'step 9 is not a complete'):
            ckpt.restore(_state_dict(0), step=9)

    def test_leftover_tmp_dir_is_skipped_with_a_warning(self):
        ckpt = self._checkpointer()
        ckpt.save(1, _state_dict(1), meta={'step': 1})
        ckpt.wait()
        # Created after the first save, which waits for orbax's start-up tmp-dir cleanup.
        tmp = os.path.join(self.directory, '2.orbax-checkpoint-tmp-1234')
        os.makedirs(os.path.join(tmp, 'state'))
        with self.assertLogs(level='WARNING') as logs:
            self.assertEqual(ckpt.latest_valid_step(), 1)
        self.assertIn(f'Skipping incomplete checkpoint directory {tmp} ', '\n'.join(logs.output))

    def test_a_tmp_dir_of_an_interrupted_save_is_reported_before_orbax_removes_it(self):
        self._save_steps([1])
        tmp = os.path.join(self.directory, '2.orbax-checkpoint-tmp-1234')
        os.makedirs(os.path.join(tmp, 'state'))
        with self.assertLogs(level='WARNING') as logs:
            ckpt = self._checkpointer()
        self.assertIn(f'Removing {tmp}: an interrupted save', '\n'.join(logs.output))
        self.assertEqual(ckpt.latest_valid_step(), 1)
        self.assertTrue(ckpt.save(2, _state_dict(2), meta={'step': 2}))
        ckpt.wait()
        self.assertCountEqual(os.listdir(self.directory), ['1', '2'])

    def test_incomplete_dirs_do_not_block_saves_or_take_retention_slots(self):
        self._save_steps([1, 2])
        os.mkdir(os.path.join(self.directory, '9'))
        with self._checkpointer(keep=2) as ckpt:
            # A step listed at 9 would make orbax refuse every ordinary save up to step 9.
            for step in (3, 4):
                self.assertTrue(ckpt.save(step, _state_dict(step), meta={'step': step}))
            # Its own path stays untouched: no save there.
            self.assertFalse(ckpt.save(9, _state_dict(9), meta={'step': 9}, force=True))
        self.assertCountEqual(os.listdir(self.directory), ['3', '4', '9'])
        self.assertEqual(os.listdir(os.path.join(self.directory, '9')), [])

    def _corrupt_array_files(self, step):
        """Truncates every array data file (tensorstore `d/` chunks) of the step's state item."""
        state_dir = pathlib.Path(self.directory, str(step), 'state')
        data_files = [p for p in state_dir.rglob('*') if p.is_file() and p.parent.name == 'd']
        self.assertNotEmpty(data_files)
        for path in data_files:
            path.write_bytes(b'')

    def test_corrupt_newest_step_falls_back_to_the_previous_one(self):
        self._save_steps([1, 2])
        self._corrupt_array_files(2)
        with self.assertLogs(level='WARNING') as logs:
            state, meta = self._checkpointer().restore(_state_dict(0))
        self.assertEqual(meta, {'step': 1})
        _assert_trees_identical(self, state, _state_dict(1))
        self.assertTrue(
            any(f'Checkpoint step 2 in {self.directory} failed' in x for x in logs.output),
            logs.output,
        )

    def test_set_aside_moves_the_failed_step_so_it_can_be_saved_again(self):
        self._save_steps([1, 2])
        self._corrupt_array_files(2)
        step_dir = pathlib.Path(self.directory, '2')
        corrupt_bytes = {
            p.relative_to(step_dir): p.read_bytes() for p in step_dir.rglob('*') if p.is_file()
        }
        ckpt = self._checkpointer()
        with self.assertLogs(level='WARNING') as logs:
            _, meta = ckpt.restore(_state_dict(0), set_aside_failed=True)
        self.assertEqual(meta, {'step': 1})
        aside = pathlib.Path(self.directory, '2.corrupt')
        self.assertTrue(any(f'moved it to {aside}' in x for x in logs.output), logs.output)
        kept = {p.relative_to(aside): p.read_bytes() for p in aside.rglob('*') if p.is_file()}
        self.assertEqual(kept, corrupt_bytes)  # moved whole, not deleted or rewritten
        self.assertEqual(ckpt.latest_valid_step(), 1)
        self.assertTrue(ckpt.save(2, _state_dict(2), meta={'step': 2}, force=True))
        ckpt.wait()
        state, meta = ckpt.restore(_state_dict(0))
        self.assertEqual(meta, {'step': 2})
        _assert_trees_identical(self, state, _state_dict(2))
        ckpt.close()

    def test_all_steps_corrupt_raises_checkpoint_error_listing_them(self):
        self._save_steps([1, 2])
        self._corrupt_array_files(1)
        self._corrupt_array_files(2)
        ckpt = self._checkpointer()
        with self.assertRaisesRegex(
            checkpointing.CheckpointError, r'could be restored; tried step 2: .*; step 1: '
        ):
            ckpt.restore(_state_dict(0))

    def test_restore_of_an_empty_directory_raises_checkpoint_error(self):
        ckpt = self._checkpointer()
        self.assertIsNone(ckpt.latest_valid_step())
        with self.assertRaisesRegex(checkpointing.CheckpointError, 'no complete checkpoint'):
            ckpt.restore(_state_dict(0))

    def test_restore_of_a_given_step(self):
        self._save_steps([1, 2, 3])
        state, meta = self._checkpointer().restore(_state_dict(0), step=2)
        self.assertEqual(meta, {'step': 2})
        _assert_trees_identical(self, state, _state_dict(2))


class PreemptionGuardTest(parameterized.TestCase):
    @parameterized.named_parameters(('sigterm', signal.SIGTERM), ('sigint', signal.SIGINT))
    def test_signal_inside_the_guard_sets_requested_and_handlers_are_restored(self, signum):
        previous = signal.getsignal(signum)
        with preemption.PreemptionGuard() as guard:
            self.assertFalse(guard.requested)
            self.assertFalse(guard.should_stop(1))
            os.kill(os.getpid(), signum)
            deadline = time.monotonic() + 5
            while not guard.requested and time.monotonic() < deadline:
                time.sleep(0.01)
            self.assertTrue(guard.requested)
            self.assertTrue(guard.should_stop(2))
        self.assertIs(signal.getsignal(signum), previous)

    def test_sigterm_in_a_training_loop_saves_the_current_step_and_exits_0(self):
        directory = os.path.join(_tempdir(self), 'checkpoints')
        script = os.path.join(_tempdir(self), 'train_loop.py')
        pathlib.Path(script).write_text(
            textwrap.dedent(f"""
                import time
                import numpy as np
                from diffusion_jax import checkpointing, preemption

                with checkpointing.Checkpointer({directory!r}, keep=2,
                                                save_every_steps=1000) as ckpt:
                    with preemption.PreemptionGuard() as guard:
                        state = {{'w': np.zeros(3, np.float32)}}
                        for step in range(100_000):
                            state = {{'w': state['w'] + 1}}
                            meta = {{'step': step + 1}}
                            ckpt.save(step + 1, state, meta=meta)
                            if step + 1 == 3:
                                print('READY', flush=True)
                            if guard.should_stop(step + 1):
                                assert ckpt.save(step + 1, state, meta=meta, force=True)
                                print('SAVED', step + 1, flush=True)
                                break
                            time.sleep(0.02)
            """)
        )
        env = dict(os.environ, PYTHONPATH=str(_REPO_ROOT), JAX_PLATFORMS='cpu')
        proc = subprocess.Popen(
            [sys.executable, script],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=str(_REPO_ROOT),
        )
        try:
            # Wait for READY without blocking forever on a child that hangs before printing it.
            ready, _, _ = select.select([proc.stdout], [], [], 120)
            self.assertTrue(ready, 'the training script printed nothing within 120 s')
            self.assertEqual(proc.stdout.readline().strip(), 'READY')
            proc.send_signal(signal.SIGTERM)
            stdout, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.assertEqual(proc.returncode, 0)
        saved_step = int(stdout.split()[-1])
        self.assertGreaterEqual(saved_step, 3)

        with checkpointing.Checkpointer(directory, keep=2, save_every_steps=1000) as ckpt:
            self.assertEqual(ckpt.latest_valid_step(), saved_step)
            state, meta = ckpt.restore({'w': np.zeros(3, np.float32)})
        self.assertEqual(meta, {'step': saved_step})
        np.testing.assert_array_equal(state['w'], np.full(3, saved_step, np.float32))


if __name__ == '__main__':
    absltest.main()
