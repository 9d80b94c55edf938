"""Input pipeline: a dataset -> per-host iterators of NHWC float32 batches in [-1, 1].

DDPM (Ho et al. 2020, Sec. 3.3) scales 8-bit images linearly to [-1, 1]: `x = uint8 / 127.5 - 1`.
`config.data.dataset` picks the source:

* 'digits': scikit-learn's bundled 1,797 8x8 grey digits (no download). Their 17 levels 0..16 map
  to uint8 by `round(v * 255 / 16)`. Split 'train' is the first 1,500 images, 'test' the last 297.
* 'npz': `config.data.path` is an .npz (or .npy) holding uint8 [N, S, S, C] or [N, S, S]. The
  array is the one named like the split ('train', 'test'), else 'images', else the only array.
* 'folder': `config.data.path` is a folder of PNG/JPEG files, searched recursively in sorted order;
  `<path>/<split>/` is used when it exists, else the whole folder serves every split. Each image is
  center-cropped to a square and resized with Pillow's bicubic filter (antialiased when shrinking).
* anything else: a tensorflow-datasets image dataset, read from `config.data.data_dir` (None:
  $TFDS_DATA_DIR or tfds' default); it must have been prepared beforehand, nothing is downloaded.
  Images of another size (LSUN, CelebA-HQ) are center-cropped and resized like 'folder' ones.

Exact resume: global batch s is a pure function of (seed, s) and the data, so the data state *is*
the step. For the in-memory sources the stream is the concatenation of epochs, epoch e being
`default_rng([seed, e]).permutation(N)`; global batch s is stream positions [sB, (s+1)B) and process
p takes the p-th contiguous slice of it. tfds datasets are read with per-host shards by a
deterministic tf.data pipeline; resuming at step k re-reads and discards k batches of encoded
images (not decoded): exact, but slower than a seek.

TensorFlow is imported lazily inside the tfds functions, so `import diffusion_jax` and every run on
a built-in source never load it; TensorFlow and tfds come with the `tfds` extra.
"""

import contextlib
import importlib
import itertools
import os
import warnings
from collections.abc import Iterator

import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import errors, image_io, random_access

BUILTIN_SOURCES = ('digits', 'folder', 'npz')
DIGITS_NUM_TEST = 297  # the last 297 digits are the held-out 'test' split
_IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
# Pillow's modes for 16-bit grey PNGs ('I' in older Pillow versions): values 0..65535.
_SIXTEEN_BIT_GREY = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')
_SHUFFLE_BUFFER = 10_000  # tf.data shuffle buffer, in examples, capped by _SHUFFLE_BYTES
_SHUFFLE_BYTES = 1 << 30


class DatasetError(errors.UserError, ValueError):
    """A data problem the user can fix; the message names the dataset and the fix."""


def load_images(data_config: ml_collections.ConfigDict, split: str) -> np.ndarray:
    """Loads a whole split of an in-memory source ('digits', 'npz' or 'folder').

    Args:
        data_config: `config.data`.
        split: split name, e.g. 'train' or 'test'.

    Returns:
        uint8 [N, S, S, C] with S = data_config.image_size, C = data_config.num_channels.
    """
    loaders = {'digits': _load_digits, 'npz': _load_npz, 'folder': _load_folder}
    name = data_config.dataset
    if name not in loaders:
        raise DatasetError(
            f'load_images reads only the in-memory sources {sorted(loaders)}; {name!r} is read by '
            'train_iterator / eval_iterator through tensorflow-datasets'
        )
    return loaders[name](data_config, split)


