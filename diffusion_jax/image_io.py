"""Files people open: uint8 conversion, sample grids, PNG / npz / JSON, written atomically.

Every writer goes through a temporary file in the target folder and `os.replace`, so a process
killed mid-write leaves either the old file or the new one, never half of one. gs:// (any URL)
paths go through `etils.epath` as one object upload, which is atomic on cloud object stores.
"""

import contextlib
import io
import json
import math
import os
import shutil
import tempfile
import threading
import zipfile
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

import numpy as np
from etils import epath
from PIL import Image


class ArrayFileError(ValueError):
    """An .npy/.npz that is not what its header says: not arrays, pickles, or a size it lacks."""


def to_uint8(images: Any) -> np.ndarray:
    """[-1, 1] floats -> uint8 via round((x + 1) * 127.5), clipped to 0..255 (same shape)."""
    x = np.asarray(images, dtype=np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 [..., C] in 0..255 -> float32 in [-1, 1] (x / 127.5 - 1); inverts `to_uint8`."""
    return images.astype(np.float32) / 127.5 - 1.0


def make_grid(
    images: np.ndarray, *, ncol: int | None = None, padding: int = 2, pad_value: int = 255
) -> np.ndarray:
    """Tiles uint8 images [N, H, W, C] into one image [rows*(H+p)+p, ncol*(W+p)+p, C].

    Rows are filled left to right; empty cells of the last row keep `pad_value`.
    """
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f'expected uint8 images [N, H, W, C], got {images.dtype} {images.shape}')
    n, h, w, c = images.shape
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    nrow = math.ceil(n / ncol)
    grid = np.full(
        (nrow * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, np.uint8
    )
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = images[i]
    return grid


def rows_by_class(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, int | None]:
    """(images reordered for a grid with one row per class, its column count).

    Row k holds the first m images of the k-th smallest label present, in index order, m being
    the count of the rarest one. Images of one class only are returned as they are, with None
    (a square grid).

    Args:
      images: [N, H, W, C].
      labels: [N] class ids.
    """
    classes = np.unique(labels)
    if len(classes) < 2:
        return images, None
    per_class = min(int(np.sum(labels == k)) for k in classes)
    order = np.concatenate([np.flatnonzero(labels == k)[:per_class] for k in classes])
    return images[order], per_class


def is_url(path: str) -> bool:
    """Whether `path` names a remote file system location such as gs://bucket/dir."""
    return '://' in str(path)


@contextlib.contextmanager
def atomic_open(path: str) -> Iterator[BinaryIO]:
    """A binary file to write `path` through: it appears, whole, only when the block ends.

    Locally the data goes to a temporary file in the same folder, fsynced, then `os.replace`d
    over `path`. A URL (gs://...) is written to a local temporary file first and then uploaded
    as one object through `etils.epath`: cloud object stores publish an object only once its
    upload is complete, so readers see the old or the new one. An exception in the block leaves
    `path` as it was.
    """
    remote = is_url(path)
    folder = tempfile.gettempdir() if remote else os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() obeys the umask
        with os.fdopen(fd, 'w+b') as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            if remote:
                f.seek(0)
                target = epath.Path(path)
                target.parent.mkdir(parents=True, exist_ok=True)
                with target.open('wb') as out:
                    shutil.copyfileobj(f, out)
        if not remote:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask (read by setting it and putting it back, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to `path` atomically (`atomic_open`)."""
    with atomic_open(path) as f:
        f.write(data)


def save_png(path: str, image: np.ndarray, *, scale: int = 1) -> None:
    """Saves uint8 [H, W, C] (C = 1 or 3) as a PNG, upscaled `scale` times (nearest)."""
    if scale > 1:
        image = image.repeat(scale, axis=0).repeat(scale, axis=1)
    if image.shape[-1] == 1:
        image = image[..., 0]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format='PNG')
    atomic_write_bytes(path, buf.getvalue())


def save_grid(
    path: str, images: np.ndarray, *, ncol: int | None = None, size: int = 512
) -> np.ndarray:
    """Saves uint8 images [N, H, W, C] as one PNG grid, upscaled (nearest) to about `size` px.

    Small images (8x8 digits) would be a thumbnail otherwise. Returns the grid before upscaling.
    """
    grid = make_grid(images, ncol=ncol)
    save_png(path, grid, scale=max(1, size // max(grid.shape[:2])))
    return grid


def save_npz(path: str, **arrays: np.ndarray) -> None:
    """Saves arrays to an .npz atomically."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def save_json(path: str, obj: Any) -> None:
    """Saves a JSON-able object atomically, indented for people."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + '\n').encode())


def save_npz_rows(
    path: str,
    name: str,
    shape: tuple[int, ...],
    dtype: Any,
    chunks: Iterable[np.ndarray],
    **small: np.ndarray,
) -> None:
    """Writes an .npz holding array `name` [shape] from its row chunks, atomically.

    The chunks (arrays [n_i, *shape[1:]] whose n_i add up to shape[0]) are written one after
    the other into the archive's .npy member (ZIP64, uncompressed, as `np.savez` writes it), so
    the whole array is never in memory. `small` arrays are stored beside it whole.
    `np.load(path)[name]` reads it back.

    Raises:
      ValueError: when a chunk has another row shape, or the rows do not add up to shape[0].
    """
    dtype = np.dtype(dtype)
    header = {'descr': np.lib.format.dtype_to_descr(dtype), 'fortran_order': False}
    rows = 0
    with (
        atomic_open(path) as f,
        zipfile.ZipFile(f, 'w', zipfile.ZIP_STORED) as archive,
        archive.open(name + '.npy', 'w', force_zip64=True) as member,
    ):
        np.lib.format.write_array_header_1_0(member, {**header, 'shape': tuple(shape)})
        for chunk in chunks:
            if chunk.shape[1:] != tuple(shape[1:]):
                raise ValueError(f'chunk of shape {chunk.shape} for rows of {shape[1:]}')
            rows += chunk.shape[0]
            member.write(np.ascontiguousarray(chunk, dtype).tobytes())
        if rows != shape[0]:
            raise ValueError(f'the chunks hold {rows} rows, not {shape[0]}')
        member.close()
        for key, value in small.items():
            with archive.open(key + '.npy', 'w') as extra:
                np.lib.format.write_array(extra, np.asarray(value), allow_pickle=False)


def iter_npz_rows(path: str, name: str, rows: int) -> Iterator[np.ndarray]:
    """Array `name` of an .npz in consecutive chunks of `rows` rows (the last may be shorter).

    Reads the file as it goes: memory holds one chunk, whatever the array's size.
    """
    with (
        epath.Path(path).open('rb') as f,
        zipfile.ZipFile(f) as archive,
        archive.open(name + '.npy') as member,
    ):
        shape, fortran, dtype = _npy_header(member, f'{path}: {name}')
        if fortran or not shape:
            raise ValueError(f'{path}: {name} is not a C-ordered array of rows')
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        for start in range(0, shape[0], rows):
            count = min(rows, shape[0] - start)
            data = member.read(count * row_bytes)
            if len(data) != count * row_bytes:
                raise ValueError(f'{path}: {name} ends after {start} of {shape[0]} rows')
            yield np.frombuffer(data, dtype).reshape(count, *shape[1:]).copy()


def load_npz_rows(path: str, name: str, stop: int | None = None) -> np.ndarray:
    """Rows [0, stop) of array `name` of an .npz (all rows for None), reading no more of it."""
    if stop is not None:
        return next(iter_npz_rows(path, name, max(stop, 1)))[:stop]
    return np.concatenate(list(iter_npz_rows(path, name, 1 << 30)))


def array_names(path: str) -> list[str]:
    """The array names of an .npz (without '.npy'), or [''] for an .npy file."""
    with epath.Path(path).open('rb') as f:
        if f.read(6) == b'\x93NUMPY':
            return ['']
        f.seek(0)
        with _zip(f, path) as archive:
            return [_member_name(path, name) for name in archive.namelist()]


def load_arrays(path: str, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Arrays `names` (all for None) of an .npz, or {'': array} of an .npy, checked as read.

    Unlike `np.load`, nothing is allocated before the header is checked against the bytes that
    are there: a header that claims 10^12 images, a member that is not an array, an object
    array (a pickle) or a truncated member raises `ArrayFileError` naming the member.
    """
    with epath.Path(path).open('rb') as f:
        if f.read(6) == b'\x93NUMPY':
            size = f.seek(0, os.SEEK_END)
            f.seek(0)
            return {'': _read_npy(f, size, str(path))}
        f.seek(0)
        with _zip(f, path) as archive:
            wanted = None if names is None else set(names)
            arrays = {}
            for info in archive.infolist():
                name = _member_name(path, info.filename)  # every member must be an array
                if wanted is None or name in wanted:
                    with archive.open(info) as member:
                        what = f'{path}: array {name!r}'
                        arrays[name] = _read_npy(member, info.file_size, what)
            return arrays


def _zip(f: BinaryIO, path: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(f)
    except zipfile.BadZipFile as e:
        raise ArrayFileError(f'{path} is neither an .npz nor an .npy file ({e})') from None


def _member_name(path: str, filename: str) -> str:
    if not filename.endswith('.npy'):
        raise ArrayFileError(f'{path}: member {filename!r} is not an array (.npy)')
    return filename[: -len('.npy')]


def _read_npy(stream: BinaryIO, size: int, what: str) -> np.ndarray:
    """The array of the .npy of `size` bytes at `stream`'s start, after checking its header."""
    shape, fortran, dtype = _npy_header(stream, what)
    if dtype.hasobject:
        raise ArrayFileError(f'{what} holds Python objects (a pickle), which are not read')
    nbytes = math.prod(shape) * dtype.itemsize
    if size - stream.tell() != nbytes:
        raise ArrayFileError(
            f'{what}: its header claims {dtype} {list(shape)} ({nbytes:,} bytes) but it holds '
            f'{size - stream.tell():,} bytes of data'
        )
    data = np.frombuffer(stream.read(nbytes), dtype)
    return data.reshape(shape, order='F' if fortran else 'C').copy()


def _npy_header(stream: BinaryIO, what: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) from the .npy header at `stream`'s position."""
    try:
        version = np.lib.format.read_magic(stream)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(version)
        if read_header is None:
            raise ValueError(f'.npy format {version}; expected 1.0 or 2.0')
        return read_header(stream)
    except ValueError as e:
        raise ArrayFileError(f'{what} has no valid .npy header ({e})') from None
