"""gs:// workdirs and files: the writers and readers outside orbax and TensorBoard go through
`etils.epath`, never through local file APIs that would create a local folder named `gs:`.

No bucket can be reached from here, so `epath.testing.mock_epath` maps `gs://bucket/...` onto a
local temporary folder: every call our code makes for a gs:// path goes through epath's backend
(and so would reach GCS through tf.io.gfile on a real VM); a local file API would miss the mock
and create `./gs:/...` instead, which each test checks for.
"""

import contextlib
import os
import pathlib
import tempfile
from unittest import mock

import jax
import numpy as np
from absl.testing import absltest
from etils import epath
from etils.epath import gpath
from etils.epath import testing as epath_testing

from diffusion_jax import evaluate, generate, image_io
from diffusion_jax.evaluation import inception

BUCKET = 'gs://bucket'


@contextlib.contextmanager
def fake_bucket(root: str):
    """Routes every epath call on gs://bucket/... to `root`/... (other paths unchanged)."""

    def local(path) -> str:
        text = os.fspath(path)
        return root + text[len(BUCKET) :] if text.startswith(BUCKET) else text

    def one(original, path, *args, **kwargs):
        return original(local(path), *args, **kwargs)

    def two(original, path, dst, *args, **kwargs):
        return original(local(path), local(dst), *args, **kwargs)

    names = ('open', 'exists', 'glob', 'isdir', 'listdir', 'makedirs', 'mkdir', 'remove')
    names += ('rmtree', 'stat', 'walk')
    # With TensorFlow imported, epath sends gs:// to tf.io.gfile whatever the mock says.
    with (
        mock.patch.object(gpath, '_is_tf_installed', return_value=False),
        epath_testing.mock_epath(**dict.fromkeys(names, one), rename=two, replace=two, copy=two),
    ):
        yield


class RemotePathTest(absltest.TestCase):
    def setUp(self):
        super().setUp()
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.root = tmp.name
        cwd = tempfile.TemporaryDirectory()  # where a local 'gs:' folder would appear
        self.addCleanup(cwd.cleanup)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(cwd.name)
        self.cwd = cwd.name

    def tearDown(self):
        self.assertEqual(os.listdir(self.cwd), [])  # no local 'gs:' folder
        super().tearDown()

    def test_json_npz_and_png_writers(self):
        with fake_bucket(self.root):
            image_io.save_json(f'{BUCKET}/w/eval/metrics.json', {'fid': 3.17})
            image_io.save_npz(f'{BUCKET}/w/samples/s.npz', images=np.arange(6, dtype=np.uint8))
            image_io.save_grid(f'{BUCKET}/w/samples/g.png', np.zeros((4, 8, 8, 1), np.uint8))
        w = pathlib.Path(self.root, 'w')
        self.assertEqual(
            (w / 'eval' / 'metrics.json').read_text().split(), ['{', '"fid":', '3.17', '}']
        )
        with np.load(w / 'samples' / 's.npz') as f:
            np.testing.assert_array_equal(f['images'], np.arange(6))
        self.assertEqual((w / 'samples' / 'g.png').read_bytes()[:4], b'\x89PNG')

    def test_sample_shards_resume_and_join_on_a_bucket(self):
        def sample_fn(params, rng, first_index):  # image i is filled with i (no network needed)
            del params, rng
            i = first_index + np.arange(4, dtype=np.float32)
            return jax.numpy.asarray(
                np.broadcast_to((i / 127.5 - 1)[:, None, None, None], (4, 2, 2, 1))
            )

        path = f'{BUCKET}/w/samples/samples_7.npz'
        with fake_bucket(self.root):
            # A partial run: shards for images 0..7 exist, as if killed after two batches.
            shard_dir = epath.Path(path + '.partial')
            image_io.save_json(str(shard_dir / 'spec.json'), {'x': 1, 'seed': 0, 'num_samples': 10})
            for start in (0, 4):
                image_io.save_npz(
                    str(shard_dir / f'images_{start:08d}_{start + 4:08d}.npz'),
                    images=np.full((4, 2, 2, 1), 200, np.uint8),  # marks the reused shards
                )
            generate.generate_to_npz(
                sample_fn, None, path=path, num_samples=10, batch_size=4, seed=0, spec={'x': 1}
            )
            images = image_io.load_npz_rows(path, 'images')  # through epath, from the bucket
        self.assertEqual(images[:8, 0, 0, 0].tolist(), [200] * 8)  # resumed, not redrawn
        self.assertEqual(images[8:, 0, 0, 0].tolist(), [8, 9])
        local = pathlib.Path(self.root, 'w', 'samples')
        self.assertEqual(os.listdir(local), ['samples_7.npz'])  # shard folder removed
        with np.load(local / 'samples_7.npz') as f:
            np.testing.assert_array_equal(f['images'], images)

    def test_inception_weights_and_reference_statistics_from_a_bucket(self):
        flat = {k: np.zeros(s, np.float32) for k, s in inception.param_shapes().items()}
        from generate_test import tiny_config

        config = tiny_config()
        config.eval.reference_stats = f'{BUCKET}/stats/ref.npz'
        with fake_bucket(self.root):
            inception.save_params(
                f'{BUCKET}/weights/w.npz', flat, source_sha256='6726825d' + '0' * 56
            )
            loaded = inception.load_params(f'{BUCKET}/weights/w.npz')
            image_io.save_npz(config.eval.reference_stats, mu=np.ones(3), sigma=np.eye(3), count=5)
            self.assertTrue(evaluate._reference_exists(config))
            mu, sigma = evaluate._reference(config, None, None, 8)
        self.assertEqual(len(jax.tree.leaves(loaded)), len(flat))
        np.testing.assert_array_equal(mu, np.ones(3))
        np.testing.assert_array_equal(sigma, np.eye(3))
        self.assertTrue(pathlib.Path(self.root, 'weights', 'w.npz').is_file())

    def test_reference_stats_default_path_stays_a_url(self):
        from generate_test import tiny_config

        config = tiny_config()
        config.data.dataset, config.data.path = 'npz', f'{BUCKET}/data/train.npz'
        self.assertEqual(
            evaluate.reference_stats_path(config), f'{BUCKET}/data/fid_stats_npz_train_8px.npz'
        )


if __name__ == '__main__':
    absltest.main()
