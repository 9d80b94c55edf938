"""The lead process's writes: one small object that every mode writes its files through.

In a multi-host job every process runs the same program, and exactly one of them, process 0,
writes the run's files (config.json, sample grids, npz files, metrics, TensorBoard events). The
other processes hold a `LeadWriter` too, whose writes do nothing, so the calling code has no
`process_index() == 0` checks of its own. Every file is written atomically (`image_io`).
"""

from typing import Any

import jax
import numpy as np
from etils import epath

from diffusion_jax import image_io, summary


class LeadWriter:
    """Writes files on the lead process only; on every other process each call is a no-op.

    Args:
        is_lead: whether this process writes; None: `jax.process_index() == 0`.
    """

    def __init__(self, is_lead: bool | None = None):
        self.is_lead = jax.process_index() == 0 if is_lead is None else is_lead

    def json(self, path: str, obj: Any) -> None:
        if self.is_lead:
            image_io.save_json(path, obj)

    def npz(self, path: str, **arrays: np.ndarray) -> None:
        if self.is_lead:
            image_io.save_npz(path, **arrays)

    def grid(self, path: str, images: np.ndarray, **kwargs: Any) -> np.ndarray | None:
        """`image_io.save_grid` on the lead (returns the grid); None elsewhere."""
        return image_io.save_grid(path, images, **kwargs) if self.is_lead else None

    def rmtree(self, path: str) -> None:
        if self.is_lead:
            epath.Path(path).rmtree()

    def summary(self, logdir: str) -> summary.SummaryWriter | None:
        """A TensorBoard writer under `logdir` on the lead; None elsewhere."""
        return summary.SummaryWriter(logdir) if self.is_lead else None
