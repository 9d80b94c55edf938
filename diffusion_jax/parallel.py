"""Data parallelism with `jax.jit` over a 1-D device mesh (no pmap).

Parameters are replicated on every device of every host; the global batch is sharded along
its first axis. Each host supplies its local part and `jax.make_array_from_process_local_data`
assembles the global array.
"""

import collections
import itertools
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'


class BatchSizeError(ValueError):
    """A batch size that does not split evenly over the devices."""


def create_mesh(devices: list[Any] | None = None) -> Mesh:
    """A 1-D mesh named 'data' over `devices` (default: every device of every host)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full copy on every device (parameters, optimizer state, rng)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Split along the first (batch) axis across the mesh."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, num_devices: int, key: str) -> None:
    """Raises BatchSizeError unless `batch_size` divides evenly over `num_devices`."""
    if batch_size % num_devices:
        nearby = sorted(
            {
                max(num_devices, batch_size // num_devices * num_devices),
                (batch_size // num_devices + 1) * num_devices,
            }
        )
        raise BatchSizeError(
            f'{key}={batch_size} does not divide over {num_devices} devices; use a multiple of '
            f'{num_devices}, e.g. {" or ".join(str(n) for n in nearby)} (--{key}=...)'
        )


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each host's local arrays [b, ...] into global arrays [b * hosts, ...]."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }


def prefetch_to_mesh(
    batches: Iterator[dict[str, np.ndarray]], mesh: Mesh, size: int = 2
) -> Iterator[dict[str, jax.Array]]:
    """Yields global batches, assembling `size` ahead so host-to-device copies overlap compute."""
    queue = collections.deque()

    def enqueue(n):
        for local in itertools.islice(batches, n):
            queue.append(global_batch(local, mesh))

    enqueue(size)
    while queue:
        yield queue.popleft()
        enqueue(1)
