"""Importing Improved DDPM weights (diffusion_jax.convert_iddpm), checked against their network.

`fixtures/iddpm_tiny/` holds two tiny U-Nets built by openai/improved-diffusion's `UNetModel`
with random weights (their state dicts as .npz, one also as .pt), their outputs on fixed inputs
and the parameter count of their CIFAR10 model, all made by `fixtures/make_iddpm_fixture.py`
with torch and their source; `fixtures/iddpm_tiny/config.py` is our config for each. These tests
need only numpy (the .pt test runs where torch is installed).
"""

import importlib.util
import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest
from absl.testing import absltest, parameterized

from diffusion_jax import checkpointing, config_lib, convert_iddpm, experiment, models
from diffusion_jax.configs import cifar10, cifar10_iddpm

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = REPO / 'tests' / 'fixtures' / 'iddpm_tiny'
_spec = importlib.util.spec_from_file_location('iddpm_tiny_config', FIXTURE / 'config.py')
fixture_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixture_config)


def _state(name: str) -> dict[str, np.ndarray]:
    return convert_iddpm.load_state_dict(str(FIXTURE / f'{name}.npz'))


def _forward(config, params, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(our output, theirs) on the fixture's inputs for model `name`."""
    with np.load(FIXTURE / f'{name}_io.npz') as f:
        x, t, expected = f['x'], f['t'], f['out']
        y = f['y'] if 'y' in f.files else None
    out = models.get_model(config).apply({'params': params}, x, t, y, train=False)
    return np.asarray(out), expected


def _num_params(config) -> int:
    return sum(x.size for x in jax.tree.leaves(experiment.build(config).abstract_state.params))


class ConvertStateDictTest(parameterized.TestCase):
    @parameterized.parameters('uncond', 'cond')
    def test_our_forward_pass_on_the_converted_weights_matches_theirs(self, name):
        config = fixture_config.get_config(name)
        config_lib.validate(config)
        params = convert_iddpm.convert_state_dict(_state(name), config)
        out, expected = _forward(config, params, name)
        np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)
        self.assertGreater(np.abs(expected).mean(), 0.1)  # an output of order 1, not near 0

    def test_a_wrong_head_count_is_caught_by_the_fixture(self):
        # Heads leave no trace in the shapes: only the output tells 2 heads from 1.
        config = fixture_config.get_config('uncond')
        config.model.num_heads = 1
        params = convert_iddpm.convert_state_dict(_state('uncond'), config)
        out, expected = _forward(config, params, 'uncond')
        self.assertGreater(np.abs(out - expected).max(), 1e-2)

    def test_the_recipe_has_as_many_parameters_as_their_cifar10_model(self):
        import json

        with open(FIXTURE / 'flags.json') as f:
            theirs = json.load(f)['cifar10_params']
        self.assertEqual(_num_params(cifar10_iddpm.get_config()), theirs)
        self.assertEqual(theirs, 52_546_438)

    def test_the_recipe_has_improved_ddpm_settings(self):
        config = cifar10_iddpm.get_config()
        config_lib.validate(config)
        m, d = config.model, config.diffusion
        self.assertEqual((m.ch, m.num_res_blocks, tuple(m.attn_resolutions)), (128, 3, (16, 8)))
        self.assertEqual((m.num_heads, m.use_scale_shift_norm, m.dropout), (4, True, 0.3))
        self.assertEqual((d.num_timesteps, d.beta_schedule), (4000, 'cosine'))
        self.assertEqual((d.model_var_type, d.loss_type), ('learned_range', 'hybrid'))
        self.assertTrue(m.rescale_timesteps)

    def test_the_paper_network_keeps_its_parameter_count(self):
        self.assertEqual(_num_params(cifar10.get_config()), 35_746_307)

    @parameterized.parameters(
        ('time_embedding', 'ddpm', "config.model.time_embedding is 'ddpm', not 'iddpm'"),
        ('norm_epsilon', 1e-6, 'config.model.norm_epsilon is 1e-06, not 1e-05'),
        ('downsample_padding', 'same', "config.model.downsample_padding is 'same'"),
    )
    def test_a_config_with_other_conventions_is_refused(self, key, value, message):
        config = fixture_config.get_config('uncond')
        config.model[key] = value
        with self.assertRaisesRegex(convert_iddpm.ConversionError, message):
            convert_iddpm.convert_state_dict(_state('uncond'), config)

    def test_weights_that_do_not_fit_the_config_are_named(self):
        state = _state('uncond')
        state['extra.weight'] = state.pop('out.2.weight')
        with self.assertRaisesRegex(
            convert_iddpm.ConversionError,
            r'1 missing tensors: out\.2\.weight; 1 unexpected tensors: extra\.weight',
        ):
            convert_iddpm.convert_state_dict(state, fixture_config.get_config('uncond'))
        config = fixture_config.get_config('uncond')
        config.diffusion.model_var_type, config.diffusion.loss_type = 'fixedlarge', 'mse'
        with self.assertRaisesRegex(convert_iddpm.ConversionError, r'conv_out/kernel \(from out'):
            convert_iddpm.convert_state_dict(_state('uncond'), config)

    def test_an_unconditional_config_refuses_a_conditional_model(self):
        config = fixture_config.get_config('cond')
        config.model.num_classes = 0
        with self.assertRaisesRegex(convert_iddpm.ConversionError, 'unexpected tensors: label_emb'):
            convert_iddpm.convert_state_dict(_state('cond'), config)

    def test_the_null_label_gets_a_zero_embedding(self):
        params = convert_iddpm.convert_state_dict(_state('cond'), fixture_config.get_config('cond'))
        table = params['label_emb']['embedding']
        np.testing.assert_array_equal(table[:3], _state('cond')['label_emb.weight'])
        np.testing.assert_array_equal(table[3], 0.0)


