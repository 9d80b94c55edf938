"""tensorflow-datasets sources: the tf.data reader and the grain (ArrayRecord) source.

`input_pipeline` dispatches here for every dataset that is not a built-in source. A dataset is
read from `config.data.data_dir` (None: $TFDS_DATA_DIR or tfds' default) and must have been
prepared beforehand: nothing is downloaded. Images of another size (LSUN, CelebA-HQ) are
center-cropped and resized with an antialiased bicubic filter.

Labels (class-conditional models) come from the dataset's `label` feature, a `ClassLabel`; a
dataset without one is refused in one line.

TensorFlow is imported lazily inside these functions, so `import diffusion_jax` and every run on
a built-in source never load it; TensorFlow and tfds come with the `tfds` extra. The grain path
needs tensorflow-datasets but not TensorFlow.
"""

import contextlib
import importlib
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import errors

_SHUFFLE_BUFFER = 10_000  # tf.data shuffle buffer, in examples, capped by _SHUFFLE_BYTES
_SHUFFLE_BYTES = 1 << 30
BUILTIN_SOURCES = ('digits', 'folder', 'npz')


def loader(data_config: ml_collections.ConfigDict) -> str:
    """'grain' or 'tfdata' for a tfds dataset: `data.loader`, or for 'auto' its file format.

    'auto' reads ArrayRecord datasets (random access) with grain when grain is installed, and
    TFRecord datasets (sequential only) with tf.data.
    """
    if data_config.loader != 'auto':
        return data_config.loader
    found = builder(data_config, tensorflow=False)
    if str(found.info.file_format).lower().endswith('array_record'):
        try:
            import grain  # noqa: F401

            return 'grain'
        except ImportError:
            logging.warning('grain is not installed: reading the ArrayRecord data with tf.data')
    return 'tfdata'


def check_labels(found: Any, data_config: ml_collections.ConfigDict, num_classes: int) -> None:
    """Refuses a dataset without a `label` ClassLabel, or with more classes than the model."""
    name, features = data_config.dataset, found.info.features
    classes = getattr(features['label'], 'num_classes', None) if 'label' in features else None
    if classes is None:
        raise errors.DatasetError(
            f'model.num_classes={num_classes} needs class labels, but tfds dataset {name!r} has '
            "no 'label' class feature; train it unconditionally (model.num_classes=0)"
        )
    if classes > num_classes:
        raise errors.DatasetError(
            f'tfds dataset {name!r} has {classes} classes but model.num_classes={num_classes}; '
            f'set --config.model.num_classes={classes}'
        )


def source(
    data_config: ml_collections.ConfigDict, split: str, num_classes: int
) -> tuple[Any, Callable[[Any], np.ndarray], Callable[[Any], int] | None]:
    """(random-access source of `split`, record -> uint8 [S, S, C], record -> label or None).

    Over a tfds ArrayRecord dataset; the label reader is None when `num_classes` is 0.
    """
    found = builder(data_config, tensorflow=False)
    import tensorflow_datasets as tfds

    if not str(found.info.file_format).lower().endswith('array_record'):
        raise errors.DatasetError(
            f"data.loader 'grain' needs random access, but tfds dataset {data_config.dataset!r} "
            f'is stored as {found.info.file_format}: prepare it as ArrayRecord (tfds build '
            f'{data_config.dataset} --file_format=array_record, see launch/README.md) or use '
            '--config.data.loader=tfdata'
        )
    if num_classes:
        check_labels(found, data_config, num_classes)
    try:
        records = tfds.data_source(data_config.dataset, split=split, data_dir=data_config.data_dir)
    except (ValueError, KeyError) as e:
        raise errors.DatasetError(
            f'tfds dataset {data_config.dataset!r} cannot read split {split!r} ({e}); its '
            f'splits are {sorted(found.info.splits)}'
        ) from None
    size = data_config.image_size
    label = (lambda record: int(record['label'])) if num_classes else None
    return records, lambda record: square(record['image'], size), label


