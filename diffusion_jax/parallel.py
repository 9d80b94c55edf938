"""Data parallelism with `jax.jit` over a 1-D device mesh (no pmap).

Parameters are replicated on every device of every host; the global batch is sharded along
its first axis. Each host supplies its local part and `jax.make_array_from_process_local_data`
assembles the global array. `initialize_distributed` joins the hosts of a multi-host job.
"""

import collections
import glob
import importlib.util
import itertools
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from diffusion_jax import errors

DATA_AXIS = 'data'


class BatchSizeError(errors.UserError, ValueError):
    """A batch size that does not split evenly over the devices."""


def create_mesh(devices: list[Any] | None = None) -> Mesh:
    """A 1-D mesh named 'data' over `devices` (default: every device of every host).

    `jax.make_mesh` orders the devices along the interconnect (a ring on TPU). The axis is
    `Auto`: jit's in/out shardings place the arrays and XLA propagates the rest, the same
    programs on every JAX version we support (newer ones default to `Explicit` axes).
    """
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh((len(devices),), (DATA_AXIS,), (AxisType.Auto,), devices=list(devices))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full copy on every device (parameters, optimizer state, rng)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Split along the first (batch) axis across the mesh."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, num_devices: int, key: str) -> None:
    """Raises BatchSizeError unless `batch_size` divides evenly over `num_devices`.

    `key` is the config key that holds the batch size, e.g. 'config.training.batch_size': the
    message ends with the command-line flag that sets it to the nearest size that works.
    """
    if batch_size % num_devices:
        below = batch_size // num_devices * num_devices
        above = below + num_devices
        nearby = sorted({max(num_devices, below), above})
        # The nearest multiple; a tie, or nothing below, rounds up.
        fix = above if below == 0 or above - batch_size <= batch_size - below else below
        raise BatchSizeError(
            f'{key}={batch_size} does not divide over {num_devices} devices; use a multiple of '
            f'{num_devices}, e.g. {" or ".join(str(n) for n in nearby)} (--{key}={fix})'
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


def on_cloud_tpu_vm() -> bool:
    """True on a Cloud TPU VM: libtpu is installed and the host has TPU chips attached."""
    if importlib.util.find_spec('libtpu') is None:
        return False
    return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Joins a multi-process (multi-host) JAX job, only when asked to.

    With all three arguments, initialises `jax.distributed` with them (GPU clusters, CPU tests;
    CPU processes exchange data through gloo). With none, initialises automatically on a Cloud
    TPU VM, where JAX finds the other workers itself, and does nothing elsewhere. Must run
    before any other JAX call.

    Returns:
      Whether `jax.distributed` was initialised.

    Raises:
      ValueError: only some of the three arguments were given, or they are inconsistent.
    """
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError(
            '--coordinator_address, --num_processes and --process_id go together: give all '
            'three (e.g. --coordinator_address=host0:1234 --num_processes=2 --process_id=0) '
            'or none'
        )
    if all(given):
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(
                f'--process_id={process_id} must be in [0, --num_processes={num_processes})'
            )
        # Cross-process collectives for CPU devices; accelerators bring their own.
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
        return True
    if on_cloud_tpu_vm():
        jax.distributed.initialize()
        return True
    return False


def to_host(x: jax.Array) -> np.ndarray:
    """A global array, sharded over the devices of every process, as numpy on every process."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
