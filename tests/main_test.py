"""The command line: bad input ends in one clear line on stderr and exit status 2.

main runs in-process (`cli.run_main`); `python -m diffusion_jax.main` itself is started where
only a fresh process shows the refusal (a device count forced through XLA_FLAGS, TensorFlow's
import), and once to check that the real entry point behaves as the in-process calls do.
"""

import errno
import os
import pathlib
import subprocess
import sys
import tempfile
import types
from unittest import mock

import cli
import pytest
from absl.testing import absltest, parameterized

from diffusion_jax import main

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_main_subprocess(*args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, '-m', 'diffusion_jax.main', *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, **(env or {})),
    )


class MainTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.workdir = tmp.name

    def assert_user_error(self, proc, *fragments):
        self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
        self.assertNotIn('Traceback', proc.stderr)
        # The message is the last thing printed (it may span a few lines).
        self.assertIn('error: ', proc.stderr)
        message = proc.stderr[proc.stderr.rindex('error: ') :]
        for fragment in fragments:
            self.assertIn(fragment, message)

    @parameterized.named_parameters(
        ('unknown_key', ['--config.training.batchsize=3'], ['unknown config key', 'batch_size']),
        ('wrong_type', ['--config.training.batch_size=abc'], ['batch_size', 'abc']),
        ('impossible_value', ['--config.data.image_size=30'], ['config.data.image_size']),
        ('bad_choice', ['--config.diffusion.loss_type=l1'], ['config.diffusion.loss_type', 'mse']),
        ('negative_samples', ['--config.sampling.num_samples=0'], ['config.sampling.num_samples']),
    )
    def test_bad_config_overrides_are_refused_in_one_line(self, overrides, fragments):
        proc = cli.run_main('--config=configs/cifar10.py', f'--workdir={self.workdir}', *overrides)
        self.assert_user_error(proc, *fragments)

    def test_a_missing_config_file_is_named(self):
        proc = cli.run_main('--config=configs/nope.py', f'--workdir={self.workdir}')
        self.assert_user_error(proc, 'could not load --config', 'configs/nope.py')

    def test_workdir_is_required(self):
        self.assert_user_error(cli.run_main('--config=configs/digits.py'), '--workdir is required')

    def test_the_entry_point_refuses_as_the_in_process_call_does(self):
        args = ('--config=configs/digits.py', '--config.training.batchsize=3', '--workdir=/x')
        proc = run_main_subprocess(*args)
        self.assert_user_error(proc, 'unknown config key', 'batch_size')
        in_process = cli.run_main(*args)
        self.assertEqual(in_process.returncode, proc.returncode)
        self.assertEqual(
            in_process.stderr.strip().splitlines()[-1], proc.stderr.strip().splitlines()[-1]
        )

    def test_eval_on_a_workdir_without_checkpoints_says_to_train_first(self):
        proc = cli.run_main(
            '--config=configs/digits.py', f'--workdir={self.workdir}', '--mode=eval'
        )
        self.assert_user_error(proc, 'no checkpoint in', 'train first')
        self.assertEqual(os.listdir(self.workdir), [])  # nothing created

    @parameterized.parameters(
        (['--coordinator_address=localhost:1234'], 'go together: give all three'),
        (
            ['--coordinator_address=localhost:1', '--num_processes=2', '--process_id=2'],
            'must be in [0, --num_processes=2)',
        ),
    )
    def test_incomplete_multihost_flags_are_refused(self, flags, message):
        proc = cli.run_main('--config=configs/digits.py', f'--workdir={self.workdir}', *flags)
        self.assert_user_error(proc, message)

    @pytest.mark.slow  # 8 CPU devices need a fresh process with XLA_FLAGS set
    def test_a_batch_that_does_not_divide_over_the_devices_names_sizes_that_work(self):
        proc = run_main_subprocess(
            '--config=configs/digits.py',
            f'--workdir={self.workdir}',
            '--config.training.batch_size=12',
            env={'XLA_FLAGS': '--xla_force_host_platform_device_count=8'},
        )
        self.assert_user_error(proc, 'does not divide over 8 devices', '8 or 16')

    @pytest.mark.slow  # imports TensorFlow: a fresh process keeps it out of the test worker
    def test_a_dataset_that_is_not_downloaded_names_the_fix(self):
        proc = run_main_subprocess(
            '--config=configs/digits.py',
            f'--workdir={self.workdir}',
            '--config.data.dataset=cifar10',
            f'--config.data.data_dir={self.workdir}/tfds',
            '--config.data.num_channels=3',
            '--config.data.image_size=32',
            '--config.model.attn_resolutions=(16,)',
            '--config.model.ch=32',
            '--config.model.num_res_blocks=1',
        )
        self.assert_user_error(proc, 'cifar10', 'download_and_prepare')


