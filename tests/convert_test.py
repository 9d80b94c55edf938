"""Importing diffusers-format DDPM weights (diffusion_jax.convert), checked against diffusers.

`fixtures/diffusers_tiny/` is a tiny diffusers UNet2DModel with the DDPM settings and random
weights (config.json, diffusion_pytorch_model.safetensors, scheduler_config.json) and its output
on fixed inputs (io.npz), all made by `fixtures/make_diffusers_fixture.py` with torch and
diffusers. These tests need only numpy and safetensors.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest, parameterized
from safetensors.numpy import load_file, save_file

from diffusion_jax import checkpointing, config_lib, convert, models, parallel, schedules
from diffusion_jax import train_state as train_state_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = REPO / 'tests' / 'fixtures' / 'diffusers_tiny'


def _copy_fixture(tmp: str, changes=None, scheduler_changes=None, drop=()) -> str:
    """A copy of the fixture with config.json / scheduler_config.json keys changed or dropped."""
    target = os.path.join(tmp, 'model')
    shutil.copytree(FIXTURE, target)
    for name, updates in (('config.json', changes), ('scheduler_config.json', scheduler_changes)):
        path = os.path.join(target, name)
        with open(path) as f:
            config = json.load(f)
        config.update(updates or {})
        for key in drop:
            config.pop(key, None)
        with open(path, 'w') as f:
            json.dump(config, f)
    return target


def _edit_weights(unet_dir: str, edit) -> None:
    path = os.path.join(unet_dir, convert.WEIGHTS_FILE)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _assert_trees_equal(test, a, b) -> None:
    test.assertEqual(jax.tree.structure(a), jax.tree.structure(b))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _diffusers_cosine_betas(n: int) -> np.ndarray:
    """diffusers' squaredcos_cap_v2: 1 - abar((i + 1) / n) / abar(i / n), capped at 0.999."""

    def alpha_bar(s):
        return np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2

    i = np.arange(n, dtype=np.float64)
    return np.minimum(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999)


def _files(root: str) -> dict[pathlib.Path, bytes]:
    return {p: p.read_bytes() for p in pathlib.Path(root).rglob('*') if p.is_file()}


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, '-m', 'diffusion_jax.convert', *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


