"""TensorBoard event files (scalars and images) written without TensorFlow.

Uses the `tensorboard` package's own protobufs (`tensorboard.compat.proto`) and its record
framing (`RecordWriter`: length, masked CRC32C, payload, CRC), which import no TensorFlow, over
a file opened with `etils.epath` (a local path or `gs://`). The `tensorboard` package is needed
anyway to view the files, and it is already on the machines we target, so this adds no
dependency; tensorboardX would add one and do the same. clu's writers import TensorFlow.

Usage:
    with summary.SummaryWriter(workdir) as writer:
        writer.write_scalars(step, {'loss': 0.1})
        writer.write_images(step, {'samples': grid[None]})  # uint8 [N, H, W, C]
"""

import io
import os
import socket
import time
from collections.abc import Mapping

import numpy as np
from etils import epath
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

_FILE_VERSION = 'brain.Event:2'


class SummaryWriter:
    """Appends events to one new `events.out.tfevents.*` file under `logdir`.

    Each `write_*` call flushes, so `tensorboard --logdir` sees a step as soon as it is written
    and a killed run loses nothing it reported.
    """

    def __init__(self, logdir: str | os.PathLike):
        directory = epath.Path(logdir)
        directory.mkdir(parents=True, exist_ok=True)
        name = f'events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}'
        self.path = directory / name
        self._records = RecordWriter(self.path.open('wb'))
        self._write(event_pb2.Event(wall_time=time.time(), file_version=_FILE_VERSION))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """One scalar summary per key at `step`."""
        values = [
            summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
            for tag, value in scalars.items()
        ]
        self._write_summary(step, values)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """PNG image summaries at `step`.

        Args:
            step: the global step.
            images: tag -> uint8 [N, H, W, C] with C in {1, 3, 4}; image i gets the tag
                `tag` (N = 1) or `tag/image/i`.
        """
        values = []
        for tag, batch in images.items():
            batch = np.asarray(batch)
            if batch.ndim != 4 or batch.dtype != np.uint8 or batch.shape[-1] not in (1, 3, 4):
                raise ValueError(
                    f'images[{tag!r}] must be uint8 [N, H, W, C] with C in 1, 3, 4; got '
                    f'{batch.dtype} {batch.shape}'
                )
            for i, image in enumerate(batch):
                values.append(
                    summary_pb2.Summary.Value(
                        tag=tag if len(batch) == 1 else f'{tag}/image/{i}',
                        image=_encode_png(image),
                    )
                )
        self._write_summary(step, values)

    def flush(self) -> None:
        self._records.flush()

    def close(self) -> None:
        if not self._records.closed:
            self._records.close()

    def __enter__(self) -> 'SummaryWriter':
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _write_summary(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
        event = event_pb2.Event(
            wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)
        )
        self._write(event)

    def _write(self, event: event_pb2.Event) -> None:
        self._records.write(event.SerializeToString())
        self._records.flush()


def _encode_png(image: np.ndarray) -> summary_pb2.Summary.Image:
    """uint8 [H, W, C] as TensorBoard's PNG image proto."""
    height, width, channels = image.shape
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if channels == 1 else image).save(buffer, format='PNG')
    return summary_pb2.Summary.Image(
        height=height, width=width, colorspace=channels, encoded_image_string=buffer.getvalue()
    )
