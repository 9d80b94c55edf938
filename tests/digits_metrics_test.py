"""The offline digits metrics: classifier accuracy, score scale, and the weight cache."""

import os
import pathlib
import tempfile
from unittest import mock

import numpy as np
from absl.testing import absltest, parameterized

from diffusion_jax.evaluation import digits


class DigitsMetricsTest(parameterized.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # Train once (about 10-25 s on two CPU cores) into a private cache folder.
        cls._tmp = tempfile.TemporaryDirectory()
        cls.cache_dir = os.path.join(cls._tmp.name, 'cache')
        cls.classifier = digits.get_classifier(cache_dir=cls.cache_dir)
        cls.reference = digits.real_digits_reference(cls.classifier)

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()
        super().tearDownClass()

    def _noise(self, n=300, seed=0):
        return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)

    def test_accuracy_is_high_against_the_true_labels_and_chance_against_shuffled_ones(self):
        images, labels = digits.load_real_digits('heldout')
        right = digits.digits_metrics(images, self.classifier, labels)['digits_accuracy']
        shuffled = np.random.default_rng(0).permutation(labels)
        wrong = digits.digits_metrics(images, self.classifier, shuffled)['digits_accuracy']
        self.assertGreater(right, 0.95)
        self.assertLess(wrong, 0.25)  # 10 classes: about 0.1
        self.assertEqual(self.reference['digits_accuracy'], right)
        with self.assertRaisesRegex(ValueError, r'labels must be \[299\]'):
            digits.digits_metrics(images, self.classifier, labels[:5])

    def test_splits_are_every_sixth_digit_held_out_as_uint8(self):
        train, train_labels = digits.load_real_digits('train')
        heldout, heldout_labels = digits.load_real_digits('heldout')
        all_images, all_labels = digits.load_real_digits('all')
        self.assertEqual((train.shape, heldout.shape), ((1498, 8, 8, 1), (299, 8, 8, 1)))
        self.assertEqual(heldout.dtype, np.uint8)
        self.assertEqual((int(all_images.min()), int(all_images.max())), (0, 255))
        np.testing.assert_array_equal(heldout, all_images[5::6])
        np.testing.assert_array_equal(heldout_labels, all_labels[5::6])
        np.testing.assert_array_equal(train_labels, np.delete(all_labels, np.s_[5::6]))
        with self.assertRaisesRegex(ValueError, "unknown digits split 'test'"):
            digits.load_real_digits('test')

    def test_classifier_gets_97_percent_of_held_out_real_digits(self):
        images, labels = digits.load_real_digits('heldout')
        accuracy = np.mean(self.classifier.predict(images) == labels)
        self.assertGreaterEqual(accuracy, 0.97)

    def test_features_and_logits_have_the_documented_shapes(self):
        features, logits = self.classifier.features_and_logits(self._noise(n=3))
        self.assertEqual((features.shape, logits.shape), ((3, 128), (3, 10)))
        self.assertEqual((features.dtype, logits.dtype), (np.float64, np.float64))

    def test_real_held_out_digits_score_near_ten_with_a_small_fd(self):
        # Measured: digits_is 9.49, digits_fd 2.3 (see digits.py); 10 and 0 are the ideals.
        self.assertGreater(self.reference['digits_is'], 8.5)
        self.assertLessEqual(self.reference['digits_is'], 10.0)
        self.assertBetween(self.reference['digits_fd'], 0.0, 10.0)
        self.assertEqual(self.reference['num_images'], 299)

    def test_uniform_noise_scores_far_worse_than_real_digits(self):
        noise = digits.digits_metrics(self._noise(), self.classifier)
        self.assertLess(noise['digits_is'], 0.5 * self.reference['digits_is'])
        self.assertGreater(noise['digits_fd'], 10.0 * self.reference['digits_fd'])

    def test_one_repeated_real_digit_scores_is_one(self):
        # Identical images give identical p(y|x) = p(y): KL 0 for every image.
        image = digits.load_real_digits('heldout')[0][:1]
        result = digits.digits_metrics(np.repeat(image, 50, axis=0), self.classifier)
        self.assertAlmostEqual(result['digits_is'], 1.0, places=9)
        self.assertGreater(result['digits_fd'], self.reference['digits_fd'])

    def test_metrics_ignore_image_order(self):
        images = digits.load_real_digits('heldout')[0]
        order = np.random.default_rng(0).permutation(len(images))
        shuffled = digits.digits_metrics(images[order], self.classifier)
        self.assertAlmostEqual(shuffled['digits_is'], self.reference['digits_is'], places=9)
        self.assertAlmostEqual(shuffled['digits_fd'], self.reference['digits_fd'], places=6)

    @parameterized.named_parameters(
        ('float_images', np.zeros((4, 8, 8, 1), np.float32)),
        ('no_channel_axis', np.zeros((4, 8, 8), np.uint8)),
        ('wrong_size', np.zeros((4, 32, 32, 1), np.uint8)),
        ('one_image', np.zeros((1, 8, 8, 1), np.uint8)),
    )
    def test_bad_images_raise(self, images):
        with self.assertRaises(ValueError):
            digits.digits_metrics(images, self.classifier)

    def test_second_get_classifier_loads_the_cache_instead_of_training(self):
        path = os.path.join(self.cache_dir, f'digits_classifier_{digits.CLASSIFIER_VERSION}.npz')
        self.assertEqual(os.listdir(self.cache_dir), [os.path.basename(path)])  # no temp files
        mtime = os.stat(path).st_mtime_ns
        with mock.patch.object(digits, 'train_classifier', side_effect=AssertionError('trained')):
            reloaded = digits.get_classifier(cache_dir=self.cache_dir)
        self.assertEqual(os.stat(path).st_mtime_ns, mtime)
        images = digits.load_real_digits('heldout')[0]
        np.testing.assert_array_equal(
            reloaded.features_and_logits(images)[1], self.classifier.features_and_logits(images)[1]
        )

    def test_changed_recipe_version_or_corrupt_file_trains_again(self):
        with tempfile.TemporaryDirectory() as cache_dir:
            train = mock.patch.object(digits, 'train_classifier', return_value=self.classifier)
            with mock.patch.object(digits, 'CLASSIFIER_VERSION', 'test-v2'), train as trained:
                digits.get_classifier(cache_dir=cache_dir)
                self.assertEqual(trained.call_count, 1)
                path = os.path.join(cache_dir, 'digits_classifier_test-v2.npz')
                self.assertTrue(os.path.exists(path))
                with open(path, 'wb') as f:  # as if written by a tool without the atomic rename
                    f.write(b'PK\x03\x04 truncated')
                digits.get_classifier(cache_dir=cache_dir)
                self.assertEqual(trained.call_count, 2)
                digits.get_classifier(cache_dir=cache_dir)  # the rewritten file loads
                self.assertEqual(trained.call_count, 2)

    def test_interrupted_cache_write_leaves_no_file(self):
        def savez_then_die(f, **arrays):
            f.write(b'PK\x03\x04 half an archive')
            raise KeyboardInterrupt

        with tempfile.TemporaryDirectory() as cache_dir:
            path = os.path.join(cache_dir, 'digits_classifier_x.npz')
            with (
                mock.patch.object(digits.np, 'savez', savez_then_die),
                self.assertRaises(KeyboardInterrupt),
            ):
                digits._save_params(path, self.classifier.params)
            self.assertEqual(os.listdir(cache_dir), [])
            # An existing good file survives a failed overwrite.
            digits._save_params(path, self.classifier.params)
            before = pathlib.Path(path).read_bytes()
            with (
                mock.patch.object(digits.np, 'savez', savez_then_die),
                self.assertRaises(KeyboardInterrupt),
            ):
                digits._save_params(path, self.classifier.params)
            self.assertEqual(os.listdir(cache_dir), ['digits_classifier_x.npz'])
            self.assertEqual(pathlib.Path(path).read_bytes(), before)


if __name__ == '__main__':
    absltest.main()
