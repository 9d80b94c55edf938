"""The package and every mode on built-in data run without TensorFlow, tfds or clu.

Each run happens in a fresh interpreter that runs `diffusion_jax.main` as `python -m` would and
then reports which of `tensorflow`, `tensorflow_datasets` and `clu` are in `sys.modules`. CI's
venv has all three installed (the `tfds` extra), so any import of them shows up. With `block`,
the interpreter first makes them absent (`sys.modules[name] = None`, as if not installed).
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import fast_compile
import numpy as np
import pytest
from absl.testing import absltest
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = ('tensorflow', 'tensorflow_datasets', 'clu')

_RUNNER = r"""
import json, runpy, sys
FORBIDDEN = {forbidden!r}
if {block!r}:
    sys.modules.update(dict.fromkeys(FORBIDDEN))
sys.argv = ['diffusion_jax.main', *{argv!r}]
code = 0
try:
    runpy.run_module('diffusion_jax.main', run_name='__main__', alter_sys=True)
except SystemExit as e:
    code = e.code or 0
loaded = sorted(m for m, v in sys.modules.items() if m.split('.')[0] in FORBIDDEN and v)
print('RESULT ' + json.dumps({{'code': code, 'loaded': loaded}}))
"""

# A tiny network and a short run: the point is which modules load, not what is learned.
_TINY = (
    '--config.model.ch=32',
    '--config.model.ch_mult=(1,2)',
    '--config.model.num_res_blocks=1',
    '--config.model.attn_resolutions=(4,)',
    '--config.diffusion.num_timesteps=10',
    '--config.training.num_train_steps=4',
    '--config.training.batch_size=8',
    '--config.training.log_every_steps=2',
    '--config.training.checkpoint_every_steps=4',
    '--config.training.sample_every_steps=4',
    '--config.sampling.num_samples=8',
    '--config.sampling.batch_size=8',
    '--config.eval.num_samples=8',
    '--config.eval.batch_size=8',
    '--config.eval.bpd=False',
)


_TINY_CIFAR10 = (
    '--config=configs/cifar10.py',
    '--config.model.ch=32',
    '--config.model.ch_mult=(1,2)',
    '--config.model.num_res_blocks=1',
    '--config.model.attn_resolutions=(16,)',
    '--config.training.batch_size=8',
)


def run_main(*argv: str, block: bool = False) -> dict:
    script = _RUNNER.format(forbidden=FORBIDDEN, argv=list(argv), block=block)
    proc = subprocess.run(
        [sys.executable, '-c', script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=fast_compile.env(),
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith('RESULT ')]
    if proc.returncode or not lines:
        raise AssertionError(f'exit {proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}')
    return {**json.loads(lines[-1][len('RESULT ') :]), 'stderr': proc.stderr}


@pytest.mark.slow  # each test starts python -m diffusion_jax.main
class TensorFlowFreeTest(absltest.TestCase):
    def test_without_tensorflow_a_tfds_dataset_names_the_extra(self):
        with tempfile.TemporaryDirectory() as workdir:
            result = run_main(*_TINY_CIFAR10, f'--workdir={workdir}', '--mode=train', block=True)
            # No file is written (the checkpoint manager creates its empty folder first).
            files = [f for _, _, names in os.walk(workdir) for f in names]
            self.assertEqual(files, [])
        self.assertEqual(result['code'], 2)
        self.assertEqual(result['loaded'], [])
        last = result['stderr'].strip().splitlines()[-1]
        self.assertIn('error:', last)
        self.assertIn('diffusion-jax[tfds]', last)

    def test_the_check_sees_a_tensorflow_import(self):
        """The check can fail: a tfds config does load TensorFlow (CI's venv has the extra)."""
        try:
            import tensorflow_datasets  # noqa: F401
        except ImportError:
            self.skipTest('tensorflow-datasets is not installed here')
        with tempfile.TemporaryDirectory() as workdir:
            result = run_main(*_TINY_CIFAR10, f'--workdir={workdir}')
        self.assertIn('tensorflow', result['loaded'])

    def test_train_sample_eval_on_digits_load_no_tensorflow(self):
        with tempfile.TemporaryDirectory() as workdir:
            for mode in ('train', 'sample', 'eval'):
                result = run_main(
                    '--config=configs/digits.py', f'--workdir={workdir}', f'--mode={mode}', *_TINY
                )
                self.assertEqual(result['code'], 0, (mode, result['stderr'][-3000:]))
                self.assertEqual(result['loaded'], [], mode)
            names = os.listdir(workdir)
            self.assertTrue(any(n.startswith('events.out.tfevents') for n in names), names)
            self.assertTrue(os.listdir(os.path.join(workdir, 'eval')))

    def test_training_on_npz_and_folder_data_loads_no_tensorflow(self):
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
        with tempfile.TemporaryDirectory() as tmp:
            np.savez(os.path.join(tmp, 'data.npz'), train=images)
            folder = os.path.join(tmp, 'folder')
            os.makedirs(folder)
            for i, image in enumerate(images):
                Image.fromarray(image).save(os.path.join(folder, f'{i:02d}.png'))
            for dataset, path in (('npz', 'data.npz'), ('folder', 'folder')):
                workdir = os.path.join(tmp, f'run_{dataset}')
                result = run_main(
                    '--config=configs/digits.py',
                    f'--workdir={workdir}',
                    f'--config.data.dataset={dataset}',
                    f'--config.data.path={os.path.join(tmp, path)}',
                    '--config.data.num_channels=3',
                    *_TINY,
                    '--config.training.sample_every_steps=0',
                )
                self.assertEqual(result['code'], 0, (dataset, result['stderr'][-3000:]))
                self.assertEqual(result['loaded'], [], dataset)

    def test_training_on_array_record_data_with_grain_loads_no_tensorflow(self):
        from input_pipeline_test import prepare_tiny_tfds_dataset

        with tempfile.TemporaryDirectory() as tmp:
            name = prepare_tiny_tfds_dataset(tmp, 'array_record')  # TF writes it, here
            result = run_main(
                '--config=configs/digits.py',
                f'--workdir={os.path.join(tmp, "run")}',
                f'--config.data.dataset={name}',
                f'--config.data.data_dir={tmp}',
                '--config.data.image_size=4',
                '--config.data.loader=auto',  # ArrayRecord: auto picks grain
                *_TINY,
                '--config.training.sample_every_steps=0',
            )
        self.assertEqual(result['code'], 0, result['stderr'][-3000:])
        self.assertIn('tensorflow_datasets', result['loaded'])  # the check sees tfds...
        self.assertNotIn('tensorflow', [m.split('.')[0] for m in result['loaded']])  # ...not TF


if __name__ == '__main__':
    absltest.main()
