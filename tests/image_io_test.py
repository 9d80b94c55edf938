"""uint8 conversion, grids and atomic file writing."""

import io
import json
import os
import tempfile
import zipfile
from unittest import mock

import numpy as np
from absl.testing import absltest, parameterized
from PIL import Image

from diffusion_jax import image_io


class ImageIoTest(parameterized.TestCase):
    def test_to_uint8_is_round_of_x_plus_1_times_127_5_clipped(self):
        x = np.array([-1.5, -1.0, -0.999, 0.0, 0.5, 1.0, 2.0], np.float32)
        expected = [0, 0, 0, 128, 191, 255, 255]  # round(127.5) = 128 (half to even), 191.25 -> 191
        np.testing.assert_array_equal(image_io.to_uint8(x), expected)
        levels = np.arange(256)
        np.testing.assert_array_equal(image_io.to_uint8(levels / 127.5 - 1.0), levels)

    def test_grid_places_images_row_by_row_with_padding(self):
        colours = np.arange(1, 6, dtype=np.uint8)[:, None, None, None] * np.ones(
            (5, 2, 3, 1), np.uint8
        )
        grid = image_io.make_grid(colours, ncol=3, padding=1, pad_value=0)
        self.assertEqual(grid.shape, (2 * 3 + 1, 3 * 4 + 1, 1))
        self.assertEqual(grid[1, 1, 0], 1)  # first image top-left
        self.assertEqual(grid[1, 5, 0], 2)  # second image right of it
        self.assertEqual(grid[4, 1, 0], 4)  # fourth image starts the second row
        self.assertEqual(grid[4, 9, 0], 0)  # the sixth cell is empty padding
        self.assertEqual(grid[0, :, 0].max(), 0)

    def test_saved_grids_of_small_images_are_upscaled_to_about_the_asked_size(self):
        images = np.random.default_rng(1).integers(0, 256, (100, 8, 8, 1), dtype=np.uint8)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, 'grid.png')
            grid = image_io.save_grid(path, images, size=512)
            saved = np.asarray(Image.open(path))
        self.assertEqual(grid.shape, (102, 102, 1))  # 10 x 10 cells of 8 + 2 padding, + 2
        self.assertEqual(saved.shape, (510, 510))  # 5x: the largest scale within 512
        np.testing.assert_array_equal(saved[::5, ::5], grid[..., 0])

    def test_png_round_trips_exactly_and_scales_by_nearest(self):
        image = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, 'a', 'grid.png')
            image_io.save_png(path, image, scale=2)
            back = np.asarray(Image.open(path))
        np.testing.assert_array_equal(back, image.repeat(2, 0).repeat(2, 1))

    def test_grayscale_png_is_written_in_l_mode(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, 'g.png')
            image_io.save_png(path, np.full((3, 3, 1), 7, np.uint8))
            self.assertEqual(Image.open(path).mode, 'L')

    def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, 'metrics.json')
            image_io.save_json(path, {'fid': 3.17})
            failing = mock.patch.object(os, 'replace', side_effect=OSError('disk full'))
            with failing, self.assertRaises(OSError):
                image_io.save_json(path, {'fid': 99.0})
            with open(path) as f:
                self.assertEqual(json.load(f), {'fid': 3.17})
            self.assertEqual(os.listdir(d), ['metrics.json'])

    def test_npz_is_written_atomically_and_loads_back(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, 'samples.npz')
            images = np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3)
            image_io.save_npz(path, images=images)
            with np.load(path) as f:
                np.testing.assert_array_equal(f['images'], images)
            self.assertEqual(os.listdir(d), ['samples.npz'])

    def test_an_npz_written_from_row_chunks_is_the_one_np_load_reads(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, 'samples.npz')
            images = np.random.default_rng(0).integers(0, 256, (10, 3, 2, 1), np.uint8)
            chunks = [images[:4], images[4:4], images[4:9], images[9:]]
            image_io.save_npz_rows(path, 'images', images.shape, np.uint8, iter(chunks))
            with np.load(path) as f:
                self.assertEqual(f.files, ['images'])
                np.testing.assert_array_equal(f['images'], images)
            self.assertEqual(os.listdir(d), ['samples.npz'])
            # The first rows alone, from this file and from one np.savez wrote.
            np.testing.assert_array_equal(image_io.load_npz_rows(path, 'images', 3), images[:3])
            np.savez(os.path.join(d, 'other.npz'), images=images, labels=np.arange(10))
            other = image_io.load_npz_rows(os.path.join(d, 'other.npz'), 'images', 99)
            np.testing.assert_array_equal(other, images)

    def test_chunks_that_do_not_add_up_leave_the_old_file(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, 'samples.npz')
            old = np.zeros((2, 1, 1, 1), np.uint8)
            image_io.save_npz(path, images=old)
            for chunks, message in (
                ([np.ones((3, 1, 1, 1), np.uint8)], 'hold 3 rows, not 4'),
                ([np.ones((4, 1, 2, 1), np.uint8)], r'chunk of shape \(4, 1, 2, 1\)'),
            ):
                with self.assertRaisesRegex(ValueError, message):
                    image_io.save_npz_rows(path, 'images', (4, 1, 1, 1), np.uint8, chunks)
                np.testing.assert_array_equal(np.load(path)['images'], old)
                self.assertEqual(os.listdir(d), ['samples.npz'])

    @parameterized.parameters(0o022, 0o077, 0o002)
    def test_written_files_get_the_mode_a_plain_open_would(self, umask):
        old = os.umask(umask)
        self.addCleanup(os.umask, old)
        with tempfile.TemporaryDirectory() as d:
            image_io.save_json(os.path.join(d, 'm.json'), {})
            image_io.save_npz(os.path.join(d, 's.npz'), images=np.zeros(1, np.uint8))
            image_io.save_png(os.path.join(d, 'g.png'), np.zeros((2, 2, 1), np.uint8))
            with open(os.path.join(d, 'plain'), 'w'):
                pass
            want = 0o666 & ~umask
            self.assertEqual(os.stat(os.path.join(d, 'plain')).st_mode & 0o777, want)
            for name in ('m.json', 's.npz', 'g.png'):
                self.assertEqual(os.stat(os.path.join(d, name)).st_mode & 0o777, want, name)


