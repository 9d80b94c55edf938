"""benchmarks/gpu_compile.py's reading of a compiled program's library calls."""

from unittest import mock

from absl.testing import absltest

from benchmarks import gpu_compile


class LibraryCallsTest(absltest.TestCase):
    def test_custom_call_targets_are_counted(self):
        hlo = '\n'.join([
            '%a = f32[2] custom-call(f32[2] %x), custom_call_target="__cudnn$convForward"',
            '%b = f32[2] custom-call(f32[2] %a), custom_call_target="__cudnn$convForward", x=1',
            '%c = (bf16[2], u8[0]) custom-call(%q, %k), custom_call_target="__cudnn$fmhaSoftmax"',
            '%d = f32[2] add(f32[2] %b, f32[2] %c)',
        ])  # fmt: skip
        self.assertEqual(
            gpu_compile.library_calls(hlo),
            {'__cudnn$convForward': 2, '__cudnn$fmhaSoftmax': 1},
        )
        self.assertEqual(gpu_compile.library_calls('%d = f32[2] add(%a, %b)'), {})


class CudnnChecksTest(absltest.TestCase):
    def test_the_checks_answer_for_the_device_then_as_before(self):
        from jax._src.cudnn import fused_attention_stablehlo as fused

        before = (fused.check_compute_capability, fused.is_cuda_compute_capability_equal)
        with gpu_compile.cudnn_checks_for(mock.Mock(compute_capability='9.0')):
            self.assertTrue(fused.check_compute_capability('9.0'))
            self.assertTrue(fused.check_compute_capability('8.0'))
            self.assertFalse(fused.check_compute_capability('10.0'))
            self.assertTrue(fused.is_cuda_compute_capability_equal('9.0'))
            self.assertFalse(fused.is_cuda_compute_capability_equal('10.3'))
        after = (fused.check_compute_capability, fused.is_cuda_compute_capability_equal)
        self.assertEqual(after, before)


if __name__ == '__main__':
    absltest.main()
