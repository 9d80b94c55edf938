"""Importing diffusers-format DDPM weights, checked against diffusers' own output.

The fixture `fixtures/diffusers_tiny/` is a tiny diffusers UNet2DModel with the DDPM settings and
random weights, with its output on fixed inputs, made by `fixtures/make_diffusers_fixture.py`
(torch and diffusers); this test needs only numpy and safetensors.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import jax
import numpy as np
from absl.testing import absltest, parameterized
from safetensors.numpy import load_file, save_file

from diffusion_jax import convert, generate, models

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = REPO / 'tests' / 'fixtures' / 'diffusers_tiny'


def _copy_fixture(tmp: str, **config_changes) -> str:
    target = os.path.join(tmp, 'unet')
    shutil.copytree(FIXTURE, target)
    if config_changes:
        path = os.path.join(target, 'config.json')
        with open(path) as f:
            config = json.load(f)
        config.update(config_changes)
        with open(path, 'w') as f:
            json.dump(config, f)
    return target


class ConvertTest(parameterized.TestCase):
    def test_our_forward_pass_on_the_converted_weights_matches_diffusers(self):
        config, params = convert.load_diffusers_unet(str(FIXTURE))
        with np.load(FIXTURE / 'io.npz') as f:
            x, t, expected = f['x'], f['t'], f['out']
        out = models.get_model(config).apply({'params': params}, x, t, train=False)
        np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)
        self.assertGreater(np.abs(expected).max(), 0.05)  # a real output, not near zero

    def test_the_config_describes_the_diffusers_model_and_its_scheduler(self):
        config, _ = convert.load_diffusers_unet(str(FIXTURE))
        m = config.model
        self.assertEqual((m.ch, tuple(m.ch_mult), m.num_res_blocks), (16, (1, 2), 1))
        self.assertEqual((tuple(m.attn_resolutions), m.num_groups), ((4,), 4))
        self.assertEqual((config.data.image_size, config.data.num_channels), (8, 3))
        d = config.diffusion
        self.assertEqual(
            (d.num_timesteps, d.beta_schedule, d.model_var_type), (1000, 'linear', 'fixedlarge')
        )

    def test_a_pipeline_root_with_unet_and_scheduler_folders_works(self):
        with tempfile.TemporaryDirectory() as tmp:
            unet = _copy_fixture(tmp)
            os.makedirs(os.path.join(tmp, 'scheduler'))
            with open(os.path.join(tmp, 'scheduler', 'scheduler_config.json'), 'w') as f:
                json.dump({'num_train_timesteps': 500, 'variance_type': 'fixed_small'}, f)
            os.remove(os.path.join(unet, 'scheduler_config.json'))
            config, params = convert.load_diffusers_unet(tmp)
        self.assertEqual(config.diffusion.num_timesteps, 500)
        self.assertEqual(config.diffusion.model_var_type, 'fixedsmall')
        self.assertIn('mid_attn_1', params)

    @parameterized.parameters(
        ({'norm_eps': 1e-5}, 'norm_eps=1e-05'),
        ({'flip_sin_to_cos': True}, 'flip_sin_to_cos=True'),
        ({'attention_head_dim': 8}, 'attention_head_dim=8'),
        ({'down_block_types': ['DownBlock2D', 'CrossAttnDownBlock2D']}, 'CrossAttnDownBlock2D'),
    )
    def test_settings_our_network_cannot_reproduce_are_refused(self, changes, fragment):
        with tempfile.TemporaryDirectory() as tmp:
            unet = _copy_fixture(tmp, **changes)
            with self.assertRaisesRegex(convert.ConversionError, fragment.replace('[', r'\[')):
                convert.load_diffusers_unet(unet)

    def test_a_missing_tensor_is_named(self):
        with tempfile.TemporaryDirectory() as tmp:
            unet = _copy_fixture(tmp)
            path = os.path.join(unet, convert.WEIGHTS_FILE)
            tensors = load_file(path)
            del tensors['mid_block.attentions.0.to_k.weight']
            save_file(tensors, path)
            with self.assertRaisesRegex(convert.ConversionError, 'to_k.weight'):
                convert.load_diffusers_unet(unet)

    def test_the_command_writes_a_workdir_the_sampler_restores_and_never_overwrites_one(self):
        with tempfile.TemporaryDirectory() as tmp:
            workdir = os.path.join(tmp, 'ddpm')
            cmd = [
                sys.executable,
                '-m',
                'diffusion_jax.convert',
                f'--diffusers_dir={FIXTURE}',
                f'--workdir={workdir}',
            ]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
            self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
            config, params = convert.load_diffusers_unet(str(FIXTURE))
            _, ema_params, restored_config, step = generate.load_sampler(workdir, config)
            self.assertEqual(step, 0)
            self.assertEqual(restored_config.model.ch, 16)
            for a, b in zip(jax.tree.leaves(ema_params), jax.tree.leaves(params), strict=True):
                np.testing.assert_array_equal(a, b)

            before = {p: p.read_bytes() for p in pathlib.Path(workdir).rglob('*') if p.is_file()}
            again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
            self.assertEqual(again.returncode, 2)
            self.assertIn('already has checkpoints', again.stderr.strip().splitlines()[-1])
            after = {p: p.read_bytes() for p in pathlib.Path(workdir).rglob('*') if p.is_file()}
            self.assertEqual(before, after)


if __name__ == '__main__':
    absltest.main()
