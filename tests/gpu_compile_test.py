"""benchmarks/gpu_compile.py's reading of a compiled program's library calls."""

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


if __name__ == '__main__':
    absltest.main()
