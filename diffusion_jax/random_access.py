"""Training batches by random access: the stateless stream's index rule and the grain reader.

Global batch s of a run holds positions [s B, (s + 1) B) of an endless stream that visits the
N examples once per epoch, epoch e in the order `default_rng([seed, e]).permutation(N)`.
Process p takes the contiguous slice [p b, (p + 1) b) of each global batch (b = B / processes).
So the examples of any step are computed, not replayed: a run resumed at step 10^6 reads exactly
the examples of that step, like one resumed at step 10.

Two readers share the rule: `input_pipeline` indexes in-memory arrays (digits, npz, folder)
with it, and `grain_batches` reads any random-access source (a tfds ArrayRecord dataset through
`tfds.data_source`, or an array) in grain's worker threads, decoding and resizing there.
"""

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from diffusion_jax import image_io

# grain reads this many batches ahead, each in its own thread.
GRAIN_THREADS = 8
GRAIN_PREFETCH_BATCHES = 16


class StreamIndices:
    """Which examples each global batch gives one process, and which of them are mirrored.

    Only the permutations of the epochs in use are kept (at most three), each computed once,
    so a step costs O(b) whatever its number.
    """

    def __init__(self, n: int, batch: int, local: int, offset: int, seed: int):
        """n examples; global batch `batch`; this process's `local` rows from `offset` on."""
        self.n, self.batch, self.local, self.offset, self.seed = n, batch, local, offset, seed
        self._permutations: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def _permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch not in self._permutations:
                if len(self._permutations) > 2:
                    del self._permutations[min(self._permutations)]
                order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
                self._permutations[epoch] = order
            return self._permutations[epoch]

    def __call__(self, step: int) -> np.ndarray:
        """int64 [local]: the example indices of this process's rows of global batch `step`."""
        positions = step * self.batch + self.offset + np.arange(self.local)
        epochs, within = np.divmod(positions, self.n)
        indices = np.empty(self.local, np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            indices[mask] = self._permutation(int(epoch))[within[mask]]
        return indices

    def flips(self, step: int) -> np.ndarray:
        """bool [local]: which rows to mirror; one coin per position of the global batch."""
        coins = np.random.default_rng([self.seed, step, 1]).random(self.batch)
        return coins[self.offset : self.offset + self.local] < 0.5


def assemble(
    images: np.ndarray, flips: np.ndarray | None, labels: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """uint8 [b, S, S, C] (rows mirrored where `flips`) -> {'image': float32 in [-1, 1]}.

    With `labels` [b], the batch also holds 'label': int32 [b].
    """
    if flips is not None:
        images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
    batch = {'image': image_io.to_float(images)}
    if labels is not None:
        batch['label'] = np.asarray(labels, np.int32)
    return batch


def grain_batches(
    source: Any,
    indices: StreamIndices,
    start_step: int,
    decode: Callable[[Any], np.ndarray],
    *,
    random_flip: bool,
    label: Callable[[Any], int] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's batches from `start_step` on, read from `source` in grain threads.

    Args:
      source: random access to the examples: `len(source)` and `source[i]`.
      indices: the stream's rule for this process (`StreamIndices` over len(source)).
      start_step: the first global batch.
      decode: one record of `source` -> uint8 [S, S, C].
      random_flip: mirror the rows `indices.flips` names.
      label: one record -> its class id; None: the batches carry no labels.

    Yields:
      {'image': float32 [local, S, S, C] in [-1, 1]} (and 'label': int32 [local] with
      `label`), one per step, forever.
    """
    import grain  # lazy: only this reader needs it

    dataset = grain.MapDataset.range(start_step, np.iinfo(np.int64).max).map(
        lambda step: read_step(
            source, indices, int(step), decode, random_flip=random_flip, label=label
        )
    )
    options = grain.ReadOptions(
        num_threads=GRAIN_THREADS, prefetch_buffer_size=GRAIN_PREFETCH_BATCHES
    )
    return iter(dataset.to_iter_dataset(options))


def read_step(
    source: Any,
    indices: StreamIndices,
    step: int,
    decode: Callable[[Any], np.ndarray],
    *,
    random_flip: bool,
    label: Callable[[Any], int] | None = None,
) -> dict[str, np.ndarray]:
    """Global batch `step`'s rows of this process: `local` reads of `source`, nothing else."""
    flips = indices.flips(step) if random_flip else None
    return read_rows(source, indices(step), decode, label, flips)


def read_rows(
    source: Any,
    which: Sequence[int],
    decode: Callable[[Any], np.ndarray],
    label: Callable[[Any], int] | None = None,
    flips: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """`assemble` of records `which` of `source`: decoded, mirrored where `flips`, labelled."""
    records = _read(source, which)
    images = np.stack([decode(record) for record in records])
    labels = None if label is None else np.asarray([label(r) for r in records], np.int32)
    return assemble(images, flips, labels)


def _read(source: Any, which: Sequence[int]) -> list[Any]:
    """source[i] for each i (one batched call where the source has one, as tfds' has)."""
    getitems = getattr(source, '__getitems__', None)
    if getitems is not None:
        return list(getitems([int(i) for i in which]))
    return [source[int(i)] for i in which]
