"""Input pipeline: [-1, 1] scaling, exact resume, per-host slices, flips, sources and bad data.

Expected values come from the raw data (scikit-learn's digits, fixtures written here), never from
the pipeline itself. tfds paths run offline under `tfds.testing.mock_data`.
"""

import functools
import io
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from unittest import mock

import ml_collections
import numpy as np
import pytest
from absl.testing import absltest, parameterized
from PIL import Image
from sklearn import datasets

from diffusion_jax import input_pipeline, tfds_data


def make_data_config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        {
            'dataset': 'digits',
            'data_dir': None,
            'path': None,
            'image_size': 8,
            'num_channels': 1,
            'random_flip': False,
            'loader': 'auto',
            'train_split': 'train',
            'eval_split': 'test',
        }
    )
    config.update(overrides)
    return config


def make_tempdir(test: absltest.TestCase) -> str:
    # tempfile, not create_tempdir: absl's test flags are unparsed under pytest.
    return test.enter_context(tempfile.TemporaryDirectory())


def take(iterator, n: int) -> list[np.ndarray]:
    return [next(iterator)['image'] for _ in range(n)]


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Inverts x = u / 127.5 - 1 for float32 batches (exact to far below half a level)."""
    return np.round((x + 1.0) * 127.5).astype(np.uint8)


class DigitsTest(absltest.TestCase):
    def test_batches_are_nhwc_float32_in_minus1_1(self):
        (batch,) = take(
            input_pipeline.train_iterator(make_data_config(), global_batch_size=64, seed=0), 1
        )
        self.assertEqual(batch.shape, (64, 8, 8, 1))
        self.assertEqual(batch.dtype, np.float32)
        self.assertGreaterEqual(batch.min(), -1.0)
        self.assertLessEqual(batch.max(), 1.0)

    def test_levels_0_to_16_map_linearly_onto_minus1_1(self):
        raw = datasets.load_digits().images  # [1797, 8, 8] in 0..16
        test = np.concatenate(
            [b['image'] for b in input_pipeline.eval_iterator(make_data_config(), batch_size=100)]
        )
        # Within half an 8-bit level (plus float32 rounding) of the line 0 -> -1, 16 -> +1.
        half_level = 0.5 / 127.5 + 1e-6
        np.testing.assert_allclose(test[..., 0], raw[-297:] / 8 - 1, rtol=0, atol=half_level)
        u = input_pipeline.load_images(make_data_config(), 'train')
        levels = (np.arange(17) * 255 + 8) // 16  # round-half-up in integers
        self.assertEqual(sorted(np.unique(u)), sorted(np.unique(levels[raw[:-297].astype(int)])))
        np.testing.assert_array_equal(u[..., 0], levels[raw[:-297].astype(int)])

    def test_train_and_test_are_disjoint_and_together_all_1797(self):
        config = make_data_config()
        train = input_pipeline.load_images(config, 'train')
        test = input_pipeline.load_images(config, 'test')
        self.assertEqual((len(train), len(test)), (1500, 297))
        levels = (np.arange(17) * 255 + 8) // 16  # round-half-up in integers
        everything = levels[datasets.load_digits().images.astype(int)][..., None]
        # Train is raw[:1500] and test raw[1500:]: disjoint index sets covering all 1797.
        np.testing.assert_array_equal(np.concatenate([train, test]), everything)

    def test_labels_are_the_digit_each_image_shows(self):
        bunch = datasets.load_digits()
        levels = (np.arange(17) * 255 + 8) // 16
        raw = levels[bunch.images.astype(int)].reshape(len(bunch.images), -1)
        batches = input_pipeline.train_iterator(
            make_data_config(), global_batch_size=64, seed=0, num_classes=10
        )
        for _ in range(3):
            batch = next(batches)
            self.assertEqual(batch['label'].dtype, np.int32)
            for image, label in zip(to_uint8(batch['image']), batch['label'], strict=True):
                same = np.all(raw == image.reshape(-1), axis=1)  # the raw digits it can be
                self.assertIn(label, bunch.target[same])
        (test,) = input_pipeline.eval_iterator(make_data_config(), batch_size=300, num_classes=10)
        np.testing.assert_array_equal(test['label'], bunch.target[-297:])
        (unlabelled,) = input_pipeline.eval_iterator(make_data_config(), batch_size=300)
        self.assertNotIn('label', unlabelled)

    def test_more_digits_than_classes_is_refused_with_the_fix(self):
        with self.assertRaisesRegex(
            input_pipeline.DatasetError, r'labels from 0 to 9, outside .* 0 to 4.*num_classes=10$'
        ):
            input_pipeline.train_iterator(
                make_data_config(), global_batch_size=8, seed=0, num_classes=5
            )

    def test_wrong_image_size_names_the_config_key(self):
        with self.assertRaisesRegex(input_pipeline.DatasetError, r'8x8.*data\.image_size=8'):
            input_pipeline.load_images(make_data_config(image_size=32), 'train')

    def test_importing_the_module_does_not_import_tensorflow(self):
        code = 'import sys, diffusion_jax.input_pipeline; print("tensorflow" in sys.modules)'
        out = subprocess.run(
            [sys.executable, '-c', code], capture_output=True, text=True, check=True
        )
        self.assertEqual(out.stdout.strip(), 'False')


def write_npz(directory: str, name: str, **arrays) -> str:
    path = os.path.join(directory, name)
    np.savez(path, **arrays)
    return path


class StatelessStreamTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        # 50 distinct, left-right asymmetric images; pixel [0, 0] encodes the index.
        rng = np.random.default_rng(0)
        self.raw = rng.integers(0, 256, (50, 4, 4, 1), dtype=np.uint8)
        self.raw[:, 0, 0, 0] = np.arange(50)
        self.raw[:, 0, -1, 0] = 200
        path = write_npz(make_tempdir(self), 'd.npz', images=self.raw)
        self.config = make_data_config(dataset='npz', path=path, image_size=4)

    def indices(self, batch: np.ndarray) -> np.ndarray:
        u = to_uint8(batch)
        flipped = u[:, 0, 0, 0] == 200  # the marker column moved to the left
        return np.where(flipped, u[:, 0, -1, 0], u[:, 0, 0, 0])

    def test_resume_at_step_5_replays_steps_5_to_9_bitwise(self):
        self.config.random_flip = True
        kwargs = {'global_batch_size': 16, 'seed': 3}
        fresh = take(input_pipeline.train_iterator(self.config, **kwargs), 10)[5:]
        resumed = take(input_pipeline.train_iterator(self.config, start_step=5, **kwargs), 5)
        for a, b in zip(fresh, resumed, strict=True):
            np.testing.assert_array_equal(a, b)

    @parameterized.parameters(2, 4)
    def test_process_slices_concatenate_to_the_global_batch(self, process_count):
        self.config.random_flip = True
        global_batches = take(
            input_pipeline.train_iterator(self.config, global_batch_size=16, seed=1), 6
        )
        local = [
            take(
                input_pipeline.train_iterator(
                    self.config,
                    global_batch_size=16,
                    seed=1,
                    process_index=p,
                    process_count=process_count,
                ),
                6,
            )
            for p in range(process_count)
        ]
        for step, expected in enumerate(global_batches):
            parts = [local[p][step] for p in range(process_count)]
            self.assertEqual(parts[0].shape[0], 16 // process_count)
            np.testing.assert_array_equal(np.concatenate(parts), expected)

    def test_batch_size_not_divisible_by_processes_is_refused(self):
        with self.assertRaisesRegex(ValueError, 'training.batch_size=15'):
            input_pipeline.train_iterator(
                self.config, global_batch_size=15, seed=0, process_count=2
            )

    def test_different_seeds_give_different_orders(self):
        a, b = (
            take(input_pipeline.train_iterator(self.config, global_batch_size=10, seed=s), 1)[0]
            for s in (0, 1)
        )
        self.assertFalse(np.array_equal(self.indices(a), self.indices(b)))

    def test_every_epoch_shows_every_image_exactly_once(self):
        # B=15 does not divide N=50: batches straddle epochs; 10 batches = 3 whole epochs.
        batches = take(input_pipeline.train_iterator(self.config, global_batch_size=15, seed=2), 10)
        stream = np.concatenate([self.indices(b) for b in batches])
        for epoch in range(3):
            self.assertEqual(sorted(stream[epoch * 50 : (epoch + 1) * 50]), list(range(50)))
        self.assertFalse(np.array_equal(stream[:50], stream[50:100]))  # reshuffled per epoch

    @parameterized.parameters(True, False)
    def test_flips_mirror_some_images_only_when_enabled(self, random_flip):
        self.config.random_flip = random_flip
        batches = take(input_pipeline.train_iterator(self.config, global_batch_size=50, seed=0), 4)
        num_flipped = 0
        for batch in batches:
            u = to_uint8(batch)
            original = self.raw[self.indices(batch)]
            is_flipped = np.all(u == original[:, :, ::-1], axis=(1, 2, 3))
            is_original = np.all(u == original, axis=(1, 2, 3))
            self.assertTrue(np.all(is_flipped ^ is_original))  # exactly one of the two
            num_flipped += is_flipped.sum()
        if random_flip:
            self.assertBetween(num_flipped / 200, 0.3, 0.7)
        else:
            self.assertEqual(num_flipped, 0)

    @parameterized.parameters(1, 2, 3)
    def test_eval_is_one_ordered_pass_split_over_processes(self, process_count):
        batches = [
            self.indices(b['image'])
            for p in range(process_count)
            for b in input_pipeline.eval_iterator(
                self.config, batch_size=6, process_index=p, process_count=process_count
            )
        ]
        self.assertLessEqual(max(len(b) for b in batches), 6 // process_count)
        np.testing.assert_array_equal(np.concatenate(batches), np.arange(50))

    def test_eval_num_examples_limits_the_total(self):
        batches = [
            b['image']
            for p in range(2)
            for b in input_pipeline.eval_iterator(
                self.config, batch_size=4, process_index=p, process_count=2, num_examples=8
            )
        ]
        self.assertEqual([len(b) for b in batches], [2, 2, 2, 2])


class NpzTest(absltest.TestCase):
    def test_rank3_array_gets_one_channel(self):
        raw = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8)
        path = write_npz(make_tempdir(self), 'g.npz', arr_0=raw)
        images = input_pipeline.load_images(make_data_config(dataset='npz', path=path), 'train')
        np.testing.assert_array_equal(images, raw[..., None])

    def test_array_named_like_the_split_wins(self):
        train, test = np.zeros((2, 8, 8, 1), np.uint8), np.ones((3, 8, 8, 1), np.uint8)
        path = write_npz(make_tempdir(self), 's.npz', train=train, test=test)
        config = make_data_config(dataset='npz', path=path)
        self.assertLen(input_pipeline.load_images(config, 'test'), 3)
        self.assertLen(input_pipeline.load_images(config, 'train'), 2)

    def test_a_labels_array_labels_the_images_and_split_arrays_have_their_own(self):
        images = np.arange(5, dtype=np.uint8)[:, None, None, None] * np.ones((1, 8, 8, 1), np.uint8)
        labels = np.array([3, 1, 4, 1, 5])
        config = make_data_config(dataset='npz', path=write_npz(
            make_tempdir(self), 'l.npz', images=images, labels=labels))  # fmt: skip
        batch = next(input_pipeline.train_iterator(
            config, global_batch_size=5, seed=0, num_classes=6))  # fmt: skip
        np.testing.assert_array_equal(batch['label'], labels[to_uint8(batch['image'])[:, 0, 0, 0]])
        split = make_data_config(dataset='npz', path=write_npz(
            make_tempdir(self), 's.npz', train=images[:2], train_labels=labels[:2],
            test=images[2:], test_labels=labels[2:]))  # fmt: skip
        self.assertEqual(input_pipeline.load_split(split, 'test')[1].tolist(), [4, 1, 5])

    def test_missing_or_malformed_labels_are_refused_in_one_line(self):
        images = np.zeros((4, 8, 8, 1), np.uint8)
        plain = make_data_config(dataset='npz', path=write_npz(make_tempdir(self), 'p.npz',
                                                                images=images))  # fmt: skip
        with self.assertRaisesRegex(
            input_pipeline.DatasetError, r'has no class labels.*num_classes=0\)$'
        ):
            input_pipeline.train_iterator(plain, global_batch_size=4, seed=0, num_classes=3)
        self.assertIsNone(input_pipeline.load_split(plain, 'train')[1])  # fine unconditional
        bad = make_data_config(dataset='npz', path=write_npz(
            make_tempdir(self), 'b.npz', images=images, labels=np.zeros(3, int)))  # fmt: skip
        with self.assertRaisesRegex(
            input_pipeline.DatasetError, r"'labels' must be integers \[4\]"
        ):
            input_pipeline.load_split(bad, 'train')

    def test_wrong_size_names_the_file_shape_and_image_size_key(self):
        path = write_npz(make_tempdir(self), 'm.npz', images=np.zeros((4, 28, 28, 1), np.uint8))
        config = make_data_config(dataset='npz', path=path, image_size=32)
        with self.assertRaisesRegex(
            input_pipeline.DatasetError, r'm\.npz.*28x28.*data\.image_size=32.*image_size=28'
        ):
            input_pipeline.load_images(config, 'train')

    def test_float_images_are_refused_with_the_expected_layout(self):
        path = write_npz(make_tempdir(self), 'f.npz', images=np.zeros((4, 8, 8, 1)))
        config = make_data_config(dataset='npz', path=path)
        with self.assertRaisesRegex(
            input_pipeline.DatasetError, r'float64 \[4, 8, 8, 1\].*uint8 \[N, 8, 8, 1\]'
        ):
            input_pipeline.load_images(config, 'train')

    def test_missing_path_names_the_config_key(self):
        with self.assertRaisesRegex(input_pipeline.DatasetError, r'--config\.data\.path'):
            input_pipeline.load_images(make_data_config(dataset='npz'), 'train')

    def test_a_member_that_is_not_an_array_is_refused_naming_it(self):
        path = os.path.join(make_tempdir(self), 'odd.npz')
        with zipfile.ZipFile(path, 'w') as archive:
            archive.writestr('images.txt', b'not an array')
        config = make_data_config(dataset='npz', path=path)
        with self.assertRaisesRegex(
            input_pipeline.DatasetError, r"odd\.npz.*'images\.txt' is not an array"
        ):
            input_pipeline.load_images(config, 'train')

    def test_a_header_claiming_1e12_images_is_refused_without_allocating(self):
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {'descr': '|u1', 'fortran_order': False, 'shape': (10**12, 8, 8, 1)}
        )
        directory = make_tempdir(self)
        npy = os.path.join(directory, 'huge.npy')
        with open(npy, 'wb') as f:
            f.write(header.getvalue() + bytes(64))
        npz = os.path.join(directory, 'huge.npz')
        with zipfile.ZipFile(npz, 'w') as archive:
            archive.writestr('images.npy', header.getvalue() + bytes(64))
        for path in (npy, npz):
            config = make_data_config(dataset='npz', path=path)
            with self.assertRaisesRegex(
                input_pipeline.DatasetError, r'huge\.np.*claims uint8 \[1000000000000, 8, 8, 1\]'
            ):
                input_pipeline.load_images(config, 'train')


def solid(width: int, height: int, rgb) -> Image.Image:
    return Image.new('RGB', (width, height), rgb)


def png_header_only(width: int, height: int) -> bytes:
    """A grey 8-bit PNG whose header claims width x height, with almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', crc)

    ihdr = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(bytes(100))
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', idat) + chunk(b'IEND', b'')