class LoadStateDictTest(absltest.TestCase):
    def test_a_pt_file_reads_as_the_same_state_dict(self):
        pytest.importorskip('torch')
        pt = convert_iddpm.load_state_dict(str(FIXTURE / 'uncond.pt'))
        npz = _state('uncond')
        self.assertEqual(sorted(pt), sorted(npz))
        for k in npz:
            np.testing.assert_array_equal(pt[k], npz[k])

    def test_a_pt_file_without_torch_says_how_to_read_it(self):
        no_torch = absltest.mock.patch.dict(sys.modules, {'torch': None})
        needs = self.assertRaisesRegex(convert_iddpm.ConversionError, 'needs torch: pip install')
        with no_torch, needs:
            convert_iddpm.load_state_dict(str(FIXTURE / 'uncond.pt'))

    def test_a_missing_file_is_named(self):
        with self.assertRaisesRegex(convert_iddpm.ConversionError, 'no such checkpoint file: /no'):
            convert_iddpm.load_state_dict('/no/such.pt')


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, '-m', 'diffusion_jax.convert_iddpm', *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # subprocesses
class CommandLineTest(absltest.TestCase):
    def test_the_workdir_restores_and_a_second_run_is_refused(self):
        with tempfile.TemporaryDirectory() as tmp:
            workdir = os.path.join(tmp, 'out')
            args = (
                f'--checkpoint={FIXTURE / "uncond.npz"}',
                f'--config={FIXTURE / "config.py"}:uncond',
                f'--workdir={workdir}',
            )
            proc = _run_cli(*args)
            self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
            config = fixture_config.get_config('uncond')
            expected = convert_iddpm.convert_state_dict(_state('uncond'), config)
            ckpt_dir = os.path.join(workdir, 'checkpoints')
            with checkpointing.Checkpointer.read_only(ckpt_dir) as ckpt:
                self.assertEqual(ckpt.latest_valid_step(), 0)
                for key in ('params', 'ema_params'):
                    restored = ckpt.restore_subtree(key, expected, step=0)
                    jax.tree.map(np.testing.assert_array_equal, restored, expected)
            again = _run_cli(*args)
            self.assertEqual(again.returncode, 2)
            self.assertEqual(
                again.stderr.strip().splitlines(),
                [f'error: {workdir}/checkpoints already has checkpoints; use a new --workdir'],
            )

    def test_a_refused_config_is_one_error_line_and_writes_nothing(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, 'out')
            proc = _run_cli(
                f'--checkpoint={FIXTURE / "uncond.npz"}',
                f'--config={FIXTURE / "config.py"}:uncond',
                '--config.model.time_embedding=ddpm',
                f'--workdir={out}',
            )
            self.assertEqual(proc.returncode, 2)
            lines = proc.stderr.strip().splitlines()
            self.assertLen(lines, 1)
            self.assertStartsWith(lines[0], "error: config.model.time_embedding is 'ddpm'")
            self.assertFalse(os.path.exists(out))


if __name__ == '__main__':
    absltest.main()
