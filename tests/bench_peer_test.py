"""Tests of the benchmark helpers that need no torch: the peer's config, peaks and MFU."""

from absl.testing import absltest, parameterized

from benchmarks import peaks, peer_config, suites
from diffusion_jax import convert
from diffusion_jax.models import layers

# The first processor of a 2-core AMD EPYC (Zen 4) VM's /proc/cpuinfo, trimmed.
_CPUINFO = """processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model name	: AMD EPYC
cpu MHz		: 2596.146
flags		: fpu sse sse2 fma avx avx2 avx512f avx512bw

processor	: 1
vendor_id	: AuthenticAMD
cpu MHz		: 9999.0
"""


class PeerConfigTest(parameterized.TestCase):
    @parameterized.named_parameters(('digits', 'cpu'), ('cifar10', 'gpu'))
    def test_peer_kwargs_convert_back_to_our_model_config(self, suite):
        config = suites.get_config(suite)
        derived = convert.config_from_diffusers(peer_config.unet2d_kwargs(config))
        self.assertEqual(derived.model.to_dict(), config.model.to_dict())
        self.assertEqual(derived.data.image_size, config.data.image_size)
        self.assertEqual(derived.data.num_channels, config.data.num_channels)

    def test_peer_group_norm_epsilon_is_ours(self):
        self.assertEqual(peer_config.GROUP_NORM_EPSILON, layers.GROUP_NORM_EPSILON)

    def test_learned_variance_doubles_the_output_channels(self):
        config = suites.get_config('cpu')
        config.diffusion.model_var_type = 'learned_range'
        self.assertEqual(peer_config.unet2d_kwargs(config)['out_channels'], 2)


class PeaksTest(parameterized.TestCase):
    def test_cpu_estimate_is_cores_times_clock_times_flops_per_cycle(self):
        tflops, note = peaks.cpu_peak_estimate(_CPUINFO, num_cores=2)
        # Zen 4 runs 512-bit FMAs on two 256-bit pipes: 2 x 2 x 8 = 32 fp32 FLOP per cycle.
        self.assertAlmostEqual(tflops, 2 * 2.596146e9 * 32 / 1e12, places=9)
        self.assertIn('estimate', note)

    def test_cpu_estimate_needs_fma(self):
        self.assertIsNone(peaks.cpu_peak_estimate(_CPUINFO.replace(' fma', ''), num_cores=2))

    @parameterized.named_parameters(
        ('h100_fp32_is_tf32', 'NVIDIA H100 80GB HBM3', 'gpu', 'float32', 494.7),
        ('h100_bf16', 'NVIDIA H100 80GB HBM3', 'gpu', 'bfloat16', 989.4),
        ('h100_pcie_bf16', 'NVIDIA H100 PCIe', 'gpu', 'bfloat16', 756.0),
        ('tpu_v3_fp32_is_bf16', 'TPU v3', 'tpu', 'float32', 61.5),
    )
    def test_device_peak_from_the_table(self, kind, platform, dtype, tflops):
        self.assertAlmostEqual(peaks.device_peak(kind, platform, dtype)['tflops'], tflops)

    def test_unknown_device_has_no_peak_unless_overridden(self):
        self.assertIsNone(peaks.device_peak('Some GPU', 'gpu', 'float32'))
        peak = peaks.device_peak('Some GPU', 'gpu', 'float32', 2, override_tflops=100.0)
        self.assertEqual((peak['tflops'], peak['source']), (200.0, '--peak_tflops'))

    def test_mfu_is_flops_over_seconds_over_peak(self):
        peak = {'tflops': 2.0}
        self.assertAlmostEqual(peaks.mfu(1e12, 2.0, peak), 0.25)
        self.assertIsNone(peaks.mfu(None, 2.0, peak))


if __name__ == '__main__':
    absltest.main()
