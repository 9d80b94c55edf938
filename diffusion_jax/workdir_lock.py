"""One training per workdir: a lock file naming the process that trains in it.

Two trainings on one workdir would write the same checkpoint steps at once (orbax has no lock of
its own). `hold(workdir)` creates `WORKDIR/train.lock` exclusively (`O_EXCL`) with the host name
and PID of the lead process and removes it when training ends. A second training refuses in
one line while the first goes on. A lock left by a process that died (same host, PID no longer
running) is reported and taken over; one from another host cannot be checked from here, so the
message says how to remove it once that process is gone. Object-store workdirs (gs://) have no
exclusive create: they are not locked, with a warning.
"""

import contextlib
import os
import socket
from collections.abc import Iterator

import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from diffusion_jax import errors, image_io, lead

LOCK_NAME = 'train.lock'


class WorkdirLockedError(errors.UserError, RuntimeError):
    """Another live training holds the workdir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _owner(path: str) -> tuple[str, int] | None:
    """(host, pid) written in a lock file; None when it is unreadable or malformed."""
    try:
        with open(path) as f:
            host, pid = f.read().split()
        return host, int(pid)
    except (OSError, ValueError):
        return None


def _create(path: str) -> bool:
    """Creates the lock file with this process's host and PID; False if it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, 'w') as f:
        f.write(f'{socket.gethostname()} {os.getpid()}\n')
    return True


def acquire(workdir: str) -> str:
    """Takes `WORKDIR/train.lock` for this process; returns its path.

    Raises:
      WorkdirLockedError: a live process (or one on another host) holds it.
    """
    path = os.path.join(workdir, LOCK_NAME)
    os.makedirs(workdir, exist_ok=True)
    for _ in range(2):  # a second try after taking over a stale lock
        if _create(path):
            return path
        owner = _owner(path)
        here = socket.gethostname()
        if owner is not None and owner[0] == here and not _alive(owner[1]):
            logging.warning(
                'taking over %s: its training process %d on %s is no longer running',
                path,
                owner[1],
                here,
            )
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        who = 'an unreadable lock' if owner is None else f'process {owner[1]} on {owner[0]}'
        raise WorkdirLockedError(
            f'{workdir} is in use by another training ({who}, {path}): wait for it to end, use '
            f'another --workdir, or delete {path} if that process is gone'
        )
    raise WorkdirLockedError(f'could not take {path}: another training took it first')


def release(path: str) -> None:
    """Removes the lock file if this process still owns it."""
    if _owner(path) == (socket.gethostname(), os.getpid()):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Holds the workdir's training lock for the block (taken by the lead, agreed by all).

    Raises:
      WorkdirLockedError: on every process, when the lead could not take it.
    """
    writer, path, refusal = lead.LeadWriter(), None, None
    if image_io.is_url(workdir):
        logging.warning('%s is on an object store: not locked against a second training', workdir)
    elif writer.is_lead:
        try:
            path = acquire(workdir)
        except WorkdirLockedError as e:
            refusal = e
    refused = int(multihost_utils.broadcast_one_to_all(np.int32(refusal is not None)))
    if refused:
        raise refusal or WorkdirLockedError(f'process 0 could not lock {workdir}; see its log')
    try:
        yield
    finally:
        if path is not None:
            release(path)