class LoadDiffusersUnetTest(parameterized.TestCase):
    @pytest.mark.slow  # compiles and runs the converted U-Net
    def test_our_forward_pass_on_the_converted_weights_matches_diffusers(self):
        config, params = convert.load_diffusers_unet(str(FIXTURE))
        with np.load(FIXTURE / 'io.npz') as f:
            x, t, expected = f['x'], f['t'], f['out']
        out = models.get_model(config).apply({'params': params}, x, t, train=False)
        np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)
        self.assertGreater(np.abs(expected).mean(), 0.1)  # an output of order 1, not near 0

    def test_the_config_is_derived_from_the_diffusers_model_and_scheduler_configs(self):
        config, _ = convert.load_diffusers_unet(str(FIXTURE))
        config_lib.validate(config)
        m, d = config.model, config.diffusion
        self.assertEqual((m.ch, tuple(m.ch_mult), m.num_res_blocks), (8, (1, 2), 1))
        self.assertEqual((tuple(m.attn_resolutions), m.num_groups, m.dropout), ((4,), 4, 0.0))
        self.assertEqual((config.data.image_size, config.data.num_channels), (8, 3))
        self.assertEqual((d.num_timesteps, d.beta_schedule), (1000, 'linear'))
        self.assertEqual((d.beta_start, d.beta_end), (1e-4, 0.02))
        self.assertEqual((d.model_mean_type, d.model_var_type), ('eps', 'fixedlarge'))
        self.assertTrue(config.sampling.clip_denoised)

    def test_without_a_scheduler_config_or_dropout_the_paper_values_stay(self):
        with tempfile.TemporaryDirectory() as tmp:
            unet = _copy_fixture(tmp, drop=['dropout'])
            os.remove(os.path.join(unet, convert.SCHEDULER_FILE))
            config, _ = convert.load_diffusers_unet(unet)
        d = config.diffusion
        self.assertEqual(
            (d.num_timesteps, d.beta_schedule, d.model_var_type), (1000, 'linear', 'fixedlarge')
        )
        self.assertEqual(config.model.dropout, 0.1)

    def test_a_pipeline_root_with_unet_and_scheduler_folders_works(self):
        with tempfile.TemporaryDirectory() as tmp:
            unet = _copy_fixture(tmp)
            os.rename(unet, os.path.join(tmp, 'unet'))
            os.remove(os.path.join(tmp, 'unet', convert.SCHEDULER_FILE))
            os.makedirs(os.path.join(tmp, 'scheduler'))
            scheduler = {
                'num_train_timesteps': 500,
                'beta_start': 2e-4,
                'beta_end': 0.03,
                'variance_type': 'fixed_small_log',
                'clip_sample': False,
            }
            with open(os.path.join(tmp, 'scheduler', convert.SCHEDULER_FILE), 'w') as f:
                json.dump(scheduler, f)
            config, params = convert.load_diffusers_unet(tmp)
        d = config.diffusion
        self.assertEqual((d.num_timesteps, d.beta_start, d.beta_end), (500, 2e-4, 0.03))
        self.assertEqual(d.model_var_type, 'fixedsmall')
        self.assertFalse(config.sampling.clip_denoised)
        _assert_trees_equal(self, params, convert.load_diffusers_unet(str(FIXTURE))[1])

    def test_one_head_given_as_the_channel_count_is_the_same_model(self):
        with tempfile.TemporaryDirectory() as tmp:
            _, params = convert.load_diffusers_unet(_copy_fixture(tmp, {'attention_head_dim': 16}))
        _assert_trees_equal(self, params, convert.load_diffusers_unet(str(FIXTURE))[1])

    def test_older_attention_names_give_the_same_params(self):
        old = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}

        def rename(tensors):
            for name in list(tensors):
                for new, legacy in old.items():
                    if f'.{new}.' in name:
                        tensors[name.replace(f'.{new}.', f'.{legacy}.')] = tensors.pop(name)

        with tempfile.TemporaryDirectory() as tmp:
            unet = _copy_fixture(tmp)
            _edit_weights(unet, rename)
            self.assertIn(
                'mid_block.attentions.0.proj_attn.weight',
                load_file(os.path.join(unet, convert.WEIGHTS_FILE)),
            )
            _, params = convert.load_diffusers_unet(unet)
        _assert_trees_equal(self, params, convert.load_diffusers_unet(str(FIXTURE))[1])

    def test_a_learned_variance_output_becomes_learned_range_with_the_hybrid_loss(self):
        with open(FIXTURE / 'config.json') as f:
            unet = {**json.load(f), 'out_channels': 6}
        config = convert.config_from_diffusers(unet, {'variance_type': 'learned_range'})
        d = config.diffusion
        self.assertEqual((d.model_var_type, d.loss_type), ('learned_range', 'hybrid'))
        self.assertEqual(models.get_model(config).out_ch, 6)
        with self.assertRaisesRegex(ValueError, "variance_type='fixed_large'"):
            convert.config_from_diffusers(unet, {'variance_type': 'fixed_large'})

    @parameterized.named_parameters(
        ('linear', 'linear', lambda n: np.linspace(1e-4, 0.02, n)),
        ('scaled_linear', 'scaled_linear', lambda n: np.linspace(1e-4**0.5, 0.02**0.5, n) ** 2),
        ('squaredcos_cap_v2', 'squaredcos_cap_v2', _diffusers_cosine_betas),
    )
    def test_each_scheduler_beta_schedule_gives_diffusers_betas(self, name, diffusers_betas):
        with open(FIXTURE / 'config.json') as f:
            unet = json.load(f)
        scheduler = {'beta_schedule': name, 'num_train_timesteps': 200, 'prediction_type': 'sample'}
        d = convert.config_from_diffusers(unet, scheduler).diffusion
        betas = schedules.get_beta_schedule(
            d.beta_schedule, d.num_timesteps, beta_start=d.beta_start, beta_end=d.beta_end
        )
        np.testing.assert_allclose(betas, diffusers_betas(200), rtol=1e-12, atol=0)
        self.assertEqual(d.model_mean_type, 'xstart')  # prediction_type 'sample'

    @parameterized.named_parameters(
        ('norm_eps', {'norm_eps': 1e-5}, 'norm_eps=1e-05', 'norm_eps=1e-06'),
        ('flip_sin_to_cos', {'flip_sin_to_cos': True}, 'flip_sin_to_cos=True', '=False'),
        ('freq_shift', {'freq_shift': 0}, 'freq_shift=0', 'freq_shift=1'),
        ('downsample_padding', {'downsample_padding': 1}, 'downsample_padding=1', '=0'),
        ('multi_head', {'attention_head_dim': 8}, 'attention_head_dim=8', '=None'),
        ('act_fn', {'act_fn': 'gelu'}, "act_fn='gelu'", "act_fn='silu'"),
        ('scale_shift', {'resnet_time_scale_shift': 'scale_shift'}, "'scale_shift'", "'default'"),
        ('center_input', {'center_input_sample': True}, 'center_input_sample=True', '=False'),
        ('fourier', {'time_embedding_type': 'fourier'}, "'fourier'", "'positional'"),
        ('no_mid_block', {'mid_block_type': None}, 'mid_block_type=None', "'UNetMidBlock2D'"),
        ('no_mid_attention', {'add_attention': False}, 'add_attention=False', '=True'),
        ('class_embedding', {'class_embed_type': 'timestep'}, "'timestep'", '=None'),
        ('conditional', {'_class_name': 'UNet2DConditionModel'}, 'UNet2DConditionModel', ''),
        (
            'cross_attention',
            {'down_block_types': ['DownBlock2D', 'CrossAttnDownBlock2D']},
            "'CrossAttnDownBlock2D'",
            'AttnDownBlock2D',
        ),
        ('attention_levels', {'up_block_types': ['UpBlock2D', 'UpBlock2D']}, 'same levels', ''),
    )
    def test_settings_our_network_cannot_reproduce_are_refused(self, changes, bad, supported):
        with tempfile.TemporaryDirectory() as tmp:
            unet = _copy_fixture(tmp, changes)
            with self.assertRaisesRegex(ValueError, f'{re.escape(bad)}.*{re.escape(supported)}'):
                convert.load_diffusers_unet(unet)

    def test_an_absent_key_means_diffusers_default(self):
        with tempfile.TemporaryDirectory() as tmp:
            unet = _copy_fixture(tmp, drop=['norm_eps'])
            with self.assertRaisesRegex(ValueError, r"norm_eps=1e-05 \(diffusers' default"):
                convert.load_diffusers_unet(unet)

    @parameterized.named_parameters(
        ('v_prediction', {'prediction_type': 'v_prediction'}, "prediction_type='v_prediction'"),
        ('sigmoid', {'beta_schedule': 'sigmoid'}, "beta_schedule='sigmoid'"),
        ('learned', {'variance_type': 'learned'}, "variance_type='learned'"),
        ('thresholding', {'thresholding': True}, 'thresholding=True'),
        ('trained_betas', {'trained_betas': [0.1, 0.2]}, 'trained_betas=[0.1, 0.2]'),
        ('clip_range', {'clip_sample_range': 2.0}, 'clip_sample_range=2.0'),
    )
    def test_scheduler_settings_our_diffusion_cannot_reproduce_are_refused(self, changes, bad):
        with tempfile.TemporaryDirectory() as tmp:
            unet = _copy_fixture(tmp, scheduler_changes=changes)
            with self.assertRaisesRegex(ValueError, re.escape(bad)):
                convert.load_diffusers_unet(unet)

    @parameterized.named_parameters(
        (
            'missing',
            lambda t: t.pop('mid_block.attentions.0.to_k.weight'),
            '1 missing tensors: mid_block.attentions.0.to_k.weight',
        ),
        (
            'unexpected',
            lambda t: t.update({'extra.weight': np.zeros(3, np.float32)}),
            '1 unexpected tensors: extra.weight',
        ),
        (
            'mis_shaped',
            lambda t: t.update({'conv_in.weight': t['conv_in.weight'][:, :, :1, :1].copy()}),
            'conv_in/kernel (from conv_in.weight) (1, 1, 3, 8) != (3, 3, 3, 8)',
        ),
    )
    def test_weights_that_do_not_fit_are_named(self, edit, message):
        with tempfile.TemporaryDirectory() as tmp:
            unet = _copy_fixture(tmp)
            _edit_weights(unet, edit)
            with self.assertRaisesRegex(ValueError, re.escape(message)):
                convert.load_diffusers_unet(unet)


