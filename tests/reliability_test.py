"""Reliability, round 2: settings checked against the checkpoint before any work, nothing
overwritten silently, read-only sampling, one training per workdir, environment failures, and
checkpoint directories whose name disagrees with their step.

Every case runs `python -m diffusion_jax.main` in this process (`cli.run_main`) on a copy of one
tiny trained workdir (T=20, checkpoints 2 and 4, `samples/samples_4.npz` of 4 images drawn) and
checks the exit status, the one `error:` line and, for each refusal, that every file in the
workdir is byte for byte as before, with nothing added.
"""

import errno
import hashlib
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
from unittest import mock

import jax
import numpy as np
import pytest
from absl.testing import absltest, parameterized
from cli import run_main

from diffusion_jax import config_lib, generate, image_io, train, workdir_lock
from diffusion_jax.configs import digits

TINY = (
    '--config=configs/digits.py',
    '--config.model.ch=16',
    '--config.model.num_groups=8',
    '--config.diffusion.num_timesteps=20',
    '--config.training.batch_size=8',
    '--config.training.num_train_steps=4',
    '--config.training.checkpoint_every_steps=2',
    '--config.training.sample_every_steps=0',
    '--config.sampling.num_samples=4',
    '--config.sampling.batch_size=4',
)


def _snapshot(root: str) -> dict[str, str]:
    """relative path -> SHA-256 of every file under `root`."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(pathlib.Path(root).rglob('*'))
        if path.is_file()
    }


@pytest.mark.slow  # trains and samples through main
class ReliabilityTest(parameterized.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls._tmp = tempfile.TemporaryDirectory()
        cls.trained = os.path.join(cls._tmp.name, 'trained')
        for mode in ('train', 'sample'):
            result = run_main(*TINY, f'--workdir={cls.trained}', f'--mode={mode}')
            assert result.returncode == 0, result.stderr[-3000:]

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()
        super().tearDownClass()

    def setUp(self):
        super().setUp()
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.workdir = os.path.join(tmp.name, 'w')
        shutil.copytree(self.trained, self.workdir)

    def _main(self, *args: str, workdir: str | None = None):
        return run_main(*TINY, f'--workdir={workdir or self.workdir}', *args)

    def assert_refused(self, result, *fragments: str, workdir: str | None = None):
        """Exit status 2, the last stderr line `error: ...` holding `fragments`, no traceback."""
        self.assertEqual(result.returncode, 2, result.stderr[-3000:])
        self.assertNotIn('Traceback', result.stderr)
        last = result.stderr.strip().splitlines()[-1]
        self.assertTrue(last.startswith('error: '), result.stderr[-3000:])
        for fragment in fragments:
            self.assertIn(fragment, result.stderr)

    def assert_refused_and_kept(self, args, *fragments: str):
        before = _snapshot(self.workdir)
        self.assert_refused(self._main(*args), *fragments)
        self.assertEqual(_snapshot(self.workdir), before)

    # 1. The effective settings (the checkpoint's T with the command line's sampling) are
    # checked before any work.
    @parameterized.named_parameters(
        ('num_steps', ['--config.sampling.num_steps=50'], 'exceeds diffusion.num_timesteps 20'),
        (
            'interpolate_t',
            ['--config.sampling.interpolate=0,1', '--config.sampling.interpolate_t=30'],
            'not below diffusion.num_timesteps 20',
        ),
        ('interpolate_index', ['--config.sampling.interpolate=0,100000'], 'has only'),
        ('one_eval_sample', ['--mode=eval', '--config.eval.num_samples=1'], 'eval.num_samples'),
    )
    def test_settings_that_do_not_fit_the_checkpoint_are_refused_before_sampling(
        self, args, fragment
    ):
        mode = [] if '--mode=eval' in args else ['--mode=sample', '--config.sampling.seed=7']
        # The command line's T is the digits default, 250, as when a user leaves it out.
        self.assert_refused_and_kept(
            [*mode, '--config.diffusion.num_timesteps=250', *args], fragment
        )

    def test_the_command_lines_own_t_does_not_refuse_what_fits_the_checkpoint(self):
        # T=10 on the command line, T=20 in the checkpoint: 15 steps fit the checkpoint.
        os.remove(os.path.join(self.workdir, 'samples', 'samples_4.npz'))
        result = self._main(
            '--mode=sample',
            '--config.diffusion.num_timesteps=10',
            '--config.sampling.num_steps=15',
            '--config.sampling.num_samples=2',
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn("config.diffusion.num_timesteps: using the checkpoint's 20", result.stderr)
        with np.load(os.path.join(self.workdir, 'samples', 'samples_4.npz')) as f:
            self.assertEqual(f['images'].shape, (2, 8, 8, 1))

    # 2. A finished samples file is never replaced by other settings; the same ones reuse it.
    @parameterized.named_parameters(
        ('fewer_images', ['--config.sampling.num_samples=3'], 'num_samples 4 there, 3 now'),
        ('another_seed', ['--config.sampling.seed=5'], 'seed 0 there, 5 now'),
        ('no_clipping', ['--config.sampling.clip_denoised=False'], 'clip_denoised True there'),
    )
    def test_a_finished_samples_file_of_other_settings_is_refused(self, args, fragment):
        self.assert_refused_and_kept(['--mode=sample', *args], 'already holds samples', fragment)

    def test_the_same_settings_reuse_the_finished_file_as_it_is(self):
        before = _snapshot(self.workdir)
        result = self._main('--mode=sample')
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertEqual(_snapshot(self.workdir), before)

    # 3. Everything that changes an image is in the resume spec, for sample and eval alike.
    @parameterized.named_parameters(
        ('sampler', 'sampler', 'ddim'),
        ('num_steps', 'num_steps', 5),
        ('eta', 'eta', 0.5),
        ('clip_denoised', 'clip_denoised', False),
    )
    def test_every_setting_that_changes_an_image_is_in_the_spec(self, key, value):
        config = digits.get_config()
        before = generate.sample_spec(config, 4)
        config.sampling[key] = value
        self.assertNotEqual(generate.sample_spec(config, 4), before)
        self.assertNotEqual(generate.sample_spec(digits.get_config(), 2), before)

    def test_eval_samples_of_other_settings_are_refused_not_mixed(self):
        eval_args = ['--mode=eval', '--config.eval.num_samples=8', '--config.eval.bpd=False']
        result = self._main(*eval_args)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assert_refused_and_kept(
            [*eval_args, '--config.sampling.clip_denoised=False'], 'clip_denoised True there'
        )

    # 4. Read-only modes leave a save in flight alone and read only the EMA parameters.
    def test_sampling_leaves_a_save_in_flight_and_ignores_the_optimizer_settings(self):
        in_flight = pathlib.Path(self.workdir, 'checkpoints', '6.orbax-checkpoint-tmp-1234')
        in_flight.mkdir()
        (in_flight / 'part').write_bytes(b'being written')
        os.remove(os.path.join(self.workdir, 'samples', 'samples_4.npz'))
        # Without clipping the optimizer state has another tree than the checkpoint's.
        result = self._main('--mode=sample', '--config.optim.grad_clip=0.0')
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertEqual((in_flight / 'part').read_bytes(), b'being written')
        self.assertTrue(os.path.exists(os.path.join(self.workdir, 'samples', 'samples_4.npz')))

    # 5. One training per workdir.
    def test_a_second_training_on_a_held_workdir_refuses_in_one_line(self):
        path = workdir_lock.acquire(self.workdir)  # this (live) process trains there
        self.addCleanup(workdir_lock.release, path)
        self.assert_refused_and_kept(
            ['--config.training.num_train_steps=6'],
            'in use by another training',
            f'process {os.getpid()} on {socket.gethostname()}',
        )

    def test_the_lock_of_a_dead_training_is_reported_and_taken_over(self):
        dead = subprocess.Popen([sys.executable, '-c', 'pass'])
        dead.wait()
        lock = os.path.join(self.workdir, workdir_lock.LOCK_NAME)
        pathlib.Path(lock).write_text(f'{socket.gethostname()} {dead.pid}\n')
        result = self._main('--config.training.num_train_steps=6')
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn(f'taking over {lock}', result.stderr)
        self.assertFalse(os.path.exists(lock))  # released at the end
        self.assertIn('6', os.listdir(os.path.join(self.workdir, 'checkpoints')))

    # 6. The environment: one line, exit 2, files kept, resumable.
    def test_a_workdir_that_is_a_file_is_refused(self):
        path = os.path.join(self.workdir, 'config.json')
        before = _snapshot(self.workdir)
        self.assert_refused(self._main(workdir=path), 'is a file, not a folder')
        self.assertEqual(_snapshot(self.workdir), before)

    def test_a_full_disk_while_writing_a_shard_fails_in_one_line_and_resumes(self):
        os.remove(os.path.join(self.workdir, 'samples', 'samples_4.npz'))
        before = _snapshot(self.workdir)
        real = image_io.atomic_open
        calls = []

        def disk_full_at_the_second_shard(path):  # spec.json, shard 0-2, then no space
            calls.append(path)
            if len(calls) == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            return real(path)

        args = ['--mode=sample', '--config.sampling.batch_size=2']
        with mock.patch.object(image_io, 'atomic_open', disk_full_at_the_second_shard):
            result = self._main(*args)
        self.assert_refused(result, 'No space left on device', 'images_00000002_00000004.npz')
        kept = _snapshot(self.workdir)
        self.assertEqual({k: v for k, v in kept.items() if k in before}, before)
        self.assertIn('samples/samples_4.npz.partial/images_00000000_00000002.npz', kept)
        result = self._main(*args)  # space again: the run resumes and finishes
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        with (
            np.load(os.path.join(self.workdir, 'samples', 'samples_4.npz')) as got,
            np.load(os.path.join(self.trained, 'samples', 'samples_4.npz')) as whole,
        ):  # the same images as the uninterrupted run drew in one batch of 4
            np.testing.assert_array_equal(got['images'], whole['images'])

    def test_a_training_step_out_of_memory_leaves_config_json_as_it_was(self):
        # XLA's own error for a batch beyond device memory (on GPU and TPU; XLA:CPU aborts the
        # process on a 256 GiB buffer instead, so the error is raised by a stand-in step).
        before = _snapshot(self.workdir)

        def out_of_memory(*args, **kwargs):
            def step(*args):
                raise jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating')

            return step

        with mock.patch.object(train, 'make_jit_train_step', out_of_memory):
            result = self._main('--config.training.num_train_steps=6', '--config.optim.eps=1e-7')
        self.assert_refused(result, 'out of memory', 'training.batch_size')
        after = _snapshot(self.workdir)  # every file as it was; at most a new events file
        self.assertEqual({k: v for k, v in after.items() if k in before}, before)
        self.assertTrue(all(k.startswith('events.') for k in set(after) - set(before)))

    def _on_small_disk(self, size_kb: int) -> str:
        """A copy of the workdir on a tmpfs of `size_kb` KiB (skips where tmpfs cannot mount)."""
        folder = tempfile.mkdtemp()
        mount = ['mount', '-t', 'tmpfs', '-o', f'size={size_kb}k', 'tmpfs', folder]
        if subprocess.run(mount, capture_output=True).returncode:
            os.rmdir(folder)
            self.skipTest('needs to mount a tmpfs (root in a machine that allows it)')
        self.addCleanup(os.rmdir, folder)
        self.addCleanup(subprocess.run, ['umount', folder], check=True)
        workdir = os.path.join(folder, 'w')
        shutil.copytree(self.workdir, workdir)
        return workdir

    def test_a_full_disk_during_a_checkpoint_save_fails_in_one_line_and_resumes(self):
        used_kb = sum(os.path.getsize(p) for p in pathlib.Path(self.workdir).rglob('*')) // 1024
        workdir = self._on_small_disk(used_kb + 1200)  # a checkpoint takes about 2.9 MB
        before = _snapshot(workdir)
        result = self._main('--config.training.num_train_steps=6', workdir=workdir)
        self.assert_refused(result, 'the disk is full', 'No space left on device')
        after = _snapshot(workdir)
        del before['config.json'], after['config.json']  # rewritten: steps 5 and 6 had run
        self.assertEqual({k: v for k, v in after.items() if k in before}, before)
        mountpoint = os.path.dirname(workdir)
        subprocess.run(['mount', '-o', 'remount,size=65536k', mountpoint], check=True)
        result = self._main('--config.training.num_train_steps=6', workdir=workdir)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn('an interrupted save left it incomplete', result.stderr)
        self.assertEqual(sorted(os.listdir(os.path.join(workdir, 'checkpoints'))), ['2', '4', '6'])

    def test_a_read_only_workdir_fails_in_one_line(self):
        os.remove(os.path.join(self.workdir, 'samples', 'samples_4.npz'))
        workdir = self._on_small_disk(65536)
        subprocess.run(['mount', '-o', 'remount,ro', os.path.dirname(workdir)], check=True)
        before = _snapshot(workdir)
        for args in (['--mode=sample'], ['--config.training.num_train_steps=6']):
            result = self._main(*args, workdir=workdir)
            self.assert_refused(result, 'Read-only file system')
        new = os.path.join(os.path.dirname(workdir), 'new')
        self.assert_refused(self._main(workdir=new), 'Read-only file system', new)
        self.assertEqual(_snapshot(workdir), before)

    # 10. The step stored in a checkpoint wins over its directory's name.
    def test_a_renamed_step_directory_is_reported_and_skipped(self):
        checkpoints = os.path.join(self.workdir, 'checkpoints')
        os.rename(os.path.join(checkpoints, '2'), os.path.join(checkpoints, '100'))
        os.remove(os.path.join(self.workdir, 'samples', 'samples_4.npz'))
        result = self._main('--mode=sample')
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn('holds step 2', result.stderr)
        self.assertTrue(os.path.exists(os.path.join(self.workdir, 'samples', 'samples_4.npz')))
        self.assertFalse(os.path.exists(os.path.join(self.workdir, 'samples', 'samples_100.npz')))
        result = self._main('--config.training.num_train_steps=6')  # resumes from the real 4
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn('6', os.listdir(checkpoints))  # it trained steps 5 and 6
        self.assertTrue(os.path.isdir(os.path.join(checkpoints, '100')))  # left on disk


class ValidateAgainstWeightsTest(absltest.TestCase):
    def test_checks_against_the_diffusion_wait_for_the_checkpoint_in_sample_and_eval(self):
        config = digits.get_config()
        config.sampling.num_steps = config.diffusion.num_timesteps + 5
        with self.assertRaisesRegex(config_lib.ConfigError, 'sampling.num_steps'):
            config_lib.validate(config)
        config_lib.validate(config, weights_from_checkpoint=True)  # checked once merged


if __name__ == '__main__':
    absltest.main()
