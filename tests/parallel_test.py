"""Mesh helpers: batch-size checks and prefetching keep the data order."""

import jax
import numpy as np
from absl.testing import absltest, parameterized

from diffusion_jax import parallel


class ParallelTest(parameterized.TestCase):
    def test_a_batch_that_does_not_divide_names_the_nearest_sizes(self):
        parallel.check_batch_size(64, 8, 'config.training.batch_size')
        with self.assertRaisesRegex(parallel.BatchSizeError, r'=12 does not divide.*8 or 16'):
            parallel.check_batch_size(12, 8, 'config.training.batch_size')
        with self.assertRaisesRegex(parallel.BatchSizeError, r'e\.g\. 8 \('):
            parallel.check_batch_size(3, 8, 'config.training.batch_size')

    def test_prefetch_yields_every_batch_in_order_as_global_arrays(self):
        mesh = parallel.create_mesh()
        local = [{'image': np.full((2, 1), i, np.float32)} for i in range(5)]
        got = list(parallel.prefetch_to_mesh(iter(local), mesh, size=2))
        self.assertLen(got, 5)
        for i, batch in enumerate(got):
            self.assertIsInstance(batch['image'], jax.Array)
            np.testing.assert_array_equal(batch['image'], local[i]['image'])
            self.assertEqual(batch['image'].sharding, parallel.batch_sharding(mesh))


if __name__ == '__main__':
    absltest.main()