def _coroutine_defined_in(filename: str):
    """A coroutine object whose code claims to live in `filename` (never awaited)."""
    namespace = {}
    exec(compile('async def read():\n    pass\n', filename, 'exec'), namespace)
    return namespace['read']()


class ErrorMessageTest(absltest.TestCase):
    """The environment's errors as one line: a full disk reads the same whichever layer saw it."""

    def test_a_full_disk_or_quota_as_an_os_error_says_the_disk_is_full(self):
        for code in (errno.ENOSPC, errno.EDQUOT):
            error = OSError(code, os.strerror(code), '/w/checkpoints/6/_METADATA')
            message = main._os_error_message(error)
            self.assertTrue(message.startswith('the disk is full: '), message)
            self.assertIn('/w/checkpoints/6/_METADATA', message)
            self.assertIn('resumes from its newest complete checkpoint', message)

    def test_tensorstore_s_full_disk_reads_the_same(self):
        os_error = main._os_error_message(OSError(errno.ENOSPC, 'No space left on device', '/w/x'))
        value_error = main._resource_message(ValueError('No space left on device: /w/x'))
        self.assertEqual(os_error, value_error)

    def test_other_os_errors_name_what_to_check(self):
        error = OSError(errno.EACCES, 'Permission denied', '/w/train.lock')
        self.assertEqual(
            main._os_error_message(error),
            'Permission denied: /w/train.lock (check the path, its permissions and the free disk '
            'space)',
        )


class UnraisableHookTest(absltest.TestCase):
    """Leftover orbax reads after a failed restore stay quiet; every other report passes."""

    def report(self, exc_value, obj):
        unraisable = types.SimpleNamespace(
            exc_type=type(exc_value),
            exc_value=exc_value,
            exc_traceback=None,
            err_msg='Exception ignored in',
            object=obj,
        )
        with mock.patch.object(sys, '__unraisablehook__') as default_hook:
            main._drop_closed_loop_noise(unraisable)
        return default_hook.call_count

    def test_an_unfinished_orbax_read_and_a_closed_loop_are_dropped(self):
        orbax_read = _coroutine_defined_in(
            os.path.join(os.sep, 'site-packages', 'orbax', 'checkpoint', 'serialization.py')
        )
        self.addCleanup(orbax_read.close)
        self.assertEqual(self.report(Exception('Encountered error while reading'), orbax_read), 0)
        self.assertEqual(self.report(RuntimeError('Event loop is closed'), None), 0)

    def test_other_reports_reach_the_default_hook(self):
        elsewhere = _coroutine_defined_in(os.path.join(os.sep, 'site-packages', 'mylib', 'io.py'))
        self.addCleanup(elsewhere.close)
        self.assertEqual(self.report(Exception('Encountered error while reading'), elsewhere), 1)
        self.assertEqual(self.report(RuntimeError('Event loop is closed!'), None), 1)
        self.assertEqual(self.report(ValueError('x'), object()), 1)


if __name__ == '__main__':
    absltest.main()
