"""Ours and the PyTorch peer timed in turns, one call each per round, in one benchmark run.

On a shared VM a slow spell of a few seconds moves whichever side it falls on: timed one after
the other, minutes apart, each side's median can move by 20% on its own and the ratio with it.
Taking turns, ours and the peer's call of the same measurement run seconds apart, and in the
order peer, ours in even rounds and ours, peer in odd ones, so that a drift falls on both.

The peer (`benchmarks.peer_torch --serve`) prepares and warms up every measurement, then serves
timed calls over a pipe, one text line per message:

    peer -> us:  'ready NAME ...'       after the warm-ups: the measurements it can time
    us -> peer:  'NAME'                 it times one call of NAME ...
    peer -> us:  '{"seconds": S}'       ... and answers with its wall time
    us -> peer:  'done'                 it stops serving, writes its JSON record and exits

Imports neither JAX nor torch: both processes use it.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from benchmarks import memory

READY = 'ready'
DONE = 'done'


class PeerError(RuntimeError):
    """The serving process exited or answered something other than the protocol."""


def protocol_stream() -> TextIO:
    """The serving side's reply stream: the process's stdout, which is then sent to stderr.

    Whatever a library prints later goes to stderr and cannot break the protocol.
    """
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(fd, 'w', buffering=1)


def serve(calls: dict[str, Callable[[], object]], inp: TextIO, out: TextIO) -> dict[str, dict]:
    """Times one call of the named measurement per request, until 'done' or end of input.

    Args:
        calls: name -> a call that has been warmed up and returns after its work is done.
        inp: the requests, one name per line.
        out: the replies (`protocol_stream()`).

    Returns:
        name -> {'seconds': [wall seconds of each timed call], 'memory': the host RSS record of
        those calls (the highest peak)}; measurements never asked for are left out.
    """
    out.write(' '.join([READY, *calls]) + '\n')
    out.flush()
    timed: dict[str, dict] = {}
    for line in inp:
        name = line.strip()
        if name == DONE:
            break
        if name not in calls:
            raise PeerError(f'asked to time {name!r}; this side has {sorted(calls)}')
        with memory.HostRssPeak() as host:
            start = time.perf_counter()
            calls[name]()
            seconds = time.perf_counter() - start
        record = timed.setdefault(name, {'seconds': [], 'memory': host.as_dict()})
        record['seconds'].append(seconds)
        if host.peak_bytes > (record['memory']['peak_bytes'] or 0):
            record['memory'] = host.as_dict()
        out.write(json.dumps({'seconds': seconds}) + '\n')
        out.flush()
    return timed


class Peer:
    """Our side: a child process that serves timed calls (`serve`).

    Args:
        args: the child's command line.
        cwd, env: its working directory and environment.
    """

    def __init__(self, args: Sequence[str], cwd: str | None = None, env: dict | None = None):
        self._proc = subprocess.Popen(
            list(args), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=cwd, env=env
        )
        words = self._read().split()
        if not words or words[0] != READY:
            self.close()
            raise PeerError(f'the peer did not start serving; it said {" ".join(words)!r}')
        self.names = words[1:]

    def _read(self) -> str:
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            raise PeerError(f'the peer exited (exit {code}); see its log above')
        return line

    def time(self, name: str) -> float:
        """The wall seconds of one call of `name` in the peer's process."""
        self._proc.stdin.write(name + '\n')
        self._proc.stdin.flush()
        return float(json.loads(self._read())['seconds'])

    def finish(self) -> int:
        """Tells the peer to stop serving; waits for it to finish and returns its exit code."""
        try:
            self._proc.stdin.write(DONE + '\n')
            self._proc.stdin.close()
        except BrokenPipeError:
            pass
        return self._proc.wait()

    def close(self) -> None:
        """Stops the child, if it still runs."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()


def take_turns(
    ours: Callable[[], object], theirs: Callable[[], float], rounds: int
) -> tuple[list[float], list[float]]:
    """`rounds` timed calls of each side, in turns: peer then ours in even rounds, else reversed.

    Args:
        ours: one call of our measurement; returns after its work is done.
        theirs: times one call in the peer's process and returns its seconds (`Peer.time`).
        rounds: calls per side.

    Returns:
        (our seconds per call, the peer's seconds per call), in round order.
    """
    ours_s, theirs_s = [], []
    for i in range(rounds):
        if i % 2 == 0:
            theirs_s.append(theirs())
        start = time.perf_counter()
        ours()
        ours_s.append(time.perf_counter() - start)
        if i % 2 == 1:
            theirs_s.append(theirs())
    return ours_s, theirs_s


def round_ratios(ours_s: Sequence[float], theirs_s: Sequence[float]) -> dict:
    """Our throughput over the peer's in each round (their seconds / ours), and their median."""
    per_round = [t / o for o, t in zip(ours_s, theirs_s, strict=True)]
    return {
        'per_round': per_round,
        'median': statistics.median(per_round),
        'min': min(per_round),
        'max': max(per_round),
    }