class LoadArraysTest(absltest.TestCase):
    def setUp(self):
        super().setUp()
        self.dir = self.enter_context(tempfile.TemporaryDirectory())

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def write_member(self, name: str, member: str, data: bytes) -> str:
        with zipfile.ZipFile(self.path(name), 'w') as archive:
            archive.writestr(member, data)
        return self.path(name)

    def test_the_arrays_np_load_reads(self):
        rng = np.random.default_rng(0)
        arrays = {
            'images': rng.integers(0, 256, (3, 4, 4, 1), np.uint8),
            'f': np.asfortranarray(rng.normal(size=(3, 5))),
            'scalar': np.asarray('text'),
        }
        np.savez(self.path('a.npz'), **arrays)
        np.savez_compressed(self.path('c.npz'), **arrays)
        for name in ('a.npz', 'c.npz'):
            loaded = image_io.load_arrays(self.path(name))
            self.assertEqual(sorted(loaded), sorted(arrays))
            self.assertEqual(image_io.array_names(self.path(name)), list(arrays))
            for key, value in arrays.items():
                np.testing.assert_array_equal(loaded[key], value)
                self.assertEqual(loaded[key].dtype, value.dtype)
            self.assertEqual(list(image_io.load_arrays(self.path(name), ['f'])), ['f'])
        np.save(self.path('one.npy'), arrays['f'])
        np.testing.assert_array_equal(image_io.load_arrays(self.path('one.npy'))[''], arrays['f'])

    def test_a_header_claiming_1e12_images_is_refused_before_any_allocation(self):
        header = io.BytesIO()
        shape = (10**12, 32, 32, 3)
        np.lib.format.write_array_header_1_0(
            header, {'descr': '|u1', 'fortran_order': False, 'shape': shape}
        )
        data = header.getvalue() + bytes(3072)
        with open(self.path('big.npy'), 'wb') as f:
            f.write(data)
        for path in (self.path('big.npy'), self.write_member('big.npz', 'images.npy', data)):
            with self.assertRaisesRegex(
                image_io.ArrayFileError, r'claims uint8 \[1000000000000, 32, 32, 3\].*3,072 bytes'
            ):
                image_io.load_arrays(path)

    def test_a_truncated_member_is_refused(self):
        buf = io.BytesIO()
        np.save(buf, np.zeros((4, 8), np.float32))
        path = self.write_member('t.npz', 'images.npy', buf.getvalue()[:-5])
        with self.assertRaisesRegex(image_io.ArrayFileError, r"'images'.*123 bytes of data"):
            image_io.load_arrays(path)

    def test_members_that_are_not_arrays_and_pickles_are_refused(self):
        path = self.write_member('txt.npz', 'images.txt', b'hello')
        with self.assertRaisesRegex(image_io.ArrayFileError, r"'images\.txt' is not an array"):
            image_io.load_arrays(path)
        np.savez(self.path('obj.npz'), images=np.array([{'a': 1}], dtype=object))
        with self.assertRaisesRegex(image_io.ArrayFileError, 'Python objects'):
            image_io.load_arrays(self.path('obj.npz'))
        with open(self.path('junk.npz'), 'wb') as f:
            f.write(b'junk')
        with self.assertRaisesRegex(image_io.ArrayFileError, 'neither an .npz nor an .npy'):
            image_io.load_arrays(self.path('junk.npz'))


if __name__ == '__main__':
    absltest.main()
