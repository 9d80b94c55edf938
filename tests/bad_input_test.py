"""Every bad input of the reliability issue against a workdir that already holds checkpoints and
outputs: one clear `error:` line, exit status 2, no traceback, and every file in the workdir
byte-for-byte as before (and no new files).

The workdir is conftest's `tiny_workdir` (a tiny digits model trained 4 steps, checkpoints 2 and
4, then `--mode=sample`: samples_4.npz and its grid), copied for each test. main runs in-process
(`cli.run_main`); the refusals that only a fresh process shows (a device count forced through
XLA_FLAGS, orbax's leftover reads at interpreter exit, TensorFlow's import) run it as
`python -m diffusion_jax.main` and are slow.
"""

import hashlib
import io
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile

import cli
import fast_compile
import numpy as np
import pytest
from absl.testing import absltest, parameterized

REPO = pathlib.Path(__file__).resolve().parents[1]


def _main(workdir: str, *args: str, config: str | None = None) -> cli.Result:
    """main on the tiny run's flags (with `--config=config` if given), in-process."""
    argv = cli.tiny_digits_args(workdir)
    if config is not None:
        argv = [f'--config={config}', *argv[1:]]
    return cli.run_main(*argv, *args)


def _main_subprocess(workdir: str, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, '-m', 'diffusion_jax.main', *cli.tiny_digits_args(workdir), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=fast_compile.env(**(env or {})),
    )


def _snapshot(root: str) -> dict[str, str]:
    """relative path -> SHA-256 of every file under `root` (directories implied)."""
    out = {}
    for path in sorted(pathlib.Path(root).rglob('*')):
        if path.is_file():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