def _load_digits(data_config: ml_collections.ConfigDict, split: str) -> np.ndarray:
    from sklearn import datasets  # lazy: scikit-learn is slow to import

    if data_config.image_size != 8 or data_config.num_channels != 1:
        raise DatasetError(
            f"dataset 'digits' has 8x8 grey images, but data.image_size={data_config.image_size} "
            f'and data.num_channels={data_config.num_channels}; set --config.data.image_size=8 '
            '--config.data.num_channels=1 (or use configs/digits.py)'
        )
    raw = datasets.load_digits().images  # [1797, 8, 8] float64, values 0..16
    splits = {'train': raw[:-DIGITS_NUM_TEST], 'test': raw[-DIGITS_NUM_TEST:]}
    if split not in splits:
        raise DatasetError(
            f"dataset 'digits' has splits {sorted(splits)}, not {split!r}; "
            "set --config.data.train_split='train' / --config.data.eval_split='test'"
        )
    return np.round(splits[split] * 255 / 16).astype(np.uint8)[..., None]


def _require_path(data_config: ml_collections.ConfigDict) -> str:
    if not data_config.path:
        raise DatasetError(
            f'dataset {data_config.dataset!r} reads from data.path, which is not set; '
            'pass --config.data.path=...'
        )
    return os.path.expanduser(data_config.path)


def _check_images(images: np.ndarray, data_config: ml_collections.ConfigDict, what: str) -> None:
    """Raises DatasetError unless images is uint8 [N, S, S, C] matching the config."""
    size, channels = data_config.image_size, data_config.num_channels
    expected = f'uint8 [N, {size}, {size}, {channels}]'
    shape = images.shape
    if images.dtype != np.uint8 or len(shape) != 4 or not shape[0] or shape[1] != shape[2]:
        raise DatasetError(
            f'{what}: found {images.dtype} {list(shape)}, expected {expected} '
            '(N >= 1 square images as 0..255 integers, channels last)'
        )
    _, h, w, c = shape
    if h != size:
        raise DatasetError(
            f'{what}: found {h}x{w} images but data.image_size={size} (expected {expected}); '
            f'set --config.data.image_size={h} or resize the data'
        )
    if c != channels:
        raise DatasetError(
            f'{what}: found {c} channels but data.num_channels={channels} (expected '
            f'{expected}); set --config.data.num_channels={c}'
        )


def _load_npz(data_config: ml_collections.ConfigDict, split: str) -> np.ndarray:
    path = _require_path(data_config)
    what = f"dataset 'npz' file {path}"
    if not os.path.isfile(path):
        raise DatasetError(f'{what} does not exist; check --config.data.path')
    try:
        keys = image_io.array_names(path)
        key = split if split in keys else 'images' if 'images' in keys else None
        if key is None and len(keys) == 1:
            key = keys[0]  # an .npy, or an .npz of one array
        if key is None:
            raise DatasetError(
                f"{what} holds arrays {keys}; name the images 'images' (or {split!r})"
            )
        loaded = image_io.load_arrays(path, [key])[key]
    except (OSError, image_io.ArrayFileError) as e:
        raise DatasetError(f'{what} is not a readable .npz/.npy without pickles: {e}') from None
    images = loaded[..., None] if loaded.ndim == 3 else loaded
    _check_images(images, data_config, what)
    return images


def _load_folder(data_config: ml_collections.ConfigDict, split: str) -> np.ndarray:
    root = _require_path(data_config)
    if not os.path.isdir(root):
        raise DatasetError(f"dataset 'folder': {root} is not a folder; check --config.data.path")
    if os.path.isdir(os.path.join(root, split)):
        root = os.path.join(root, split)
    size, channels = data_config.image_size, data_config.num_channels
    if channels not in (1, 3):
        raise DatasetError(
            f"dataset 'folder' reads RGB or grey images, not data.num_channels={channels}; "
            'set --config.data.num_channels=3 (or 1)'
        )
    images = _read_images(_image_paths(root), size, 'L' if channels == 1 else 'RGB')
    if not images:
        raise DatasetError(
            f"dataset 'folder': no PNG/JPEG images found in {root}; check --config.data.path"
        )
    return np.stack(images).reshape(-1, size, size, channels)


