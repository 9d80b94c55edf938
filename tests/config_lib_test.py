"""config_lib.validate against the config rules of STYLE.md and the bad-input list of the notes.

Every bad config is a fresh configs/cifar10.py with a few keys forced in (past ConfigDict's type
safety), and each test asserts both the dotted key and the substring that explains the problem.
"""

import os
import re
import subprocess
import sys
import tempfile

import ml_collections
import numpy as np
from absl.testing import absltest, parameterized

from configs import celeba_hq, cifar10, digits, lsun_church
from diffusion_jax import config_lib, schedules

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DELETE = object()  # as an override value: remove the key or section
# config.<section>.<key>: <what is wrong> (<the fix>)
_PROBLEM_LINE = re.compile(r'^config\.[a-z0-9_]+(\.[a-z0-9_]+)?: .+ \(.+\)$')


def _config_with(overrides: dict) -> ml_collections.ConfigDict:
    """A fresh CIFAR10 config with `overrides` ({dotted key: value}) forced in."""
    config = cifar10.get_config()
    config.unlock()
    for dotted, value in overrides.items():
        *sections, name = dotted.split('.')
        parent = config
        for section in sections:
            parent = parent[section]
        if name in parent:
            # A ConfigDict keeps each key's type; deleting the key first lets a wrong type in.
            del parent[name]
        if value is not _DELETE:
            parent[name] = value
    return config


def _flat_cifar10() -> dict:
    config = cifar10.get_config()
    return {f'{s}.{k}': config[s][k] for s in config for k in config[s]}


