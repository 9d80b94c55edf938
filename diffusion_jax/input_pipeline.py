"""Input pipeline: a dataset -> per-host iterators of NHWC float32 batches in [-1, 1].

DDPM (Ho et al. 2020, Sec. 3.3) scales 8-bit images linearly to [-1, 1]: `x = uint8 / 127.5 - 1`.
`config.data.dataset` picks the source:

* 'digits': scikit-learn's bundled 1,797 8x8 grey digits (no download). Their 17 levels 0..16 map
  to uint8 by `round(v * 255 / 16)`. Split 'train' is the first 1,500 images, 'test' the last 297.
  Labels: the digit.
* 'npz': `config.data.path` is an .npz (or .npy) holding uint8 [N, S, S, C] or [N, S, S]. The
  array is the one named like the split ('train', 'test'), else 'images', else the only array.
  Labels: an optional int array [N], `<split>_labels` beside a split-named array, else `labels`.
* 'folder': `config.data.path` is a folder of PNG/JPEG files, searched recursively in sorted order;
  `<path>/<split>/` is used when it exists, else the whole folder serves every split. Each image is
  center-cropped to a square and resized with Pillow's bicubic filter (antialiased when shrinking).
  Labels: one subfolder per class, class i being the i-th subfolder name in sorted order
  (`class_names`; training saves the mapping as WORKDIR/classes.json).
* anything else: a tensorflow-datasets image dataset (`tfds_data`), read from
  `config.data.data_dir` (None: $TFDS_DATA_DIR or tfds' default); it must have been prepared
  beforehand, nothing is downloaded. Labels: its `label` feature.

Batches are {'image': float32 [b, S, S, C]}, plus 'label': int32 [b] when the iterators are given
`num_classes` > 0 (a class-conditional model); a source without labels, or with a label outside
[0, num_classes), is then refused in one line.

Exact resume: global batch s is a pure function of (seed, s) and the data, so the data state *is*
the step. For the in-memory sources the stream is the concatenation of epochs, epoch e being
`default_rng([seed, e]).permutation(N)`; global batch s is stream positions [sB, (s+1)B) and process
p takes the p-th contiguous slice of it. tfds datasets are read with per-host shards by a
deterministic tf.data pipeline; resuming at step k re-reads and discards k batches of encoded
images (not decoded): exact, but slower than a seek.

TensorFlow is imported lazily inside `tfds_data`, so `import diffusion_jax` and every run on a
built-in source never load it; TensorFlow and tfds come with the `tfds` extra.
"""

import itertools
import os
import warnings
from collections.abc import Iterator

import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import errors, image_io, random_access, tfds_data

BUILTIN_SOURCES = tfds_data.BUILTIN_SOURCES
DIGITS_NUM_TEST = 297  # the last 297 digits are the held-out 'test' split
_IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
# Pillow's modes for 16-bit grey PNGs ('I' in older Pillow versions): values 0..65535.
_SIXTEEN_BIT_GREY = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')
DatasetError = errors.DatasetError
Labelled = tuple[np.ndarray, np.ndarray | None]  # (uint8 images [N, S, S, C], int32 labels [N])


def load_split(data_config: ml_collections.ConfigDict, split: str) -> Labelled:
    """Loads a whole split of an in-memory source ('digits', 'npz' or 'folder').

    Args:
        data_config: `config.data`.
        split: split name, e.g. 'train' or 'test'.

    Returns:
        (uint8 [N, S, S, C] with S = data_config.image_size, C = data_config.num_channels;
        int32 [N] class labels, or None when the source has none).
    """
    loaders = {'digits': _load_digits, 'npz': _load_npz, 'folder': _load_folder}
    name = data_config.dataset
    if name not in loaders:
        raise DatasetError(
            f'load_images reads only the in-memory sources {sorted(loaders)}; {name!r} is read by '
            'train_iterator / eval_iterator through tensorflow-datasets'
        )
    return loaders[name](data_config, split)


def load_images(data_config: ml_collections.ConfigDict, split: str) -> np.ndarray:
    """The images of `load_split`: uint8 [N, S, S, C]."""
    return load_split(data_config, split)[0]


def load_labelled(data_config: ml_collections.ConfigDict, split: str, num_classes: int) -> Labelled:
    """`load_split`, with labels required when `num_classes` > 0 and checked in [0, K)."""
    images, labels = load_split(data_config, split)
    if num_classes:
        check_labels(labels, num_classes, f'dataset {data_config.dataset!r} split {split!r}')
    return images, labels if num_classes else None