def _image_paths(root: str) -> list[str]:
    """The PNG/JPEG regular files under `root`, sorted; warns about what it leaves out.

    A FIFO, socket or device named like an image is left out: opening one would block or read
    forever.
    """
    paths = sorted(os.path.join(folder, f) for folder, _, files in os.walk(root) for f in files)
    named = [p for p in paths if p.lower().endswith(_IMAGE_EXTENSIONS)]
    if skipped := len(paths) - len(named):
        logging.warning("dataset 'folder': skipped %d non-PNG/JPEG files in %s", skipped, root)
    regular = [p for p in named if os.path.isfile(p)]
    if odd := sorted(set(named) - set(regular)):
        message = "dataset 'folder': skipped %d entries that are not regular files, e.g. %s"
        logging.warning(message, len(odd), odd[0])
    return regular


def _read_images(paths: list[str], size: int, mode: str) -> list[np.ndarray]:
    """`_read_image` of each path; broken and oversized files are skipped with a warning."""
    images, unreadable, too_large = [], [], []
    for path in paths:
        try:
            images.append(_read_image(path, size, mode))
        except _TooLargeError as e:
            too_large.append(f'{path} ({e})')
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for broken files
            unreadable.append(f'{path} ({e})')
    if unreadable:
        message = "dataset 'folder': skipped %d unreadable image files, e.g. %s"
        logging.warning(message, len(unreadable), unreadable[0])
    if too_large:
        message = (
            "dataset 'folder': skipped %d images over Pillow's decompression-bomb limit of %s "
            'pixels (PIL.Image.MAX_IMAGE_PIXELS), e.g. %s; downscale them first'
        )
        logging.warning(message, len(too_large), f'{_max_pixels():,}', too_large[0])
    return images


class _TooLargeError(Exception):
    """An image whose header claims more pixels than Pillow's decompression-bomb limit."""


def _max_pixels() -> int:
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS or 2**63


def _read_image(path: str, size: int, mode: str) -> np.ndarray:
    """Center-crops the image at `path` to a square; bicubic resize to size x size; uint8.

    16-bit grey PNGs are scaled to 8 bits (v / 257, rounded) before `mode` is applied; Pillow's
    own conversion would clip every value over 255 to white. An image over Pillow's
    decompression-bomb limit raises `_TooLargeError` before any pixel is decoded.
    """
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)  # checked just below
        try:
            opened = Image.open(path)
        except Image.DecompressionBombError as e:
            raise _TooLargeError(str(e).split('.')[0]) from None
    with opened as image:
        if image.width * image.height > _max_pixels():
            raise _TooLargeError(f'{image.width}x{image.height} pixels')
        if image.mode in _SIXTEEN_BIT_GREY:
            wide = np.asarray(image, dtype=np.float64)
            image = Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8))
        image = image.convert(mode)  # decodes the whole file, raising if it is broken
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    image = image.crop((left, top, left + s, top + s))
    if s != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def _local_batch_size(batch_size: int, process_index: int, process_count: int, key: str) -> int:
    if not 0 <= process_index < process_count:
        raise ValueError(f'process_index={process_index} not in [0, {process_count})')
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(
            f'{key}={batch_size} must be a positive multiple of the {process_count} processes'
        )
    return batch_size // process_count