class BadInputTest(parameterized.TestCase):
    @pytest.fixture(autouse=True)
    def _trained(self, tiny_workdir):
        self.trained = tiny_workdir

    def setUp(self):
        super().setUp()
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.tmp = tmp.name
        self.workdir = os.path.join(self.tmp, 'workdir')
        shutil.copytree(self.trained, self.workdir)
        self.assertIn('checkpoints/4/_CHECKPOINT_METADATA', _snapshot(self.workdir))

    def assert_refused(self, proc, *fragments, before=None):
        """One `error:` message last, exit 2, no traceback, the workdir exactly as `before`."""
        self.assertEqual(proc.returncode, 2, proc.stderr[-3000:])
        where = proc.stderr.find('Traceback')
        self.assertEqual(where, -1, proc.stderr[max(0, where - 300) : where + 3000])
        last = proc.stderr.strip().splitlines()[-1]
        message = proc.stderr[proc.stderr.rindex('error: ') :]
        self.assertTrue(message.strip().endswith(last), proc.stderr[-2000:])
        for fragment in fragments:
            self.assertIn(fragment, message)
        self.assertEqual(_snapshot(self.workdir), before)

    @parameterized.named_parameters(
        ('unknown_config_key', ['--config.training.bogus=1'],
         ['unknown config key: config.training.bogus']),
        ('unknown_config_section', ['--config.bogus.x=1'], ['unknown config key: config.bogus']),
        # The tiny run's flags set --config.training.batch_size too: the bad one is named.
        ('key_in_the_wrong_section', ['--config.model.batch_size=4'],
         ['unknown config key: config.model.batch_size']),
        ('misspelt_config_key', ['--config.training.batchsize=3'],
         ['config.training.batchsize', 'did you mean config.training.batch_size?']),
        ('wrong_type', ['--config.training.batch_size=abc'], ['batch_size', 'abc']),
        ('impossible_shapes', ['--config.data.image_size=7'], ['config.data.image_size', '7']),
        ('num_samples_zero', ['--mode=sample', '--config.sampling.num_samples=0'],
         ['config.sampling.num_samples', 'positive']),
        ('num_samples_negative', ['--mode=eval', '--config.eval.num_samples=-5'],
         ['config.eval.num_samples', '>= 0']),
        ('unknown_dataset', ['--config.data.dataset=no_such_dataset'],
         ['unknown dataset', 'no_such_dataset']),
        ('changed_model', ['--config.model.ch=32'],
         ['config.model.ch: checkpoint 16, now 32', 'allow_config_change=True']),
        ('changed_diffusion', ['--config.diffusion.num_timesteps=100'],
         ['config.diffusion.num_timesteps: checkpoint 250, now 100']),
        ('guidance_for_an_unconditional_checkpoint',
         ['--mode=sample', '--config.sampling.guidance_scale=2.0'],
         ['config.sampling.guidance_scale', 'class-conditional model']),
        ('missing_inception_weights',
         ['--mode=eval', '--config.eval.inception_weights=/nonexistent/inception.npz'],
         ['no Inception weights file', 'convert_inception']),
    )  # fmt: skip
    def test_refused_and_nothing_changes(self, args, fragments):
        before = _snapshot(self.workdir)
        self.assert_refused(_main(self.workdir, *args), *fragments, before=before)

    def test_a_conditional_model_on_data_without_labels(self):
        path = os.path.join(self.tmp, 'unlabelled.npz')
        np.savez(path, images=np.zeros((8, 8, 8, 1), np.uint8))
        fresh = os.path.join(self.tmp, 'fresh')
        proc = _main(fresh, '--config.model.num_classes=10', '--config.data.dataset=npz',
                     f'--config.data.path={path}')  # fmt: skip
        before = _snapshot(self.workdir)
        self.assert_refused(proc, 'has no class labels', 'num_classes=0', before=before)
        self.assertFalse([p for p in _snapshot(fresh) if p.startswith('checkpoints/')])

    def test_missing_config_file(self):
        before = _snapshot(self.workdir)
        proc = _main(self.workdir, config='configs/no_such_config.py')
        self.assert_refused(proc, 'no_such_config.py', before=before)

    @pytest.mark.slow  # imports TensorFlow: a fresh process keeps it out of the test worker
    def test_dataset_not_downloaded(self):
        before = _snapshot(self.workdir)
        proc = _main_subprocess(  # grey like the digits: the checkpoint fits, only the data is not
            self.workdir, '--config.data.dataset=mnist', f'--config.data.data_dir={self.tmp}/tfds'
        )
        self.assert_refused(proc, 'mnist', 'download_and_prepare', before=before)

    def test_empty_image_folder(self):
        folder = os.path.join(self.tmp, 'images')
        os.makedirs(folder)
        before = _snapshot(self.workdir)
        proc = _main(self.workdir, '--config.data.dataset=folder', f'--config.data.path={folder}')
        self.assert_refused(proc, folder, before=before)

    def test_image_folder_with_only_non_images(self):
        folder = os.path.join(self.tmp, 'images')
        os.makedirs(folder)
        pathlib.Path(folder, 'notes.txt').write_text('not an image')
        pathlib.Path(folder, 'broken.png').write_bytes(b'\x89PNG truncated')
        before = _snapshot(self.workdir)
        proc = _main(self.workdir, '--config.data.dataset=folder', f'--config.data.path={folder}')
        self.assert_refused(proc, folder, before=before)
        self.assertIn('skipped 1 non-PNG/JPEG files', proc.stderr)  # warned, then refused
        self.assertIn('broken.png', proc.stderr)

    def test_unreadable_image_folder(self):
        if os.geteuid() == 0:  # root reads everything: use a path that is a file instead
            folder = os.path.join(self.tmp, 'images')
            pathlib.Path(folder).write_text('a file, not a folder')
        else:
            folder = os.path.join(self.tmp, 'images')
            os.makedirs(folder)
            os.chmod(folder, 0)
            self.addCleanup(os.chmod, folder, 0o755)
        before = _snapshot(self.workdir)
        proc = _main(self.workdir, '--config.data.dataset=folder', f'--config.data.path={folder}')
        self.assert_refused(proc, folder, before=before)

    @parameterized.named_parameters(
        ('member_not_an_array', 'images.txt', b'not an array', "'images.txt' is not an array"),
        ('header_claims_1e12_images', 'images.npy', None, 'claims uint8 [1000000000000, 8, 8, 1]'),
    )
    def test_hostile_npz_data(self, member, data, fragment):
        if data is None:
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                header, {'descr': '|u1', 'fortran_order': False, 'shape': (10**12, 8, 8, 1)}
            )
            data = header.getvalue() + bytes(64)
        path = os.path.join(self.tmp, 'data.npz')
        with zipfile.ZipFile(path, 'w') as archive:
            archive.writestr(member, data)
        before = _snapshot(self.workdir)
        proc = _main(self.workdir, '--config.data.dataset=npz', f'--config.data.path={path}')
        self.assert_refused(proc, 'data.npz', fragment, before=before)

    def test_folder_of_a_fifo_and_a_decompression_bomb(self):
        from input_pipeline_test import png_header_only

        folder = os.path.join(self.tmp, 'images')
        os.makedirs(folder)
        os.mkfifo(os.path.join(folder, 'x.png'))
        pathlib.Path(folder, 'bomb.png').write_bytes(png_header_only(20000, 20000))
        before = _snapshot(self.workdir)
        signal.signal(signal.SIGALRM, lambda *_: self.fail('blocked on the FIFO'))
        self.addCleanup(signal.signal, signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(120)
        self.addCleanup(signal.alarm, 0)
        proc = _main(self.workdir, '--config.data.dataset=folder', f'--config.data.path={folder}')
        self.assert_refused(proc, 'no PNG/JPEG images found', before=before)
        self.assertIn('not regular files, e.g. ' + os.path.join(folder, 'x.png'), proc.stderr)
        self.assertIn("over Pillow's decompression-bomb limit", proc.stderr)

    def test_inception_weights_whose_header_claims_1e12_values(self):
        weights = os.path.join(self.tmp, 'inception.npz')
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {'descr': '<f4', 'fortran_order': False, 'shape': (10**12,)}
        )
        with zipfile.ZipFile(weights, 'w') as archive:
            archive.writestr('conv/kernel.npy', header.getvalue() + bytes(16))
        before = _snapshot(self.workdir)
        proc = _main(self.workdir, '--mode=eval', f'--config.eval.inception_weights={weights}')
        self.assert_refused(proc, 'cannot read Inception weights', 'claims float32', before=before)

    def _corrupt(self, how: str) -> None:
        for step in ('2', '4'):
            files = [
                p
                for p in pathlib.Path(self.workdir, 'checkpoints', step, 'state').rglob('*')
                if p.is_file() and p.parent.name == 'd'
            ]
            self.assertNotEmpty(files)
            for path in files:
                data = path.read_bytes()
                path.write_bytes(
                    data[: len(data) // 2] if how == 'truncated' else b'\0' * len(data)
                )

    # A fresh process: after a failed restore, orbax's unfinished reads report themselves at
    # interpreter exit, and the error line must still come last.
    @parameterized.parameters(('truncated', 'train'), ('zeroed', 'sample'))
    @pytest.mark.slow
    def test_damaged_checkpoints(self, how, mode):
        self._corrupt(how)
        before = _snapshot(self.workdir)
        proc = _main_subprocess(self.workdir, f'--mode={mode}')
        self.assert_refused(proc, 'could be restored', 'step 4', 'step 2', before=before)

    @pytest.mark.slow  # a failed restore, as above
    def test_changed_model_allowed_but_shapes_differ(self):
        before = _snapshot(self.workdir)
        proc = _main_subprocess(
            self.workdir, '--config.model.ch=32', '--config.training.allow_config_change=True'
        )
        self.assert_refused(proc, 'could be restored', 'step 4', 'step 2', before=before)

    def test_wrong_checksum_inception_weights(self):
        from diffusion_jax.evaluation import inception

        weights = os.path.join(self.tmp, 'inception.npz')
        flat = {k: np.zeros(s, np.float32) for k, s in inception.param_shapes().items()}
        inception.save_params(weights, flat, source_sha256='ab' * 32)
        before = _snapshot(self.workdir)
        proc = _main(self.workdir, '--mode=eval', f'--config.eval.inception_weights={weights}')
        self.assert_refused(proc, 'SHA-256 abab', 'inception_sha256', before=before)

    def test_sample_mode_without_checkpoints(self):
        empty = os.path.join(self.tmp, 'empty')
        os.makedirs(empty)
        pathlib.Path(empty, 'notes.txt').write_text('mine')
        self.workdir = empty
        before = _snapshot(empty)
        self.assert_refused(_main(empty, '--mode=sample'), 'train first', before=before)

    @pytest.mark.slow  # 4 CPU devices need a fresh process with XLA_FLAGS set
    def test_batch_that_does_not_divide_over_the_devices(self):
        before = _snapshot(self.workdir)
        proc = _main_subprocess(
            self.workdir,
            '--config.training.batch_size=6',
            env={'XLA_FLAGS': fast_compile.xla_flags(4)},
        )
        self.assert_refused(proc, 'does not divide over 4 devices', before=before)


if __name__ == '__main__':
    absltest.main()
