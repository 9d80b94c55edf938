"""Respacing: which timesteps a shortened chain keeps, against Improved DDPM's rule written out
as a running index, and the differences from our evenly spaced rule that the issue names."""

import numpy as np
from absl.testing import absltest, parameterized

from diffusion_jax import config_lib, spacing
from diffusion_jax.configs import cifar10


def running_index_reference(num_timesteps: int, counts: list[int]) -> list[int]:
    """Improved DDPM's `space_timesteps` as the paper's code states it: a float index that
    advances by the section's fractional stride, rounded with Python's round at each step."""
    out, start = [], 0
    for i, count in enumerate(counts):
        size = num_timesteps // len(counts) + (1 if i < num_timesteps % len(counts) else 0)
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        index = 0.0
        for _ in range(count):
            out.append(start + round(index))
            index += stride
        start += size
    return sorted(set(out))


class IddpmRuleTest(parameterized.TestCase):
    @parameterized.parameters(
        (50, [25]), (1000, [999]), (1000, [50]), (4000, [100]), (300, [10, 15, 20]),
        (1000, [7, 13, 250]), (250, [3, 1, 40, 2]), (101, [17, 17]), (4000, [1000, 250, 4]),
    )  # fmt: skip
    def test_sections_keep_what_a_running_index_keeps(self, num_timesteps, counts):
        got = spacing.kept_timesteps(num_timesteps, ','.join(map(str, counts)))
        np.testing.assert_array_equal(got, running_index_reference(num_timesteps, counts))
        np.testing.assert_array_equal(spacing.kept_timesteps(num_timesteps, tuple(counts)), got)
        self.assertEqual(got.dtype, np.int32)

    def test_the_ties_the_issue_names(self):
        iddpm, even = spacing.kept_timesteps(50, 25, 'iddpm'), spacing.kept_timesteps(50, 25)
        self.assertIn(25, iddpm)
        self.assertNotIn(24, iddpm)
        self.assertIn(24, even)
        self.assertNotIn(25, even)
        iddpm, even = spacing.kept_timesteps(1000, 999, 'iddpm'), spacing.kept_timesteps(1000, 999)
        self.assertIn(499, iddpm)
        self.assertNotIn(500, iddpm)
        self.assertNotIn(499, even)
        self.assertIn(500, even)
        as_string = spacing.kept_timesteps(50, '25')  # a string is always Improved DDPM's rule
        np.testing.assert_array_equal(as_string, spacing.kept_timesteps(50, 25, 'iddpm'))

    def test_even_is_rounded_linspace_from_0_to_t_minus_1(self):
        got = spacing.kept_timesteps(250, 50)
        want = [int(np.floor(k * 249 / 49 + 0.5)) for k in range(50)]
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(spacing.kept_timesteps(7, None), np.arange(7))

    def test_ddim_uses_the_smallest_integer_stride_that_gives_the_count(self):
        np.testing.assert_array_equal(
            spacing.kept_timesteps(1000, 'ddim50'), np.arange(0, 1000, 20)
        )
        np.testing.assert_array_equal(spacing.kept_timesteps(20, 'ddim7'), np.arange(0, 20, 3))
        with self.assertRaisesRegex(ValueError, 'no integer stride gives exactly 999'):
            spacing.kept_timesteps(1000, 'ddim999')

    @parameterized.parameters(
        (10, '5,6', 'fewer than the 6'), (10, 'ten', 'not a respacing'), (10, 11, r'\[1, 10\]'),
        (10, (3, 0), 'must be positive'), (10, True, 'must be an int'),
    )  # fmt: skip
    def test_impossible_respacings_are_refused(self, num_timesteps, num_steps, message):
        with self.assertRaisesRegex(ValueError, message):
            spacing.kept_timesteps(num_timesteps, num_steps)


class ConfigTest(absltest.TestCase):
    def test_every_form_validates_against_t_and_bad_ones_name_the_key(self):
        config = cifar10.get_config()
        for steps in (None, 50, 'ddim50', '10,15,20', (10, 15, 20)):
            config.sampling.num_steps = steps
            config_lib.validate(config)
        config.sampling.num_steps = '600,600'
        config.eval.bpd_num_steps = 'ddim999'
        with self.assertRaises(config_lib.ConfigError) as caught:
            config_lib.validate(config)
        lines = str(caught.exception).splitlines()
        self.assertLen(lines, 2)
        self.assertIn("config.sampling.num_steps: '600,600': section 0", lines[0])
        self.assertIn("config.eval.bpd_num_steps: 'ddim999'", lines[1])

    def test_a_float_is_refused_by_type(self):
        config = cifar10.get_config()
        config.sampling.num_steps = 2.5
        with self.assertRaisesRegex(config_lib.ConfigError, r"num_steps: must be an int, 'ddimN'"):
            config_lib.validate(config)


if __name__ == '__main__':
    absltest.main()