def check_labels(labels: np.ndarray | None, num_classes: int, what: str) -> None:
    """Refuses missing labels, or labels outside [0, num_classes), in one line."""
    if labels is None:
        raise DatasetError(
            f'{what} has no class labels, but model.num_classes={num_classes} makes the model '
            "class-conditional: give 'npz' a labels array, put 'folder' images in one subfolder "
            'per class, or train unconditionally (--config.model.num_classes=0)'
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(
            f'{what} has labels from {int(labels.min())} to {int(labels.max())}, outside the '
            f"model's classes 0 to {num_classes - 1}; set "
            f'--config.model.num_classes={int(labels.max()) + 1}'
        )


def class_names(data_config: ml_collections.ConfigDict, split: str) -> list[str] | None:
    """The name of each class id: digits' digits, 'folder''s subfolders, tfds' label names.

    None where the source names no classes ('npz') or has none.
    """
    if data_config.dataset == 'digits':
        return [str(d) for d in range(10)]
    if data_config.dataset == 'folder':
        root = _split_root(data_config, split)
        return _folder_classes(root, _image_paths(root))
    if data_config.dataset == 'npz':
        return None
    features = tfds_data.builder(data_config, tensorflow=False).info.features
    return list(features['label'].names) if 'label' in features else None


def _load_digits(data_config: ml_collections.ConfigDict, split: str) -> Labelled:
    from sklearn import datasets  # lazy: scikit-learn is slow to import

    if data_config.image_size != 8 or data_config.num_channels != 1:
        raise DatasetError(
            f"dataset 'digits' has 8x8 grey images, but data.image_size={data_config.image_size} "
            f'and data.num_channels={data_config.num_channels}; set --config.data.image_size=8 '
            '--config.data.num_channels=1 (or use configs/digits.py)'
        )
    bunch = datasets.load_digits()  # images [1797, 8, 8] float64 in 0..16, target [1797]
    splits = {'train': slice(None, -DIGITS_NUM_TEST), 'test': slice(-DIGITS_NUM_TEST, None)}
    if split not in splits:
        raise DatasetError(
            f"dataset 'digits' has splits {sorted(splits)}, not {split!r}; "
            "set --config.data.train_split='train' / --config.data.eval_split='test'"
        )
    rows = splits[split]
    images = np.round(bunch.images[rows] * 255 / 16).astype(np.uint8)[..., None]
    return images, bunch.target[rows].astype(np.int32)


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


def _npz_keys(keys: list[str], split: str, what: str) -> tuple[str, str]:
    """(the images' array name, the name its labels would have) in an archive of `keys`."""
    if split in keys:
        return split, f'{split}_labels'
    images = [k for k in keys if k != 'labels' and not k.endswith('_labels')]
    if 'images' in keys or len(images) == 1:
        return ('images' if 'images' in keys else images[0]), 'labels'  # or an .npy's one array
    raise DatasetError(f"{what} holds arrays {keys}; name the images 'images' (or {split!r})")


def _load_npz(data_config: ml_collections.ConfigDict, split: str) -> Labelled:
    path = _require_path(data_config)
    what = f"dataset 'npz' file {path}"
    if not os.path.isfile(path):
        raise DatasetError(f'{what} does not exist; check --config.data.path')
    try:
        keys = image_io.array_names(path)
        key, label_key = _npz_keys(keys, split, what)
        names = [key, label_key] if label_key in keys else [key]
        loaded = image_io.load_arrays(path, names)
    except (OSError, image_io.ArrayFileError) as e:
        raise DatasetError(f'{what} is not a readable .npz/.npy without pickles: {e}') from None
    images = loaded[key][..., None] if loaded[key].ndim == 3 else loaded[key]
    _check_images(images, data_config, what)
    labels = loaded.get(label_key)
    if labels is not None:
        if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(
                f'{what}: {label_key!r} must be integers [{len(images)}], one per image; found '
                f'{labels.dtype} {list(labels.shape)}'
            )
        labels = labels.astype(np.int32)
    return images, labels


def _split_root(data_config: ml_collections.ConfigDict, split: str) -> str:
    """The folder a 'folder' split reads: `<path>/<split>/` when it exists, else `<path>`."""
    root = _require_path(data_config)
    if not os.path.isdir(root):
        raise DatasetError(f"dataset 'folder': {root} is not a folder; check --config.data.path")
    return os.path.join(root, split) if os.path.isdir(os.path.join(root, split)) else root


def _folder_classes(root: str, paths: list[str]) -> list[str] | None:
    """The sorted subfolders of `root` holding `paths`; None if an image lies in `root`."""
    parts = [os.path.relpath(p, root).split(os.sep) for p in paths]
    if not parts or any(len(p) == 1 for p in parts):
        return None
    return sorted({p[0] for p in parts})


def _load_folder(data_config: ml_collections.ConfigDict, split: str) -> Labelled:
    root = _split_root(data_config, split)
    size, channels = data_config.image_size, data_config.num_channels
    if channels not in (1, 3):
        raise DatasetError(
            f"dataset 'folder' reads RGB or grey images, not data.num_channels={channels}; "
            'set --config.data.num_channels=3 (or 1)'
        )
    paths = _image_paths(root)
    images, kept = _read_images(paths, size, 'L' if channels == 1 else 'RGB')
    if not images:
        raise DatasetError(
            f"dataset 'folder': no PNG/JPEG images found in {root}; check --config.data.path"
        )
    classes, labels = _folder_classes(root, paths), None
    if classes is not None:
        ids = {name: i for i, name in enumerate(classes)}
        first = [os.path.relpath(paths[i], root).split(os.sep)[0] for i in kept]
        labels = np.asarray([ids[name] for name in first], np.int32)
    return np.stack(images).reshape(-1, size, size, channels), labels


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


def _read_images(paths: list[str], size: int, mode: str) -> tuple[list[np.ndarray], list[int]]:
    """(`_read_image` of each path, the indices of the paths read).

    Broken and oversized files are skipped with a warning.
    """
    images, kept, unreadable, too_large = [], [], [], []
    for index, path in enumerate(paths):
        try:
            images.append(_read_image(path, size, mode))
            kept.append(index)
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
    return images, kept


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
    num_classes: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Infinite training batches, from global batch `start_step` on.

    Global batch s depends only on (seed, s) and the data, so a run resumed at `start_step` sees
    the same batches as one started at 0. Process p yields the p-th contiguous slice of each
    global batch (in-memory sources and grain) or a batch of its own tfds shard (tf.data).

    Args:
        data_config: `config.data`.
        global_batch_size: B, the batch summed over all processes.
        seed: data seed (shuffling and flips); non-negative.
        start_step: index of the first global batch to yield.
        process_index: this process, in [0, process_count).
        process_count: number of processes; must divide B.
        num_classes: K > 0 adds each image's class label (`config.model.num_classes`).

    Yields:
        {'image': float32 [B // process_count, S, S, C] in [-1, 1]}, and 'label': int32
        [B // process_count] in [0, K) when K > 0.
    """
    local = _local_batch_size(
        global_batch_size, process_index, process_count, 'config.training.batch_size'
    )
    if seed < 0 or start_step < 0:
        raise ValueError(f'seed={seed} and start_step={start_step} must be >= 0')
    offset = process_index * local
    if data_config.dataset in BUILTIN_SOURCES:
        _builtin_loader(data_config)
        images, labels = load_labelled(data_config, data_config.train_split, num_classes)
        indices = random_access.StreamIndices(len(images), global_batch_size, local, offset, seed)
        return _numpy_train(images, labels, indices, start_step, data_config.random_flip)
    if tfds_data.loader(data_config) == 'tfdata':
        return tfds_data.train(
            data_config, local, seed, start_step, process_index, process_count, num_classes
        )
    records, decode, label = tfds_data.source(data_config, data_config.train_split, num_classes)
    indices = random_access.StreamIndices(len(records), global_batch_size, local, offset, seed)
    return random_access.grain_batches(
        records, indices, start_step, decode, random_flip=data_config.random_flip, label=label
    )


def _numpy_train(images, labels, indices, start_step: int, random_flip: bool):
    """Yields this process's rows of every global batch of the stateless stream."""
    for step in itertools.count(start_step):
        rows = indices(step)
        flips = indices.flips(step) if random_flip else None
        yield random_access.assemble(images[rows], flips, None if labels is None else labels[rows])


def eval_iterator(
    data_config: ml_collections.ConfigDict,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    num_examples: int | None = None,
    num_classes: int = 0,
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
        num_classes: K > 0 adds each image's class label, as `train_iterator`.

    Yields:
        {'image': float32 [b, S, S, C] in [-1, 1]} (and 'label': int32 [b] when K > 0) with
        b <= batch_size // process_count.
    """
    local = _local_batch_size(batch_size, process_index, process_count, 'config.eval.batch_size')
    share = None
    if num_examples is not None:
        share = num_examples // process_count + (process_index < num_examples % process_count)
    split = data_config.eval_split
    if data_config.dataset in BUILTIN_SOURCES:
        _builtin_loader(data_config)
        images, labels = load_labelled(data_config, split, num_classes)
        n = len(images)

        def read(rows: slice) -> dict[str, np.ndarray]:
            return random_access.assemble(
                images[rows], None, None if labels is None else labels[rows]
            )

    elif tfds_data.loader(data_config) == 'tfdata':
        return tfds_data.evaluate(
            data_config, local, process_index, process_count, share, num_classes
        )
    else:
        records, decode, label = tfds_data.source(data_config, split, num_classes)
        n = len(records)

        def read(rows: slice) -> dict[str, np.ndarray]:
            return random_access.read_rows(records, range(rows.start, rows.stop), decode, label)

    start = process_index * (n // process_count) + min(process_index, n % process_count)
    stop = start + n // process_count + (process_index < n % process_count)
    if share is not None:
        stop = min(stop, start + share)
    return (read(slice(i, min(i + local, stop))) for i in range(start, stop, local))


def _builtin_loader(data_config: ml_collections.ConfigDict) -> None:
    """Refuses data.loader 'tfdata' for the in-memory sources, which tf.data does not read."""
    if data_config.loader == 'tfdata':
        raise DatasetError(
            f"data.loader 'tfdata' reads tensorflow-datasets datasets; {data_config.dataset!r} "
            'is read in memory: use --config.data.loader=auto'
        )