# (test name, overrides, substrings that must all appear in the error).
_BAD_CONFIGS = (
    (
        'unknown_key_suggests_the_closest_name',
        {'training.batchsize': 64},
        ['config.training.batchsize: unknown key', 'did you mean config.training.batch_size?'],
    ),
    (
        'unknown_section_suggests_the_closest_section',
        {'optimizer': ml_collections.ConfigDict({'learning_rate': 1e-3})},
        ['config.optimizer: unknown section', 'did you mean config.optim?'],
    ),
    (
        'key_in_the_wrong_section_points_to_the_right_one',
        {'training.learning_rate': 1e-3},
        ['config.training.learning_rate: unknown key', 'did you mean config.optim.learning_rate?'],
    ),
    (
        'missing_key_is_reported',
        {'training.seed': _DELETE},
        ['config.training.seed: missing'],
    ),
    (
        'missing_section_is_reported',
        {'eval': _DELETE},
        ['config.eval: missing section'],
    ),
    (
        'section_replaced_by_a_value_is_reported',
        {'model': 'ddpm_unet'},
        ['config.model: must be a section (ConfigDict), got str'],
    ),
    (
        'quoted_int_is_not_an_int',
        {'training.batch_size': '128'},
        ['config.training.batch_size: must be an int, got str', 'write 128 without quotes'],
    ),
    (
        'bool_given_for_an_int_is_rejected',
        {'model.num_res_blocks': True},
        ['config.model.num_res_blocks: must be an int, got bool True'],
    ),
    (
        'float_given_for_an_int_is_rejected',
        {'training.batch_size': 128.0},
        ['config.training.batch_size: must be an int, got float 128.0'],
    ),
    (
        'none_is_only_allowed_for_placeholders',
        {'model.ch': None},
        ['config.model.ch: is None but must be an int'],
    ),
    (
        'ch_mult_of_non_ints_is_rejected',
        {'model.ch_mult': (1, 2.5)},
        ['config.model.ch_mult: must be a tuple of ints'],
    ),
    (
        'image_size_must_be_divisible_by_the_downsampling_factor',
        {'data.image_size': 30},
        ['config.data.image_size: 30 is not divisible by 8', '24 or 32', 'at most 2 levels'],
    ),
    (
        'attention_resolution_must_occur_in_the_unet',
        {'model.attn_resolutions': (12,)},
        [
            'config.model.attn_resolutions: resolution 12 never occurs; '
            'the U-Net sees [32, 16, 8, 4] (choose from those)'
        ],
    ),
    (
        'channels_must_split_into_groupnorm_groups',
        {'model.ch': 48},
        ['config.model.num_groups: GroupNorm(32) cannot split the channel counts [48]', 'to 24'],
    ),
    (
        'heads_must_split_the_attention_channels',
        {'model.num_heads': 3},
        ["config.model.num_heads: 3 heads cannot split the attention blocks' channels [256]"],
    ),
    (
        'head_channels_must_divide_every_attention_block',
        {'model.ch_mult': (1, 3), 'model.attn_resolutions': (32,), 'model.num_head_channels': 96},
        [
            'config.model.num_head_channels: 96 does not divide '
            "the attention blocks' channel counts [128]"
        ],
    ),
    (
        'unknown_time_embedding_names_the_choices',
        {'model.time_embedding': 'tf'},
        ["config.model.time_embedding: unknown value 'tf'", "['ddpm', 'iddpm']"],
    ),
    (
        'unknown_upsample_impl_names_the_choices',
        {'model.upsample_impl': 'bilinear'},
        [
            "config.model.upsample_impl: unknown value 'bilinear'",
            "['auto', 'repeat', 'subpixel']",
        ],
    ),
    (
        'unknown_nin_impl_names_the_choices',
        {'model.nin_impl': 'einsum'},
        ["config.model.nin_impl: unknown value 'einsum'", "['auto', 'conv', 'dense']"],
    ),
    (
        'unknown_conv_vjp_names_the_choices',
        {'model.conv_vjp': 'nchw'},
        ["config.model.conv_vjp: unknown value 'nchw'", "['auto', 'jax', 'nhwc']"],
    ),
    (
        'norm_epsilon_must_be_positive',
        {'model.norm_epsilon': 0.0},
        ['config.model.norm_epsilon: must be in (0, 1), got 0.0'],
    ),
    (
        'ch_mult_must_not_be_empty',
        {'model.ch_mult': ()},
        ['config.model.ch_mult: must not be empty'],
    ),
    (
        'ch_mult_entries_must_be_positive',
        {'model.ch_mult': (1, 0, 2)},
        ['config.model.ch_mult: entries must be positive'],
    ),
    (
        'dropout_of_one_is_out_of_range',
        {'model.dropout': 1.0},
        ['config.model.dropout: must be in [0, 1), got 1.0'],
    ),
    (
        'unknown_beta_schedule_names_the_choices',
        {'diffusion.beta_schedule': 'sigmoid'},
        [
            "config.diffusion.beta_schedule: unknown value 'sigmoid'",
            "choose one of ['const', 'cosine', 'jsd', 'linear', 'linear_iddpm', 'quad']",
        ],
    ),
    (
        'misspelt_enum_value_suggests_the_closest_choice',
        {'model.dtype': 'bfloat'},
        ["config.model.dtype: unknown value 'bfloat'", "did you mean 'bfloat16'?"],
    ),
    (
        'linear_betas_must_not_decrease',
        {'diffusion.beta_start': 0.05},
        ['config.diffusion.beta_start: 0.05 exceeds diffusion.beta_end 0.02'],
    ),
    (
        'beta_end_must_be_below_one',
        {'diffusion.beta_end': 1.0},
        ['config.diffusion.beta_end: must be < 1, got 1.0'],
    ),
    (
        'mse_cannot_train_a_learned_variance',
        {'diffusion.model_var_type': 'learned'},
        ["config.diffusion.loss_type: 'mse' never trains diffusion.model_var_type 'learned'"],
    ),
    (
        'hybrid_loss_needs_a_learned_variance',
        {'diffusion.loss_type': 'hybrid'},
        ["config.diffusion.loss_type: 'hybrid' trains a learned variance", "is 'fixedlarge'"],
    ),
    (
        'ema_decay_of_one_is_out_of_range',
        {'optim.ema_decay': 1.0},
        ['config.optim.ema_decay: must be in [0, 1), got 1.0'],
    ),
    (
        'learning_rate_must_be_positive',
        {'optim.learning_rate': 0.0},
        ['config.optim.learning_rate: must be positive, got 0.0'],
    ),
    (
        'weight_decay_needs_adamw',
        {'optim.weight_decay': 1e-4},
        ["config.optim.weight_decay: 0.0001 needs optimizer 'adamw'"],
    ),
    (
        'sampling_steps_cannot_exceed_the_diffusion_steps',
        {'sampling.num_steps': 2000},
        ['config.sampling.num_steps: 2000 exceeds diffusion.num_timesteps 1000'],
    ),
    (
        'num_samples_must_be_positive',
        {'sampling.num_samples': 0},
        ['config.sampling.num_samples: must be positive, got 0'],
    ),
    (
        'nan_eta_is_rejected',
        {'sampling.eta': float('nan')},
        ['config.sampling.eta: must be >= 0, got nan'],
    ),
    (
        'folder_dataset_needs_a_path',
        {'data.dataset': 'folder'},
        ["config.data.path: is not set, but data.dataset 'folder' reads from it"],
    ),
    (
        'npz_dataset_with_an_empty_path_is_rejected',
        {'data.dataset': 'npz', 'data.path': ''},
        ["config.data.path: is not set, but data.dataset 'npz' reads from it"],
    ),
    (
        'dataset_name_must_not_be_empty',
        {'data.dataset': ' '},
        ['config.data.dataset: must not be empty'],
    ),
    (
        'num_bpd_images_must_be_positive_when_set',
        {'eval.num_bpd_images': 0},
        ['config.eval.num_bpd_images: must be positive, got 0'],
    ),
)


class ShippedConfigTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ('_cifar10', cifar10),
        ('_celeba_hq', celeba_hq),
        ('_lsun_church', lsun_church),
        ('_digits', digits),
    )
    def test_shipped_config_is_valid(self, module):
        config_lib.validate(module.get_config())

    @parameterized.parameters('cifar10', 'celeba_hq', 'lsun_church', 'digits')
    def test_shipped_config_file_loads_locked_and_valid(self, name):
        config = config_lib.load_config_file(os.path.join(_REPO, 'configs', f'{name}.py'))
        config_lib.validate(config)
        with self.assertRaises(AttributeError):  # locked, as DEFINE_config_file(lock_config=True)
            config.training.batchsize = 1

    def test_schema_covers_exactly_the_fields_of_the_cifar10_config(self):
        self.assertCountEqual(config_lib.SCHEMA, _flat_cifar10())

    def test_nullable_fields_are_exactly_the_placeholders(self):
        nullable = {key for key, field in config_lib.SCHEMA.items() if field.nullable}
        self.assertEqual(nullable, {key for key, v in _flat_cifar10().items() if v is None})

    def test_every_beta_schedule_the_schema_accepts_builds_valid_betas(self):
        for name in config_lib.SCHEMA['diffusion.beta_schedule'].choices:
            # T=100: linear_iddpm scales 0.02 by 1000 / T, and T <= 20 is refused for it.
            betas = schedules.get_beta_schedule(name, 100)
            self.assertEqual(betas.shape, (100,), name)
            self.assertTrue(np.all((betas > 0) & (betas <= 1)), name)


class BadConfigTest(parameterized.TestCase):
    @parameterized.named_parameters(
        (f'_{name}', overrides, expected) for name, overrides, expected in _BAD_CONFIGS
    )
    def test(self, overrides, expected):
        with self.assertRaises(config_lib.ConfigError) as raised:
            config_lib.validate(_config_with(overrides))
        message = str(raised.exception)
        for substring in expected:
            self.assertIn(substring, message)
        for line in message.splitlines():
            self.assertRegex(line, _PROBLEM_LINE)

    def test_every_problem_is_listed_in_one_error(self):
        overrides = {
            'training.batchsize': 64,
            'data.num_channels': '3',
            'model.dropout': -0.1,
            'diffusion.model_var_type': 'learned_range',
            'sampling.num_samples': 0,
        }
        with self.assertRaises(config_lib.ConfigError) as raised:
            config_lib.validate(_config_with(overrides))
        keys = [line.split(':')[0] for line in str(raised.exception).splitlines()]
        expected = [
            'config.training.batchsize',
            'config.data.num_channels',
            'config.model.dropout',
            'config.diffusion.loss_type',  # learned_range under 'mse'
            'config.sampling.num_samples',
        ]
        self.assertCountEqual(keys, expected)

    def test_a_key_with_a_bad_type_is_left_out_of_the_combined_checks(self):
        # '30' is reported as a str only, not also as an image size the U-Net cannot halve.
        with self.assertRaises(config_lib.ConfigError) as raised:
            config_lib.validate(_config_with({'data.image_size': '30'}))
        self.assertEqual(
            str(raised.exception),
            "config.data.image_size: must be an int, got str '30' (write 30 without quotes)",
        )

    def test_a_non_config_is_rejected(self):
        with self.assertRaisesRegex(config_lib.ConfigError, 'must be an ml_collections.ConfigDict'):
            config_lib.validate({'data': {}})


class GoodConfigTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ('_int_for_a_float', {'optim.learning_rate': 1}),
        ('_list_for_a_tuple', {'model.ch_mult': [1, 2, 2, 2], 'model.attn_resolutions': []}),
        ('_num_steps_equal_to_t', {'sampling.num_steps': 1000, 'sampling.sampler': 'ddim'}),
        ('_folder_dataset_with_a_path', {'data.dataset': 'folder', 'data.path': '/data/imgs'}),
        (
            '_cosine_schedule_ignoring_beta_endpoints',
            {'diffusion.beta_schedule': 'cosine', 'diffusion.beta_start': 0.0},
        ),
        (
            '_hybrid_loss_with_a_learned_range',
            {'diffusion.loss_type': 'hybrid', 'diffusion.model_var_type': 'learned_range'},
        ),
        ('_weight_decay_with_adamw', {'optim.weight_decay': 1e-4, 'optim.optimizer': 'adamw'}),
        ('_zero_grad_clip_disabling_clipping', {'optim.grad_clip': 0.0}),
    )
    def test_valid_variation_is_accepted(self, overrides):
        config_lib.validate(_config_with(overrides))


