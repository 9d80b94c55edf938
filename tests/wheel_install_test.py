"""The package on its own, as a wheel installs it: every config and `convert` work without the repo.

The packages are those pyproject's `[tool.setuptools.packages.find]` selects
(`find_packages(include=['diffusion_jax*'])`), copied into an empty folder; a fresh interpreter
runs there with only that folder on its path, so neither the checkout's top-level `configs/` nor
any file next to the package can be reached.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest
import setuptools
from absl.testing import absltest

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = REPO / 'tests' / 'fixtures' / 'diffusers_tiny'

_CHECK = """
import sys, importlib
from diffusion_jax import config_lib
from diffusion_jax.configs import celeba_hq, cifar10, digits, lsun_church
for module in (cifar10, digits, celeba_hq, lsun_church):
    config_lib.validate(module.get_config())
assert 'configs' not in sys.modules, 'the top-level configs/ was imported'
import diffusion_jax
assert diffusion_jax.__file__.startswith(sys.argv[1]), diffusion_jax.__file__
print('ok')
"""


def _install_like_a_wheel(target: str) -> None:
    for package in setuptools.find_packages(str(REPO), include=['diffusion_jax*']):
        source = REPO / package.replace('.', os.sep)
        dest = pathlib.Path(target, *package.split('.'))
        dest.mkdir(parents=True, exist_ok=True)
        for path in source.glob('*.py'):
            shutil.copy(path, dest / path.name)


@pytest.mark.slow
class WheelInstallTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.site = os.path.join(cls.tmp, 'site')
        _install_like_a_wheel(cls.site)
        cls.env = {**os.environ, 'PYTHONPATH': cls.site, 'JAX_PLATFORMS': 'cpu'}

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *args],
            cwd=self.tmp,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    def test_the_package_ships_its_configs(self):
        self.assertTrue(os.path.isfile(os.path.join(self.site, 'diffusion_jax/configs/cifar10.py')))

    def test_every_config_loads_and_validates_without_the_repository(self):
        proc = self._run('-c', _CHECK, self.site)
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        self.assertEqual(proc.stdout.strip(), 'ok')

    def test_convert_writes_a_workdir_without_the_repository(self):
        workdir = os.path.join(self.tmp, 'converted')
        proc = self._run(
            '-m', 'diffusion_jax.convert', f'--diffusers_dir={FIXTURE}', f'--workdir={workdir}'
        )
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        self.assertTrue(os.path.isfile(os.path.join(workdir, 'config.json')))
        self.assertTrue(os.path.isdir(os.path.join(workdir, 'checkpoints', '0')))


if __name__ == '__main__':
    absltest.main()
