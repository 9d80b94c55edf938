"""Preemption: a stop request (SIGTERM, SIGINT, JAX's preemption notice) becomes a clean stop.

The training loop polls `PreemptionGuard.should_stop(step)` after every step; when it says so, the
loop force-saves the current step (`checkpointing.Checkpointer.save(..., force=True)`) and
returns, so a restarted job resumes from exactly that step.

Two sources of a stop request:

- A single host (no `jax.distributed`): the guard installs Python handlers for SIGTERM (the
  preemption notice of Cloud TPU / GCE / Kubernetes, or `launch/run.sh --stop`) and SIGINT
  (Ctrl-C) that set a flag. A second SIGINT raises KeyboardInterrupt, for a user who does not
  want to wait for the save.
- Several hosts (`jax.distributed`): JAX's preemption service owns SIGTERM, and
  `multihost_utils.reached_preemption_sync_point` names the one step at which every host stops,
  so all hosts save the same step.
"""

import signal
import threading
from typing import Any

import jax
from absl import logging
from jax.experimental import multihost_utils


def _reached_preemption_sync_point(step: int) -> bool:
    try:
        return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # jax_enable_preemption_service is off: no notice can arrive.
        return False


class PreemptionGuard:
    """Context manager turning SIGTERM/SIGINT into a flag the training loop polls.

    On a single host (no `jax.distributed`) it installs handlers for SIGTERM (the preemption
    notice of Cloud TPU / GCE / Kubernetes) and SIGINT that set `requested`; a second SIGINT
    raises KeyboardInterrupt. Under `jax.distributed` it installs nothing: JAX's preemption
    service owns SIGTERM (a Python handler would replace its C++ one) and `should_stop` asks it
    for the step at which all hosts stop together.

    Usage (must be entered in the main thread):
        with preemption.PreemptionGuard() as guard:
            for step in range(start, num_train_steps):
                state, metrics = jit_train_step(state, batch, rng)
                ckpt.save(step + 1, state, meta=meta)
                if guard.should_stop(step + 1):
                    ckpt.save(step + 1, state, meta=meta, force=True)
                    break
    """

    _SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self._requested = threading.Event()
        self._previous_handlers: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether this process received SIGTERM or SIGINT inside the guard."""
        return self._requested.is_set()

    def should_stop(self, step: int) -> bool:
        """Whether to save now and exit; all hosts agree under `jax.distributed`.

        Args:
            step: number of completed train steps; under `jax.distributed` every host must call
                this at every step, starting from the same step.
        """
        if jax.distributed.is_initialized():
            return _reached_preemption_sync_point(step)
        return self.requested

    def __enter__(self) -> 'PreemptionGuard':
        if not jax.distributed.is_initialized():
            for signum in self._SIGNALS:
                self._previous_handlers[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous_handlers.items():
            # None: the old handler was not installed from Python; the default is the best guess.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous_handlers.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        self._requested.set()
        logging.warning(
            'Received %s: will checkpoint and stop after this step.', signal.Signals(signum).name
        )