class LoadConfigFileTest(absltest.TestCase):
    def _write(self, name: str, content: str) -> str:
        # tempfile, not create_tempfile: absl's test flags are unparsed under pytest.
        path = os.path.join(self.enter_context(tempfile.TemporaryDirectory()), name)
        with open(path, 'w') as f:
            f.write(content)
        return path

    def test_missing_file_gives_a_one_line_message(self):
        path = os.path.join(self.enter_context(tempfile.TemporaryDirectory()), 'nope.py')
        with self.assertRaises(config_lib.ConfigError) as raised:
            config_lib.load_config_file(path)
        self.assertEqual(
            str(raised.exception),
            f'config file {path!r} does not exist (pass e.g. configs/cifar10.py)',
        )

    def test_file_without_get_config_is_rejected(self):
        path = self._write('no_get_config.py', 'CONFIG = 1\n')
        with self.assertRaisesRegex(config_lib.ConfigError, r'has no get_config\(\)'):
            config_lib.load_config_file(path)

    def test_file_that_raises_names_the_file_and_the_error(self):
        content = 'def get_config():\n    raise KeyError("oops")\n'
        path = self._write('broken.py', content)
        with self.assertRaises(config_lib.ConfigError) as raised:
            config_lib.load_config_file(path)
        self.assertIn(f'config file {path!r} failed to load: KeyError', str(raised.exception))
        self.assertIsInstance(raised.exception.__cause__, KeyError)

    def test_get_config_must_return_a_config_dict(self):
        content = 'def get_config():\n    return {"data": {}}\n'
        path = self._write('plain_dict.py', content)
        with self.assertRaisesRegex(config_lib.ConfigError, 'returned dict, not a ConfigDict'):
            config_lib.load_config_file(path)

    def test_importing_config_lib_does_not_import_jax_or_tensorflow(self):
        code = (
            'import sys; import diffusion_jax.config_lib; '
            "print(sorted(m for m in ('jax', 'tensorflow', 'flax') if m in sys.modules))"
        )
        result = subprocess.run(
            [sys.executable, '-c', code], cwd=_REPO, capture_output=True, text=True, check=True
        )
        self.assertEqual(result.stdout.strip(), '[]')


class ScheduleWarningTest(absltest.TestCase):
    def test_a_schedule_that_leaves_signal_in_x_t_is_warned_about(self):
        config = digits.get_config()
        config.diffusion.beta_schedule = 'linear'  # T=250: sqrt(alpha_bar_T) = 0.28
        with self.assertLogs(level='WARNING') as logs:
            config_lib.validate(config)
        self.assertRegex('\n'.join(logs.output), r"'linear' schedule with T=250 leaves .* 0\.282")
        for schedule in ('linear_iddpm', 'cosine'):
            config.diffusion.beta_schedule = schedule
            with self.assertNoLogs(level='WARNING'):
                config_lib.validate(config)

    def test_linear_iddpm_with_too_few_steps_is_refused(self):
        config = digits.get_config()
        config.diffusion.beta_schedule = 'linear_iddpm'
        config.diffusion.num_timesteps = 20  # 0.02 * 1000 / 20 = 1: a beta of 1 at the end
        with self.assertRaisesRegex(config_lib.ConfigError, r'beta_end.*T > 20'):
            config_lib.validate(config)


class LaterWeightKeyTest(absltest.TestCase):
    def test_a_checkpoint_from_before_rescale_timesteps_resumes_and_samples_as_trained(self):
        config = digits.get_config()
        stored = config.to_dict()
        del stored['model']['rescale_timesteps']  # as written before the key existed
        self.assertEqual(config_lib.weight_changes(stored, config), [])
        config.model.rescale_timesteps = True
        self.assertEqual(
            config_lib.weight_changes(stored, config),
            ['config.model.rescale_timesteps: checkpoint False, now True'],
        )
        merged = config_lib.with_checkpoint_weights(stored, config)
        self.assertFalse(merged.model.rescale_timesteps)  # the weights' meaning, not the flag's


if __name__ == '__main__':
    absltest.main()