def square(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, C] -> [size, size, C]: center square crop, bicubic resize (Pillow)."""
    from PIL import Image

    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    cropped = image[top : top + s, left : left + s]
    if s == size:
        return cropped
    grey = cropped.shape[-1] == 1
    resized = Image.fromarray(cropped[..., 0] if grey else cropped).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    out = np.asarray(resized, np.uint8)
    return out[..., None] if grey else out


def builder(data_config: ml_collections.ConfigDict, *, tensorflow: bool = True) -> Any:
    """tfds.builder for data_config.dataset, with DatasetError for unknown names.

    `tensorflow=False` (the grain reader's) needs tensorflow-datasets only, not TensorFlow.
    """
    try:  # lazy: the package must not load TF
        import tensorflow_datasets as tfds

        tf = importlib.import_module('tensorflow') if tensorflow else None
    except ImportError as e:
        raise errors.DatasetError(
            f'dataset {data_config.dataset!r} is read with tensorflow-datasets, which is not '
            f'installed ({e}); install the extra: pip install "diffusion-jax[tfds]" (from a '
            'checkout: pip install -e ".[tfds]"), or use a built-in source '
            f'{list(BUILTIN_SOURCES)}'
        ) from None

    # Keep TF off the accelerators (JAX owns them); RuntimeError: TF's devices already set up.
    if tf is not None:
        with contextlib.suppress(RuntimeError):
            tf.config.set_visible_devices([], 'GPU')
    name = data_config.dataset
    try:
        found = tfds.builder(name, data_dir=data_config.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise errors.DatasetError(
            f'unknown dataset {name!r}: data.dataset is one of the built-in sources '
            f'{list(BUILTIN_SOURCES)} or the name of any tensorflow-datasets image dataset, '
            "e.g. 'cifar10', 'celeb_a_hq/256', 'lsun/church_outdoor' "
            '(https://www.tensorflow.org/datasets/catalog)'
        ) from None
    except ValueError as e:  # e.g. an unknown config in 'name/config'
        raise errors.DatasetError(f'tfds cannot build dataset {name!r}: {e}') from None
    features = found.info.features  # a FeaturesDict: supports `in`, not .get
    if 'image' not in features or len(features['image'].shape) != 3:
        what = f"tfds dataset {name!r} has no 'image' feature of shape [H, W, C]"
        raise errors.DatasetError(what)
    channels = features['image'].shape[-1]
    if channels is not None and channels != data_config.num_channels:
        raise errors.DatasetError(
            f'tfds dataset {name!r} has {channels}-channel images but data.num_channels='
            f'{data_config.num_channels}; set --config.data.num_channels={channels}'
        )
    return found


def _not_prepared_message(name: str, found: Any) -> str:
    return (
        f'tfds dataset {name!r} is not prepared: no data in {found.data_dir}. Training never '
        'downloads. On a machine with internet run\n'
        f'  python -c "import tensorflow_datasets as tfds; tfds.builder({name!r}, '
        f"data_dir='DIR').download_and_prepare()\"   (or: tfds build {name} --data_dir=DIR)\n"
        'For manual-download datasets (e.g. celeb_a_hq) first place the files tfds asks for in '
        'DIR/downloads/manual/. Then copy DIR here and pass --config.data.data_dir=DIR or set '
        'TFDS_DATA_DIR=DIR.'
    )


def _split(found, data_config, key: str, index: int, count: int, seed: int | None, labels: bool):
    """This process's shard of data_config.<key>: {'image': encoded bytes (, 'label')}.

    Training (seed set) shuffles the files with `seed` and drops the remainder so that hosts get
    equal shards; eval (seed None) reads in order and keeps every example.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    name, split = data_config.dataset, data_config[key]
    options = tf.data.Options()
    options.deterministic = True  # exact resume: the same order on every run
    host_split = tfds.split_for_jax_process(
        split, process_index=index, process_count=count, drop_remainder=seed is not None
    )
    read_config = tfds.ReadConfig(options=options, shuffle_seed=seed)
    try:
        ds = found.as_dataset(
            split=host_split,
            shuffle_files=seed is not None,
            read_config=read_config,
            decoders={'image': tfds.decode.SkipDecoding()},
        )
    except AssertionError:  # tfds' signal for "download_and_prepare() was never run"
        raise errors.DatasetError(_not_prepared_message(name, found)) from None
    except (ValueError, KeyError) as e:
        raise errors.DatasetError(
            f'tfds dataset {name!r} cannot read split {split!r} ({e}); its splits are '
            f'{sorted(found.info.splits)}: set --config.data.{key}=...'
        ) from None
    keys = ('image', 'label') if labels else ('image',)
    return ds.with_options(options).map(lambda example: {k: example[k] for k in keys})


def decode_image(found: Any, encoded: Any, size: int) -> Any:
    """Encoded image -> uint8 [size, size, C]: center square crop, then antialiased bicubic."""
    import tensorflow as tf

    image = found.info.features['image'].decode_example(encoded)
    if image.shape[0] == size and image.shape[1] == size:
        return image
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    s = tf.minimum(h, w)
    cropped = tf.image.crop_to_bounding_box(image, (h - s) // 2, (w - s) // 2, s, s)

    def resize():
        resized = tf.image.resize(cropped, [size, size], method='bicubic', antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

    return tf.ensure_shape(tf.cond(tf.equal(s, size), lambda: cropped, resize), [size, size, None])


def _labelled(found, data_config, num_classes: int) -> bool:
    if num_classes:
        check_labels(found, data_config, num_classes)
    return bool(num_classes)


def _element(image: Any, example: dict[str, Any]) -> dict[str, Any]:
    """{'image': float32 in [-1, 1] (, 'label': int32)} from a uint8 image and its example."""
    import tensorflow as tf

    element = {'image': tf.cast(image, tf.float32) / 127.5 - 1.0}
    if 'label' in example:
        element['label'] = tf.cast(example['label'], tf.int32)
    return element


def train(
    data_config, local, seed, start_step, process_index, process_count, num_classes
) -> Iterator[dict[str, np.ndarray]]:
    """This process's training batches through tf.data (see `input_pipeline.train_iterator`)."""
    found = builder(data_config)  # first: it says which extra a missing TF needs
    import tensorflow as tf
    import tensorflow_datasets as tfds

    labels = _labelled(found, data_config, num_classes)
    seed = seed % (1 << 31)
    ds = _split(found, data_config, 'train_split', process_index, process_count, seed, labels)
    # Shuffle the encoded bytes; decoded bytes per image bound their size.
    stored = found.info.features['image'].shape
    size, channels = data_config.image_size, data_config.num_channels
    image_bytes = np.prod(stored) if None not in stored else size * size * channels
    buffer = int(max(1, min(_SHUFFLE_BUFFER, _SHUFFLE_BYTES // image_bytes)))
    ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    # Resume replays the reading and shuffling of start_step batches but skips them before
    # decoding: exact, and much cheaper than decoding, though slower than a seek.
    ds = ds.enumerate().skip(start_step * local)

    def to_element(index, example):
        image = decode_image(found, example['image'], size)
        if data_config.random_flip:
            # Seeded by the element's position in this host's stream: resume-exact.
            position = index * process_count + process_index
            flip_seed = tf.stack([tf.constant(seed, tf.int64), position])
            image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
        return _element(image, example)

    ds = ds.map(to_element, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return iter(tfds.as_numpy(ds))


def evaluate(
    data_config, local, process_index, process_count, share, num_classes
) -> Iterator[dict[str, np.ndarray]]:
    """This process's eval batches through tf.data (see `input_pipeline.eval_iterator`)."""
    found = builder(data_config)  # first: it says which extra a missing TF needs
    import tensorflow as tf
    import tensorflow_datasets as tfds

    labels = _labelled(found, data_config, num_classes)
    ds = _split(found, data_config, 'eval_split', process_index, process_count, None, labels)
    if share is not None:
        ds = ds.take(share)

    def to_element(example):
        return _element(decode_image(found, example['image'], data_config.image_size), example)

    ds = ds.map(to_element, num_parallel_calls=tf.data.AUTOTUNE).batch(local)
    return iter(tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE)))