class FolderTest(absltest.TestCase):
    def setUp(self):
        super().setUp()
        self.root = make_tempdir(self)
        self.config = make_data_config(
            dataset='folder', path=self.root, image_size=8, num_channels=3
        )

    def test_one_subfolder_per_class_in_sorted_order(self):
        for name, value in (('dog', 50), ('cat', 150), ('emu', 250)):
            os.makedirs(os.path.join(self.root, name))
            for i in range(2):
                solid(8, 8, (value, value, value)).save(os.path.join(self.root, name, f'{i}.png'))
        self.assertEqual(input_pipeline.class_names(self.config, 'train'), ['cat', 'dog', 'emu'])
        batch = next(input_pipeline.train_iterator(
            self.config, global_batch_size=6, seed=0, num_classes=3))  # fmt: skip
        want = {150: 0, 50: 1, 250: 2}  # cat, dog, emu
        got = [want[v] for v in to_uint8(batch['image'])[:, 0, 0, 0]]
        np.testing.assert_array_equal(batch['label'], got)

    def test_images_outside_class_subfolders_are_refused_for_a_conditional_model(self):
        os.makedirs(os.path.join(self.root, 'cat'))
        solid(8, 8, (1, 2, 3)).save(os.path.join(self.root, 'cat', 'a.png'))
        solid(8, 8, (1, 2, 3)).save(os.path.join(self.root, 'stray.png'))
        self.assertIsNone(input_pipeline.class_names(self.config, 'train'))
        with self.assertRaisesRegex(input_pipeline.DatasetError, 'one subfolder per class'):
            input_pipeline.train_iterator(self.config, global_batch_size=2, seed=0, num_classes=2)
        self.assertLen(input_pipeline.load_images(self.config, 'train'), 2)  # unconditional

    def test_non_square_image_is_center_cropped(self):
        # 12x8: red 2-column border left, blue right, green centre -> the crop is all green.
        image = solid(12, 8, (0, 255, 0))
        image.paste((255, 0, 0), (0, 0, 2, 8))
        image.paste((0, 0, 255), (10, 0, 12, 8))
        image.save(os.path.join(self.root, 'wide.png'))
        tall = solid(8, 16, (0, 255, 0))  # 8x16: borders top and bottom
        tall.paste((255, 0, 0), (0, 0, 8, 4))
        tall.paste((0, 0, 255), (0, 12, 8, 16))
        tall.save(os.path.join(self.root, 'tall.png'))
        images = input_pipeline.load_images(self.config, 'train')
        self.assertEqual(images.shape, (2, 8, 8, 3))
        np.testing.assert_array_equal(images, np.broadcast_to([0, 255, 0], (2, 8, 8, 3)))

    def test_pngs_and_jpegs_in_subfolders_are_resized_in_sorted_order(self):
        os.makedirs(os.path.join(self.root, 'sub'))
        solid(16, 16, (10, 20, 30)).save(os.path.join(self.root, 'a.png'))
        solid(32, 32, (200, 100, 50)).save(os.path.join(self.root, 'sub', 'b.JPG'), quality=95)
        images = input_pipeline.load_images(self.config, 'train')
        self.assertEqual(images.shape, (2, 8, 8, 3))
        np.testing.assert_array_equal(images[0], np.broadcast_to([10, 20, 30], (8, 8, 3)))
        np.testing.assert_allclose(images[1], np.broadcast_to([200, 100, 50], (8, 8, 3)), atol=3)

    def test_grey_config_reads_one_channel(self):
        Image.new('L', (8, 8), 77).save(os.path.join(self.root, 'g.png'))
        config = make_data_config(dataset='folder', path=self.root)
        np.testing.assert_array_equal(
            input_pipeline.load_images(config, 'train'), np.full((1, 8, 8, 1), 77, np.uint8)
        )

    def test_non_images_and_corrupt_files_are_skipped_with_warnings(self):
        solid(8, 8, (1, 2, 3)).save(os.path.join(self.root, 'ok.png'))
        with open(os.path.join(self.root, 'notes.txt'), 'w') as f:
            f.write('not an image')
        with open(os.path.join(self.root, 'broken.png'), 'wb') as f:
            f.write(b'\x89PNG\r\n\x1a\n garbage')
        with self.assertLogs(level='WARNING') as logs:
            images = input_pipeline.load_images(self.config, 'train')
        self.assertLen(images, 1)
        text = '\n'.join(logs.output)
        self.assertRegex(text, r'skipped 1 non-PNG/JPEG files in ')
        self.assertRegex(text, r'skipped 1 unreadable image files, e\.g\. \S*broken\.png')

    def test_sixteen_bit_grey_pngs_are_scaled_not_clipped(self):
        wide = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040).astype(np.uint16)
        Image.fromarray(wide).save(os.path.join(self.root, 'g16.png'))
        with Image.open(os.path.join(self.root, 'g16.png')) as check:
            self.assertIn(check.mode, ('I;16', 'I'))  # really 16-bit on disk
        want = np.floor(wide / 257.0 + 0.5).astype(np.uint8)  # 65535 -> 255, half-up
        grey = make_data_config(dataset='folder', path=self.root)
        np.testing.assert_array_equal(input_pipeline.load_images(grey, 'train')[0, ..., 0], want)
        rgb = input_pipeline.load_images(self.config, 'train')[0]
        np.testing.assert_array_equal(rgb, np.repeat(want[..., None], 3, axis=-1))

    def test_a_fifo_named_like_an_image_is_skipped_not_opened(self):
        solid(8, 8, (1, 2, 3)).save(os.path.join(self.root, 'ok.png'))
        os.mkfifo(os.path.join(self.root, 'x.png'))  # opening it for reading would block
        signal.signal(signal.SIGALRM, lambda *_: self.fail('the loader blocked on the FIFO'))
        self.addCleanup(signal.signal, signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(60)
        self.addCleanup(signal.alarm, 0)
        with self.assertLogs(level='WARNING') as logs:
            images = input_pipeline.load_images(self.config, 'train')
        self.assertLen(images, 1)
        self.assertRegex('\n'.join(logs.output), r'1 entries that are not regular .*x\.png')

    def test_images_over_pillows_pixel_limit_are_skipped_before_decoding(self):
        solid(8, 8, (1, 2, 3)).save(os.path.join(self.root, 'small.png'))
        solid(16, 16, (4, 5, 6)).save(os.path.join(self.root, 'large.png'))
        # A 20000x20000 header over a few bytes of data: Pillow's own error, above twice the limit.
        with open(os.path.join(self.root, 'bomb.png'), 'wb') as f:
            f.write(png_header_only(20000, 20000))
        with mock.patch.object(Image, 'MAX_IMAGE_PIXELS', 100), self.assertLogs() as logs:
            images = input_pipeline.load_images(self.config, 'train')
        np.testing.assert_array_equal(images, np.broadcast_to([1, 2, 3], (1, 8, 8, 3)))
        text = '\n'.join(logs.output)
        self.assertRegex(text, r'skipped 2 images over .* limit of 100 pixels.*bomb\.png')

    def test_empty_folder_is_refused(self):
        with self.assertRaisesRegex(input_pipeline.DatasetError, 'no PNG/JPEG images found in'):
            input_pipeline.load_images(self.config, 'train')


@functools.cache
def _tiny_indexed_images():
    """The builder class of 'tiny_indexed_images', defined (and registered with tfds) once."""
    import tensorflow_datasets as tfds

    class TinyIndexedImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version('1.0.0')

        def _info(self):
            image = tfds.features.Image(shape=(4, 4, 1))
            label = tfds.features.ClassLabel(num_classes=3)
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({'image': image, 'label': label}),
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {'train': self._generate_examples(40), 'test': self._generate_examples(10)}

        def _generate_examples(self, n):
            for i in range(n):
                image = np.full((4, 4, 1), i, np.uint8)
                image[0, -1] = 200
                yield i, {'image': image, 'label': i % 3}

    return TinyIndexedImages


def prepare_tiny_tfds_dataset(data_dir: str, file_format: str = 'tfrecord') -> str:
    """Writes a real 4-shard dataset 'tiny_indexed_images' (no download involved).

    `file_format` is tfds' 'tfrecord' (sequential reads) or 'array_record' (random access).
    Image i of split 'train' (40 images) or 'test' (10) is 4x4x1 with value i, except pixel
    [0, -1] = 200: a marker that shows whether the image was mirrored. Its label is i mod 3.
    """
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    config = tfds.download.DownloadConfig(num_shards=4, try_download_gcs=False)
    builder = _tiny_indexed_images()(data_dir=data_dir, file_format=file_format)
    builder.download_and_prepare(download_config=config)
    return 'tiny_indexed_images'


def marked_indices(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index, flipped) of each image of a tiny_indexed_images batch."""
    u = to_uint8(batch)[..., 0]
    flipped = u[:, 0, 0] == 200
    return np.where(flipped, u[:, 0, -1], u[:, 0, 0]), flipped


class CountingSource:
    """A random-access source that counts the records read from it."""

    def __init__(self, source):
        self.source, self.reads = source, 0

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        self.reads += 1
        return self.source[i]


@pytest.mark.slow  # builds tfds datasets
class GrainTest(absltest.TestCase):
    """The grain reader over a real ArrayRecord dataset (tfds.data_source), TensorFlow-free."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        import tensorflow_datasets as tfds

        cls.data_dir = tempfile.mkdtemp()
        cls.tfrecord_dir = tempfile.mkdtemp()
        cls.name = prepare_tiny_tfds_dataset(cls.data_dir, 'array_record')
        prepare_tiny_tfds_dataset(cls.tfrecord_dir)
        source = tfds.data_source(cls.name, split='train', data_dir=cls.data_dir)
        # The value of record j of the source (tfds stores examples in its own order).
        cls.value = np.array([source[j]['image'][1, 1, 0] for j in range(len(source))])

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.data_dir, ignore_errors=True)
        shutil.rmtree(cls.tfrecord_dir, ignore_errors=True)
        super().tearDownClass()

    def tiny(self, **overrides) -> ml_collections.ConfigDict:
        kwargs = {'dataset': self.name, 'data_dir': self.data_dir, 'image_size': 4}
        return make_data_config(**{**kwargs, 'loader': 'grain', **overrides})

    def expected(self, step: int, batch: int, seed: int) -> np.ndarray:
        """Values of global batch `step`, by the stream rule written out here."""
        epochs, within = np.divmod(step * batch + np.arange(batch), len(self.value))
        return np.array(
            [
                self.value[np.random.default_rng([seed, e]).permutation(len(self.value))[w]]
                for e, w in zip(epochs, within, strict=True)
            ]
        )

    def test_batches_follow_the_stream_rule_resume_exactly_and_split_over_hosts(self):
        config = self.tiny(random_flip=True)
        fresh = take(input_pipeline.train_iterator(config, global_batch_size=10, seed=3), 6)
        resumed = take(
            input_pipeline.train_iterator(config, global_batch_size=10, seed=3, start_step=4), 2
        )
        for step, batch in enumerate(fresh):
            values, flipped = marked_indices(batch)
            np.testing.assert_array_equal(values, self.expected(step, 10, 3))
            coins = np.random.default_rng([3, step, 1]).random(10) < 0.5
            np.testing.assert_array_equal(flipped, coins)
        for a, b in zip(fresh[4:], resumed, strict=True):
            np.testing.assert_array_equal(a, b)
        halves = [
            take(
                input_pipeline.train_iterator(
                    config, global_batch_size=10, seed=3, process_index=p, process_count=2
                ),
                6,
            )
            for p in range(2)
        ]
        for step in range(6):
            np.testing.assert_array_equal(
                np.concatenate([halves[0][step], halves[1][step]]), fresh[step]
            )

    def test_resuming_at_step_1e6_reads_only_that_steps_records(self):
        import tensorflow_datasets as tfds

        from diffusion_jax import random_access

        source = CountingSource(tfds.data_source(self.name, split='train', data_dir=self.data_dir))

        def decode(record):
            return record['image']

        for step in (10, 10**6):
            source.reads = 0
            indices = random_access.StreamIndices(len(source), 10, 5, 5, seed=0)
            batch = random_access.read_step(source, indices, step, decode, random_flip=False)
            self.assertEqual(source.reads, 5)  # this host's 5 rows, at either step
            self.assertLen(indices._permutations, 1)  # one epoch's order computed, no replay
            values, _ = marked_indices(batch['image'])
            np.testing.assert_array_equal(values, self.expected(step, 10, 0)[5:])

    def test_labels_follow_their_images_in_training_and_eval(self):
        batches = input_pipeline.train_iterator(
            self.tiny(random_flip=True), global_batch_size=10, seed=3, num_classes=3
        )
        for _ in range(5):
            batch = next(batches)
            np.testing.assert_array_equal(batch['label'], marked_indices(batch['image'])[0] % 3)
        for batch in input_pipeline.eval_iterator(self.tiny(), batch_size=4, num_classes=3):
            np.testing.assert_array_equal(batch['label'], marked_indices(batch['image'])[0] % 3)
        with self.assertRaisesRegex(input_pipeline.DatasetError, r'3 classes.*num_classes=3'):
            input_pipeline.train_iterator(self.tiny(), global_batch_size=10, seed=0, num_classes=2)

    def test_eval_is_one_ordered_pass_over_the_source(self):
        config = self.tiny(eval_split='train')
        batches = list(input_pipeline.eval_iterator(config, batch_size=16))
        self.assertEqual([len(b['image']) for b in batches], [16, 16, 8])
        values, flipped = marked_indices(np.concatenate([b['image'] for b in batches]))
        np.testing.assert_array_equal(values, self.value)
        self.assertFalse(flipped.any())

    def test_auto_reads_array_record_with_grain_and_tfrecord_with_tf_data(self):
        self.assertEqual(tfds_data.loader(self.tiny(loader='auto')), 'grain')
        tfrecord = self.tiny(loader='auto', data_dir=self.tfrecord_dir)
        self.assertEqual(tfds_data.loader(tfrecord), 'tfdata')
        a = take(input_pipeline.train_iterator(self.tiny(), global_batch_size=10, seed=0), 2)
        b = take(
            input_pipeline.train_iterator(self.tiny(loader='auto'), global_batch_size=10, seed=0),
            2,
        )
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)

    def test_grain_on_tfrecord_data_is_refused_with_the_fix(self):
        config = self.tiny(data_dir=self.tfrecord_dir)
        with self.assertRaisesRegex(
            input_pipeline.DatasetError, r'--file_format=array_record.*loader=tfdata'
        ):
            input_pipeline.train_iterator(config, global_batch_size=10, seed=0)

    def test_tfdata_for_a_builtin_source_is_refused(self):
        config = make_data_config(loader='tfdata')
        with self.assertRaisesRegex(input_pipeline.DatasetError, 'read in memory'):
            input_pipeline.train_iterator(config, global_batch_size=10, seed=0)


