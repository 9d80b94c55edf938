"""Mesh helpers: batch-size checks and prefetching keep the data order."""

import pathlib
import re
import sys
from unittest import mock

import jax
import numpy as np
from absl import flags
from absl.testing import absltest, parameterized

from diffusion_jax import main, parallel

REPO = pathlib.Path(__file__).resolve().parents[1]


class ParallelTest(parameterized.TestCase):
    def test_a_batch_that_does_not_divide_names_the_nearest_sizes(self):
        parallel.check_batch_size(64, 8, 'config.training.batch_size')
        with self.assertRaisesRegex(parallel.BatchSizeError, r'=12 does not divide.*8 or 16'):
            parallel.check_batch_size(12, 8, 'config.training.batch_size')
        with self.assertRaisesRegex(parallel.BatchSizeError, r'e\.g\. 8 \('):
            parallel.check_batch_size(3, 8, 'config.training.batch_size')

    @parameterized.parameters((12, 16), (9, 8), (15, 16), (3, 8))
    def test_the_message_ends_with_the_flag_for_the_nearest_size(self, batch_size, nearest):
        with self.assertRaisesRegex(
            parallel.BatchSizeError, rf'\(--config\.training\.batch_size={nearest}\)$'
        ):
            parallel.check_batch_size(batch_size, 8, 'config.training.batch_size')

    def test_the_flag_in_the_message_is_one_that_main_accepts(self):
        with self.assertRaises(parallel.BatchSizeError) as caught:
            parallel.check_batch_size(12, 8, 'config.training.batch_size')
        flag, size = re.fullmatch(r'.*\((--\S+=(\d+))\)', str(caught.exception)).groups()
        # main's own parser takes it and sets the batch size. ml_collections reads the
        # --config.* overrides from sys.argv (as `app.run` leaves it) and defines a flag for
        # each; the cleanup removes those and leaves the flags unparsed, as they were.
        before = set(flags.FLAGS)

        def restore():
            flags.FLAGS.unparse_flags()
            for name in set(flags.FLAGS) - before:
                delattr(flags.FLAGS, name)

        self.addCleanup(restore)
        argv = ['main', f'--config={REPO / "configs" / "digits.py"}', '--workdir=/unused', flag]
        with mock.patch.object(sys, 'argv', argv):
            main.parse_flags(argv)
        self.assertEqual(main._CONFIG.value.training.batch_size, int(size))
        self.assertEqual(int(size) % 8, 0)

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