def train_iterator(
    data_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Infinite training batches, from global batch `start_step` on.

    Global batch s depends only on (seed, s) and the data, so a run resumed at `start_step` sees
    the same batches as one started at 0. Process p yields the p-th contiguous slice of each
    global batch (in-memory sources) or a batch of its own tfds shard (tfds datasets).

    Args:
        data_config: `config.data`.
        global_batch_size: B, the batch summed over all processes.
        seed: data seed (shuffling and flips); non-negative.
        start_step: index of the first global batch to yield.
        process_index: this process, in [0, process_count).
        process_count: number of processes; must divide B.

    Yields:
        {'image': float32 [B // process_count, S, S, C] in [-1, 1]}.
    """
    local = _local_batch_size(
        global_batch_size, process_index, process_count, 'config.training.batch_size'
    )
    if seed < 0 or start_step < 0:
        raise ValueError(f'seed={seed} and start_step={start_step} must be >= 0')
    offset = process_index * local
    if data_config.dataset in BUILTIN_SOURCES:
        _builtin_loader(data_config)
        images = load_images(data_config, data_config.train_split)
        return _numpy_train(images, global_batch_size, local, offset, seed, start_step, data_config)
    if _tfds_loader(data_config) == 'tfdata':
        return _tfds_train(data_config, local, seed, start_step, process_index, process_count)
    source, decode = _tfds_source(data_config, data_config.train_split)
    indices = random_access.StreamIndices(len(source), global_batch_size, local, offset, seed)
    return random_access.grain_batches(
        source, indices, start_step, decode, random_flip=data_config.random_flip
    )


def _numpy_train(images, batch, local, offset, seed, start_step, data_config):
    """Yields the slice [offset, offset + local) of every global batch of the stateless stream."""
    indices = random_access.StreamIndices(len(images), batch, local, offset, seed)
    for step in itertools.count(start_step):
        flips = indices.flips(step) if data_config.random_flip else None
        yield random_access.assemble(images[indices(step)], flips)  # [local, S, S, C]


def eval_iterator(
    data_config: ml_collections.ConfigDict,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    num_examples: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over `data_config.eval_split`, in order, without flips.

    The split is cut into `process_count` contiguous shards whose sizes differ by at most one
    (tfds.even_splits); process p reads shard p. No padding: the last batch may be smaller, and
    shards may differ by one example, so multi-process callers that need equal shapes should pass
    a `num_examples` that is a multiple of `batch_size` and at most the split size.

    Args:
        data_config: `config.data`.
        batch_size: global eval batch; each process yields batch_size // process_count.
        process_index: this process, in [0, process_count).
        process_count: number of processes; must divide batch_size.
        num_examples: evaluate only this many examples in total (each process takes its even
            share from the start of its shard); None: the whole split.

    Yields:
        {'image': float32 [b, S, S, C] in [-1, 1]} with b <= batch_size // process_count.
    """
    local = _local_batch_size(batch_size, process_index, process_count, 'config.eval.batch_size')
    share = None
    if num_examples is not None:
        share = num_examples // process_count + (process_index < num_examples % process_count)
    if data_config.dataset in BUILTIN_SOURCES:
        _builtin_loader(data_config)
        images = load_images(data_config, data_config.eval_split)
        read = images.__getitem__
    elif _tfds_loader(data_config) == 'tfdata':
        return _tfds_eval(data_config, local, process_index, process_count, share)
    else:
        images, decode = _tfds_source(data_config, data_config.eval_split)

        def read(rows: slice) -> np.ndarray:
            return np.stack([decode(images[i]) for i in range(rows.start, rows.stop)])

    n = len(images)
    start = process_index * (n // process_count) + min(process_index, n % process_count)
    stop = start + n // process_count + (process_index < n % process_count)
    if share is not None:
        stop = min(stop, start + share)
    rows = (slice(i, min(i + local, stop)) for i in range(start, stop, local))
    return ({'image': image_io.to_float(read(part))} for part in rows)


def _builtin_loader(data_config: ml_collections.ConfigDict) -> None:
    """Refuses data.loader 'tfdata' for the in-memory sources, which tf.data does not read."""
    if data_config.loader == 'tfdata':
        raise DatasetError(
            f"data.loader 'tfdata' reads tensorflow-datasets datasets; {data_config.dataset!r} "
            'is read in memory: use --config.data.loader=auto'
        )


def _tfds_loader(data_config: ml_collections.ConfigDict) -> str:
    """'grain' or 'tfdata' for a tfds dataset: `data.loader`, or for 'auto' its file format.

    'auto' reads ArrayRecord datasets (random access) with grain when grain is installed, and
    TFRecord datasets (sequential only) with tf.data.
    """
    if data_config.loader != 'auto':
        return data_config.loader
    builder = _tfds_builder(data_config, tensorflow=False)
    if str(builder.info.file_format).lower().endswith('array_record'):
        try:
            import grain  # noqa: F401

            return 'grain'
        except ImportError:
            logging.warning('grain is not installed: reading the ArrayRecord data with tf.data')
    return 'tfdata'


def _tfds_source(data_config: ml_collections.ConfigDict, split: str):
    """(random-access source of `split`, record -> uint8 [S, S, C]) over a tfds ArrayRecord set."""
    builder = _tfds_builder(data_config, tensorflow=False)
    import tensorflow_datasets as tfds

    if not str(builder.info.file_format).lower().endswith('array_record'):
        raise DatasetError(
            f"data.loader 'grain' needs random access, but tfds dataset {data_config.dataset!r} "
            f'is stored as {builder.info.file_format}: prepare it as ArrayRecord (tfds build '
            f'{data_config.dataset} --file_format=array_record, see launch/README.md) or use '
            '--config.data.loader=tfdata'
        )
    try:
        source = tfds.data_source(data_config.dataset, split=split, data_dir=data_config.data_dir)
    except (ValueError, KeyError) as e:
        raise DatasetError(
            f'tfds dataset {data_config.dataset!r} cannot read split {split!r} ({e}); its '
            f'splits are {sorted(builder.info.splits)}'
        ) from None
    size = data_config.image_size
    return source, lambda record: _square(record['image'], size)


def _square(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, C] -> [size, size, C]: center square crop, bicubic resize (Pillow)."""
    from PIL import Image

    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    square = image[top : top + s, left : left + s]
    if s == size:
        return square
    grey = square.shape[-1] == 1
    resized = Image.fromarray(square[..., 0] if grey else square).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    out = np.asarray(resized, np.uint8)
    return out[..., None] if grey else out


def _tfds_builder(data_config: ml_collections.ConfigDict, *, tensorflow: bool = True):
    """tfds.builder for data_config.dataset, with DatasetError for unknown names.

    `tensorflow=False` (the grain reader's) needs tensorflow-datasets only, not TensorFlow.
    """
    try:  # lazy: the package must not load TF
        import tensorflow_datasets as tfds

        tf = importlib.import_module('tensorflow') if tensorflow else None
    except ImportError as e:
        raise DatasetError(
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
        builder = tfds.builder(name, data_dir=data_config.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DatasetError(
            f'unknown dataset {name!r}: data.dataset is one of the built-in sources '
            f'{list(BUILTIN_SOURCES)} or the name of any tensorflow-datasets image dataset, '
            "e.g. 'cifar10', 'celeb_a_hq/256', 'lsun/church_outdoor' "
            '(https://www.tensorflow.org/datasets/catalog)'
        ) from None
    except ValueError as e:  # e.g. an unknown config in 'name/config'
        raise DatasetError(f'tfds cannot build dataset {name!r}: {e}') from None
    features = builder.info.features  # a FeaturesDict: supports `in`, not .get
    if 'image' not in features or len(features['image'].shape) != 3:
        raise DatasetError(f"tfds dataset {name!r} has no 'image' feature of shape [H, W, C]")
    channels = features['image'].shape[-1]
    if channels is not None and channels != data_config.num_channels:
        raise DatasetError(
            f'tfds dataset {name!r} has {channels}-channel images but data.num_channels='
            f'{data_config.num_channels}; set --config.data.num_channels={channels}'
        )
    return builder


def _not_prepared_message(name: str, builder) -> str:
    return (
        f'tfds dataset {name!r} is not prepared: no data in {builder.data_dir}. Training never '
        'downloads. On a machine with internet run\n'
        f'  python -c "import tensorflow_datasets as tfds; tfds.builder({name!r}, '
        f"data_dir='DIR').download_and_prepare()\"   (or: tfds build {name} --data_dir=DIR)\n"
        'For manual-download datasets (e.g. celeb_a_hq) first place the files tfds asks for in '
        'DIR/downloads/manual/. Then copy DIR here and pass --config.data.data_dir=DIR or set '
        'TFDS_DATA_DIR=DIR.'
    )


def _tfds_split(builder, data_config, key: str, index: int, count: int, seed: int | None):
    """This process's shard of data_config.<key> as encoded image bytes (decoded later).

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
        ds = builder.as_dataset(
            split=host_split,
            shuffle_files=seed is not None,
            read_config=read_config,
            decoders={'image': tfds.decode.SkipDecoding()},
        )
    except AssertionError:  # tfds' signal for "download_and_prepare() was never run"
        raise DatasetError(_not_prepared_message(name, builder)) from None
    except (ValueError, KeyError) as e:
        raise DatasetError(
            f'tfds dataset {name!r} cannot read split {split!r} ({e}); its splits are '
            f'{sorted(builder.info.splits)}: set --config.data.{key}=...'
        ) from None
    return ds.with_options(options).map(lambda example: example['image'])


def _tf_decode(builder, encoded, size: int):
    """Encoded image -> uint8 [size, size, C]: center square crop, then antialiased bicubic."""
    import tensorflow as tf

    image = builder.info.features['image'].decode_example(encoded)
    if image.shape[0] == size and image.shape[1] == size:
        return image
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    s = tf.minimum(h, w)
    square = tf.image.crop_to_bounding_box(image, (h - s) // 2, (w - s) // 2, s, s)

    def resize():
        resized = tf.image.resize(square, [size, size], method='bicubic', antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

    return tf.ensure_shape(tf.cond(tf.equal(s, size), lambda: square, resize), [size, size, None])


def _tfds_train(data_config, local, seed, start_step, process_index, process_count):
    builder = _tfds_builder(data_config)  # first: it says which extra a missing TF needs
    import tensorflow as tf
    import tensorflow_datasets as tfds

    seed = seed % (1 << 31)
    ds = _tfds_split(builder, data_config, 'train_split', process_index, process_count, seed)
    # Shuffle the encoded bytes; decoded bytes per image bound their size.
    stored = builder.info.features['image'].shape
    size, channels = data_config.image_size, data_config.num_channels
    image_bytes = np.prod(stored) if None not in stored else size * size * channels
    buffer = int(max(1, min(_SHUFFLE_BUFFER, _SHUFFLE_BYTES // image_bytes)))
    ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    # Resume replays the reading and shuffling of start_step batches but skips them before
    # decoding: exact, and much cheaper than decoding, though slower than a seek.
    ds = ds.enumerate().skip(start_step * local)

    def to_element(index, encoded):
        image = _tf_decode(builder, encoded, size)
        if data_config.random_flip:
            # Seeded by the element's position in this host's stream: resume-exact.
            position = index * process_count + process_index
            flip_seed = tf.stack([tf.constant(seed, tf.int64), position])
            image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
        return {'image': tf.cast(image, tf.float32) / 127.5 - 1.0}

    ds = ds.map(to_element, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return iter(tfds.as_numpy(ds))


def _tfds_eval(data_config, local, process_index, process_count, share):
    builder = _tfds_builder(data_config)  # first: it says which extra a missing TF needs
    import tensorflow as tf
    import tensorflow_datasets as tfds

    ds = _tfds_split(builder, data_config, 'eval_split', process_index, process_count, None)
    if share is not None:
        ds = ds.take(share)

    def to_element(encoded):
        image = _tf_decode(builder, encoded, data_config.image_size)
        return {'image': tf.cast(image, tf.float32) / 127.5 - 1.0}

    ds = ds.map(to_element, num_parallel_calls=tf.data.AUTOTUNE).batch(local)
    return iter(tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE)))