@pytest.mark.slow  # converts, writes and restores a whole workdir
class CommandTest(absltest.TestCase):
    """`python -m diffusion_jax.convert`, run once into a workdir shared by these tests."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.workdir = os.path.join(cls.tmp, 'ddpm')
        cls.args = [f'--diffusers_dir={FIXTURE}', f'--workdir={cls.workdir}']
        cls.proc = _run_cli(*cls.args, '--dataset=lsun/church_outdoor')

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp)
        super().tearDownClass()

    def test_the_workdir_restores_to_the_converted_params_and_ema_params(self):
        self.assertEqual(self.proc.returncode, 0, self.proc.stderr[-3000:])
        config, params = convert.load_diffusers_unet(str(FIXTURE))
        config.data.dataset = 'lsun/church_outdoor'
        with open(os.path.join(self.workdir, 'config.json')) as f:
            self.assertEqual(json.load(f), json.loads(json.dumps(config.to_dict())))
        # A fresh target of the structure train_and_evaluate builds (shapes from
        # create_train_state without compiling model.init), as zeros.
        model = models.get_model(config)
        tx, _ = train_state_lib.create_optimizer(config.optim)
        abstract = jax.eval_shape(
            lambda: train_state_lib.create_train_state(model, tx, jax.random.key(0), (8, 8, 3))
        )
        target = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
        target = jax.device_put(target, parallel.replicated(parallel.create_mesh()))
        ckpt_dir = os.path.join(self.workdir, 'checkpoints')
        with checkpointing.Checkpointer(ckpt_dir, keep=1, save_every_steps=1) as ckpt:
            self.assertEqual(ckpt.latest_valid_step(), 0)
            state, meta = ckpt.restore(target)
        self.assertEqual(int(state.step), 0)
        _assert_trees_equal(self, state.params, params)
        _assert_trees_equal(self, state.ema_params, params)
        self.assertEqual(meta['config']['data']['dataset'], 'lsun/church_outdoor')
        self.assertEqual(meta['config']['model']['ch'], 8)

    def test_a_workdir_with_checkpoints_is_refused_and_left_unchanged(self):
        self.assertEqual(self.proc.returncode, 0, self.proc.stderr[-3000:])
        before = _files(self.workdir)
        again = _run_cli(*self.args)
        self.assertEqual(again.returncode, 2)
        self.assertEqual(
            again.stderr.strip().splitlines(),
            [f'error: {self.workdir}/checkpoints already has checkpoints; use a new --workdir'],
        )
        self.assertEqual(_files(self.workdir), before)

    @pytest.mark.slow  # a subprocess
    def test_a_refused_model_is_one_error_line_with_exit_status_2_and_writes_nothing(self):
        with tempfile.TemporaryDirectory() as tmp:
            unet = _copy_fixture(tmp, {'flip_sin_to_cos': True})
            out = os.path.join(tmp, 'out')
            proc = _run_cli(f'--diffusers_dir={unet}', f'--workdir={out}')
            self.assertEqual(proc.returncode, 2)
            lines = proc.stderr.strip().splitlines()
            self.assertLen(lines, 1)
            self.assertStartsWith(lines[0], 'error: diffusers config flip_sin_to_cos=True')
            self.assertFalse(os.path.exists(out))


if __name__ == '__main__':
    absltest.main()