@pytest.mark.slow  # imports TensorFlow and builds mock tfds datasets
class TfdsTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        import tensorflow_datasets as tfds  # only this class needs TF

        cls.tfds = tfds
        cls.data_dir = tempfile.mkdtemp()
        cls.tiny_name = prepare_tiny_tfds_dataset(cls.data_dir)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.data_dir, ignore_errors=True)
        super().tearDownClass()

    def tiny(self, **overrides) -> ml_collections.ConfigDict:
        kwargs = {'dataset': self.tiny_name, 'data_dir': self.data_dir, 'image_size': 4}
        return make_data_config(**{**kwargs, 'random_flip': True, **overrides})

    def test_prepared_tfrecords_resume_exactly_and_cover_each_epoch(self):
        kwargs = {'global_batch_size': 10, 'seed': 0}
        fresh = take(input_pipeline.train_iterator(self.tiny(), **kwargs), 8)
        resumed = take(input_pipeline.train_iterator(self.tiny(), start_step=5, **kwargs), 3)
        for a, b in zip(fresh[5:], resumed, strict=True):
            np.testing.assert_array_equal(a, b)
        indices, flipped = zip(*map(marked_indices, fresh), strict=True)
        stream = np.concatenate(indices)
        self.assertEqual(sorted(stream[:40]), list(range(40)))  # batches 0-3: one epoch
        self.assertEqual(sorted(stream[40:]), list(range(40)))
        self.assertBetween(np.concatenate(flipped).mean(), 0.2, 0.8)
        other_seed = take(
            input_pipeline.train_iterator(self.tiny(), global_batch_size=10, seed=1), 1
        )
        self.assertFalse(np.array_equal(marked_indices(other_seed[0])[0], indices[0]))

    def test_prepared_tfrecords_hosts_read_disjoint_halves(self):
        halves = [
            np.concatenate(
                [
                    marked_indices(b)[0]
                    for b in take(
                        input_pipeline.train_iterator(
                            self.tiny(random_flip=False),
                            global_batch_size=10,
                            seed=0,
                            process_index=p,
                            process_count=2,
                        ),
                        4,
                    )
                ]
            )
            for p in range(2)
        ]
        # 4 local batches of 5 = one pass over each host's 20-image shard.
        self.assertEqual([len(set(h)) for h in halves], [20, 20])
        self.assertEqual(sorted(np.concatenate(halves)), list(range(40)))

    def test_prepared_tfrecords_labels_follow_their_images(self):
        kwargs = {'global_batch_size': 10, 'seed': 0, 'num_classes': 3}
        fresh = input_pipeline.train_iterator(self.tiny(), **kwargs)
        batches = [next(fresh) for _ in range(6)]
        for batch in batches:
            self.assertEqual(batch['label'].dtype, np.int32)
            np.testing.assert_array_equal(batch['label'], marked_indices(batch['image'])[0] % 3)
        resumed = next(input_pipeline.train_iterator(self.tiny(), start_step=4, **kwargs))
        np.testing.assert_array_equal(resumed['label'], batches[4]['label'])
        for batch in input_pipeline.eval_iterator(self.tiny(), batch_size=4, num_classes=3):
            np.testing.assert_array_equal(batch['label'], marked_indices(batch['image'])[0] % 3)

    def test_a_dataset_without_labels_is_refused_for_a_conditional_model(self):
        with self.tfds.testing.mock_data(num_examples=4):
            config = self.cifar10(dataset='celeb_a_hq/128', image_size=128)
            with self.assertRaisesRegex(input_pipeline.DatasetError, r"no 'label' class feature"):
                input_pipeline.train_iterator(config, global_batch_size=4, seed=0, num_classes=10)

    def test_mock_cifar10_labels_are_the_datasets(self):
        with self.tfds.testing.mock_data(num_examples=16):
            ds = self.tfds.builder('cifar10').as_dataset(split='test', shuffle_files=False)
            raw = list(self.tfds.as_numpy(ds))
            config = self.cifar10()
            (batch,) = input_pipeline.eval_iterator(config, batch_size=16, num_classes=10)
        np.testing.assert_array_equal(to_uint8(batch['image']), [ex['image'] for ex in raw])
        np.testing.assert_array_equal(batch['label'], [ex['label'] for ex in raw])

    def test_prepared_tfrecords_eval_is_one_pass_without_flips(self):
        batches = [
            b['image']
            for p in range(2)
            for b in input_pipeline.eval_iterator(
                self.tiny(), batch_size=4, process_index=p, process_count=2
            )
        ]
        self.assertEqual([len(b) for b in batches], [2, 2, 1, 2, 2, 1])
        indices, flipped = marked_indices(np.concatenate(batches))
        self.assertEqual(sorted(indices), list(range(10)))
        self.assertFalse(flipped.any())

    def cifar10(self, **overrides) -> ml_collections.ConfigDict:
        kwargs = {'dataset': 'cifar10', 'image_size': 32, 'num_channels': 3, 'random_flip': False}
        return make_data_config(**{**kwargs, **overrides})

    def test_unprepared_dataset_names_the_fix_and_never_downloads(self):
        data_dir = make_tempdir(self)
        with (
            mock.patch.object(
                self.tfds.core.DatasetBuilder, 'download_and_prepare', side_effect=AssertionError
            ) as download,
            self.assertRaisesRegex(
                input_pipeline.DatasetError,
                r"(?s)'cifar10' is not prepared.*download_and_prepare.*downloads/manual"
                r'.*--config\.data\.data_dir=DIR.*TFDS_DATA_DIR',
            ),
        ):
            input_pipeline.train_iterator(
                self.cifar10(data_dir=data_dir), global_batch_size=8, seed=0
            )
        download.assert_not_called()

    def test_unknown_name_lists_the_builtin_sources(self):
        with self.assertRaisesRegex(
            input_pipeline.DatasetError, r"unknown dataset 'no_such_set'.*'digits'.*tensorflow"
        ):
            input_pipeline.train_iterator(
                self.cifar10(dataset='no_such_set'), global_batch_size=8, seed=0
            )

    def test_mock_cifar10_batches_resume_and_per_host_shapes(self):
        with self.tfds.testing.mock_data(num_examples=16):
            config = self.cifar10()
            fresh = take(input_pipeline.train_iterator(config, global_batch_size=8, seed=0), 4)
            again = take(input_pipeline.train_iterator(config, global_batch_size=8, seed=0), 1)
            resumed = take(
                input_pipeline.train_iterator(config, global_batch_size=8, seed=0, start_step=3), 1
            )
            host = take(
                input_pipeline.train_iterator(
                    config, global_batch_size=8, seed=0, process_index=1, process_count=2
                ),
                1,
            )
        self.assertEqual(fresh[0].shape, (8, 32, 32, 3))
        self.assertEqual(fresh[0].dtype, np.float32)
        self.assertGreaterEqual(min(b.min() for b in fresh), -1.0)
        self.assertLessEqual(max(b.max() for b in fresh), 1.0)
        np.testing.assert_array_equal(again[0], fresh[0])
        np.testing.assert_array_equal(resumed[0], fresh[3])
        self.assertEqual(host[0].shape, (4, 32, 32, 3))

    def test_mock_cifar10_flips_mirror_some_images_only_when_enabled(self):
        with self.tfds.testing.mock_data(num_examples=16):
            raw = np.stack(
                [
                    ex['image']
                    for ex in self.tfds.as_numpy(
                        self.tfds.builder('cifar10').as_dataset(split='train')
                    )
                ]
            )
            counts = {}
            for random_flip in (False, True):
                config = self.cifar10(random_flip=random_flip)
                batches = take(
                    input_pipeline.train_iterator(config, global_batch_size=16, seed=0), 4
                )
                u = to_uint8(np.concatenate(batches))  # [64, 32, 32, 3]
                same = np.all(u[:, None] == raw[None], axis=(2, 3, 4)).any(axis=1)
                mirrored = np.all(u[:, None] == raw[None, :, :, ::-1], axis=(2, 3, 4)).any(axis=1)
                self.assertTrue(np.all(same | mirrored))
                counts[random_flip] = int((mirrored & ~same).sum())
        self.assertEqual(counts[False], 0)
        self.assertBetween(counts[True], 16, 48)

    def test_mock_cifar10_is_resized_and_evaluated_in_one_pass(self):
        with self.tfds.testing.mock_data(num_examples=10):
            config = self.cifar10(image_size=16)
            train = take(input_pipeline.train_iterator(config, global_batch_size=4, seed=0), 1)
            evals = [b['image'] for b in input_pipeline.eval_iterator(config, batch_size=4)]
        self.assertEqual(train[0].shape, (4, 16, 16, 3))
        self.assertEqual([e.shape for e in evals], [(4, 16, 16, 3)] * 2 + [(2, 16, 16, 3)])

    def test_tf_center_crop_matches_the_folder_source(self):
        import tensorflow as tf

        image = np.zeros((8, 12, 3), np.uint8)
        image[:, :2], image[:, 2:10], image[:, 10:] = [255, 0, 0], [0, 255, 0], [0, 0, 255]
        builder = self.tfds.builder('lsun/church_outdoor', data_dir=self.data_dir)  # [?, ?, 3]
        encoded = tf.io.encode_png(tf.constant(image))
        cropped = tfds_data.decode_image(builder, encoded, 8).numpy()
        np.testing.assert_array_equal(cropped, np.broadcast_to([0, 255, 0], (8, 8, 3)))


if __name__ == '__main__':
    absltest.main()
