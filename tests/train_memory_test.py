"""benchmarks/train_memory.py: the remat residual count and the GPU targets it compiles for."""

import re

from absl.testing import absltest

from benchmarks import train_memory
from diffusion_jax import xla_cpu
from tests import fast_compile


class TrainMemoryTest(absltest.TestCase):
    def test_remat_keeps_a_fraction_of_the_residuals(self):
        # Tracing only: what JAX saves for the backward pass of the digits U-Net at batch 16.
        plain = train_memory.residual_bytes('digits', 16, remat=False)
        remat = train_memory.residual_bytes('digits', 16, remat=True)
        self.assertGreater(plain, 0)
        self.assertLess(remat, 0.25 * plain)

    def test_the_gpu_targets_describe_the_lent_gpus(self):
        self.assertEqual(train_memory.TARGETS, ('h100', 'h200'))
        memory = {'h100': 81_559, 'h200': 143_771}  # MiB, as nvidia-smi reported them
        for name in train_memory.TARGETS:
            text = (train_memory.TARGETS_DIR / f'{name}.txtpb').read_text()
            self.assertIn(f'device_memory_size: {memory[name] * 2**20}', text)
            self.assertRegex(text, r'cuda_compute_capability \{ major: 9 minor: 0 \}')
            self.assertEqual(len(re.findall(r'^platform_name: "CUDA"$', text, re.M)), 1)

    def test_a_gpu_target_compiles_without_a_gpu(self):
        if not xla_cpu.accelerator_plugin_installed():
            self.skipTest("needs jaxlib's CUDA plugin (pip install -e '.[cuda13]'), not a GPU")
        # A fresh process: JAX must not have started the CUDA plugin (it fails without a GPU).
        code = (
            'import jax; from benchmarks import train_memory; '
            "print(train_memory.target_devices('h100')[0].device_kind, jax.default_backend())"
        )
        lines = fast_compile.run_python(code).splitlines()
        self.assertEqual(lines[-1], 'NVIDIA H100 80GB HBM3 cpu')


if __name__ == '__main__':
    absltest.main()
