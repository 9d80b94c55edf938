"""The TF-free TensorBoard writer: its files read back with tensorboard's own event reader."""

import io
import os
import tempfile

import numpy as np
from absl.testing import absltest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from diffusion_jax import summary


def _read(logdir: str) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(logdir, size_guidance={'images': 0, 'scalars': 0})
    acc.Reload()
    return acc


class SummaryWriterTest(absltest.TestCase):
    def setUp(self):
        super().setUp()
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.logdir = os.path.join(tmp.name, 'run')

    def test_scalars_read_back_by_tensorboard(self):
        with summary.SummaryWriter(self.logdir) as writer:
            writer.write_scalars(10, {'loss': 0.5, 'lr': np.float32(2e-4)})
            writer.write_scalars(20, {'loss': 0.25})
        acc = _read(self.logdir)
        self.assertCountEqual(acc.Tags()['scalars'], ['loss', 'lr'])
        self.assertEqual([(e.step, e.value) for e in acc.Scalars('loss')], [(10, 0.5), (20, 0.25)])
        self.assertAlmostEqual(acc.Scalars('lr')[0].value, 2e-4, places=9)

    def test_each_write_is_on_disk_before_close(self):
        writer = summary.SummaryWriter(self.logdir)
        writer.write_scalars(1, {'loss': 1.0})
        self.assertEqual([e.step for e in _read(self.logdir).Scalars('loss')], [1])
        writer.close()
        writer.close()  # a second close is a no-op

    def test_images_round_trip_as_png(self):
        rng = np.random.default_rng(0)
        grey = rng.integers(0, 256, (1, 5, 7, 1), dtype=np.uint8)
        rgb = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
        with summary.SummaryWriter(self.logdir) as writer:
            writer.write_images(3, {'grid': grey, 'pair': rgb})
        acc = _read(self.logdir)
        self.assertCountEqual(acc.Tags()['images'], ['grid', 'pair/image/0', 'pair/image/1'])
        event = acc.Images('grid')[0]
        self.assertEqual((event.step, event.height, event.width), (3, 5, 7))
        decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))
        np.testing.assert_array_equal(decoded, grey[0, ..., 0])
        decoded = np.asarray(
            Image.open(io.BytesIO(acc.Images('pair/image/1')[0].encoded_image_string))
        )
        np.testing.assert_array_equal(decoded, rgb[1])

    def test_bad_images_are_refused(self):
        with summary.SummaryWriter(self.logdir) as writer:
            with self.assertRaisesRegex(ValueError, 'uint8'):
                writer.write_images(0, {'x': np.zeros((1, 4, 4, 3), np.float32)})
            with self.assertRaisesRegex(ValueError, r'\[N, H, W, C\]'):
                writer.write_images(0, {'x': np.zeros((4, 4, 3), np.uint8)})


if __name__ == '__main__':
    absltest.main()
