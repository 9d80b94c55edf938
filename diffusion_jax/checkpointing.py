"""Checkpointing for the training loop: orbax save and validated restore.

A checkpoint holds two items: `state` (the train state pytree: params, ema_params, opt_state,
step, rng) written with `ocp.args.StandardSave`, and `meta` (a JSON dict: config, step, ...)
written with `ocp.args.JsonSave`. Steps are labelled by the number of COMPLETED train steps, so
a run restored from step `s` continues with `for step in range(s, num_train_steps)`.

Orbax writes each step to `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` when
complete; a complete step directory always holds `_CHECKPOINT_METADATA`. A tmp directory left by
a killed save is reported and then removed by orbax when the next Checkpointer opens the
directory. Anything else (a bare numeric directory left by a partial copy) is skipped with a
warning and left on disk, and a step whose files fail to restore falls back to the previous
complete step (training moves the failed step aside to `<step>.corrupt`).
"""

import dataclasses
import json
import re
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from diffusion_jax import errors, lead

# Written into the step directory before orbax finalizes it (atomic rename locally, commit file
# on GCS); its absence marks a step directory that orbax did not finish.
_STEP_METADATA_FILE = '_CHECKPOINT_METADATA'
_STEP_RE = re.compile(r'0|[1-9]\d*')


class CheckpointError(errors.UserError, ValueError):
    """No requested checkpoint could be restored."""


def _is_complete(step_dir: epath.Path) -> bool:
    return (step_dir / _STEP_METADATA_FILE).exists()


def _stored_step(step_dir: epath.Path) -> int | None:
    """The step a checkpoint says it holds (its meta's 'step'); None when that is unreadable.

    Orbax's JSON handler keeps the `meta` item in `<step>/meta/metadata`.
    """
    try:
        step = json.loads((step_dir / 'meta' / 'metadata').read_text()).get('step')
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def _misnamed(step_dir: epath.Path) -> bool:
    """Whether a complete step directory holds another step than its name (renamed by hand)."""
    stored = _stored_step(step_dir)
    return stored is not None and str(stored) != step_dir.name


def _is_interrupted_save(path: epath.Path) -> bool:
    """A step directory orbax was still writing (`<step>.orbax-checkpoint-tmp-*` locally)."""
    return path.name.split('.', 1)[0].isdigit() and ocp.path.step.is_tmp_checkpoint(path)


@dataclasses.dataclass(frozen=True)
class _CompleteStepsNameFormat:
    """Orbax's standard step naming, but listing only complete step directories.

    It implements orbax's public `ocp.path.step.NameFormat` protocol (the documented
    `step_name_format` option) by delegating to `standard_name_format()`; nothing of orbax is
    subclassed.

    Orbax (0.12.8) lists a bare numeric directory as a step on local disks. Such a step would
    then block every ordinary save at or below its number (`should_save` refuses steps <= the
    latest step), take a `LatestN` slot, and be garbage-collected by orbax. Hiding it from the
    manager keeps saving and retention about complete checkpoints only and leaves the directory
    alone.
    """

    base: ocp.path.step.NameFormat

    def build_name(self, step: int) -> str:
        return self.base.build_name(step)

    def find_all(self, base_path: epath.PathLike) -> Iterator[ocp.path.step.Metadata]:
        found = self.base.find_all(base_path)
        return (m for m in found if _is_complete(m.path) and not _misnamed(m.path))

    def find_step(self, base_path: epath.PathLike, step: int) -> ocp.path.step.Metadata:
        metadata = self.base.find_step(base_path, step)
        if not _is_complete(metadata.path):
            raise ValueError(f'{metadata.path} is incomplete: it has no {_STEP_METADATA_FILE}')
        return metadata


def _short(error: Exception, limit: int = 300) -> str:
    """'Type: first line of the message', cut to `limit` characters (tensorstore's are huge)."""
    lines = str(error).strip().splitlines()
    text = f'{type(error).__name__}: {lines[0] if lines else ""}'
    return text if len(text) <= limit else text[: limit - 3] + '...'


def _report_interrupted_saves(directory: epath.Path) -> None:
    """Warns about each tmp directory of an unfinished save, which orbax removes on start-up."""
    if not lead.LeadWriter().is_lead or not directory.is_dir():
        return
    for path in sorted(directory.iterdir(), key=lambda p: p.name):
        if _is_interrupted_save(path):
            logging.warning(
                'Removing %s: an interrupted save left it incomplete (that step is lost; the '
                'complete steps are kept).',
                path,
            )


class Checkpointer:
    """Saves and restores (state, meta) pairs under one directory with an orbax CheckpointManager.

    Saving is asynchronous: `save` returns once the arrays are copied off the device; `wait`,
    `restore`, `latest_valid_step` and `close` first wait for pending saves to finish. All
    processes of a multi-host job must make the same calls.

    Usage:
        with checkpointing.Checkpointer(workdir + '/checkpoints', keep=3,
                                        save_every_steps=1000) as ckpt:
            if ckpt.latest_valid_step() is not None:
                state, meta = ckpt.restore(state)
            ...
            ckpt.save(step + 1, state, meta={'step': step + 1, 'config': config.to_dict()})
    """

    def __init__(self, directory: str, *, keep: int, save_every_steps: int):
        """Opens (and creates) the checkpoint directory.

        Args:
            directory: local path or `gs://` URL holding one subdirectory per step.
            keep: number of newest complete steps to keep (orbax's `LatestN` policy).
            save_every_steps: `save` writes steps divisible by this unless forced; the first save
                into a directory without checkpoints always happens (orbax's InitialSavePolicy).
        """
        if keep < 1 or save_every_steps < 1:
            raise ValueError(
                f'keep={keep} and save_every_steps={save_every_steps} must both be >= 1'
            )
        _report_interrupted_saves(epath.Path(directory))
        self._name_format = _CompleteStepsNameFormat(ocp.path.step.standard_name_format())
        policies = ocp.checkpoint_managers
        registry = ocp.handlers.create_default_handler_registry(
            state=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler()
        )
        self._open(
            directory,
            registry,
            ocp.CheckpointManagerOptions(
                # Orbax's default decision, spelled out: the interval, the preemption sync point
                # under jax.distributed, and the first save into an empty directory.
                save_decision_policy=policies.AnySavePolicy(
                    [
                        policies.FixedIntervalPolicy(save_every_steps),
                        policies.PreemptionCheckpointingPolicy(),
                        policies.InitialSavePolicy(),
                    ]
                ),
                preservation_policy=policies.LatestN(keep),
                create=True,
                cleanup_tmp_directories=True,
                step_name_format=self._name_format,
            ),
        )

    @classmethod
    def read_only(cls, directory: str) -> 'Checkpointer':
        """Opens `directory` to read: nothing is created, removed or renamed in it.

        For `--mode=sample|eval` next to a training job that may be saving: a read-only manager
        leaves every `<step>.orbax-checkpoint-tmp-*` (perhaps a live save) alone. Use
        `restore_subtree` to read the EMA parameters alone; `save` refuses.
        """
        self = cls.__new__(cls)
        self._name_format = _CompleteStepsNameFormat(ocp.path.step.standard_name_format())
        registry = ocp.handlers.create_default_handler_registry(
            state=ocp.PyTreeCheckpointHandler(), meta=ocp.JsonCheckpointHandler()
        )
        options = ocp.CheckpointManagerOptions(
            read_only=True,
            create=False,
            cleanup_tmp_directories=False,
            save_interval_steps=0,
            step_name_format=self._name_format,
        )
        self._open(directory, registry, options)
        return self

    def _open(self, directory: str, registry, options: ocp.CheckpointManagerOptions) -> None:
        self._manager = ocp.CheckpointManager(directory, handler_registry=registry, options=options)
        self._read_only = options.read_only
        self._closed = False

    @property
    def directory(self) -> epath.Path:
        return self._manager.directory

    def save(self, step: int, state: Any, *, meta: dict[str, Any], force: bool = False) -> bool:
        """Saves `state` and `meta` as checkpoint `step` if the schedule (or `force`) says so.

        Call it after every train step; the manager decides from `save_every_steps` (and, under
        `jax.distributed`, from the preemption sync point).

        Args:
            step: number of COMPLETED train steps.
            state: pytree of jax/numpy arrays (a flax TrainState or a dict).
            meta: JSON-serialisable dict, e.g. the config and the step.
            force: save regardless of the schedule (final step, preemption).

        Returns:
            Whether a save was started. False also when `step` is already saved (e.g. a forced
            preemption save right after the scheduled save of the same step), or when an
            incomplete directory occupies the step's path (it is never overwritten).
        """
        if self._read_only:
            raise ValueError(f'{self.directory} was opened read-only')
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise ValueError(f'meta must be a JSON-serialisable dict: {e}') from e
        if not force and not self._manager.should_save(step):
            return False
        if step in self._manager.all_steps():
            logging.info('Checkpoint step %d is already saved in %s.', step, self.directory)
            return False
        step_dir = self.directory / self._name_format.build_name(step)
        if step_dir.exists():
            logging.warning(
                'Not saving step %d: incomplete checkpoint directory %s is in the way; '
                'move or delete it by hand.',
                step,
                step_dir,
            )
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        # The schedule was checked above; force=True only skips orbax's second check.
        return self._manager.save(step, args=args, force=True)

    def latest_valid_step(self) -> int | None:
        """Returns the newest complete step, or None; warns about each incomplete directory."""
        complete = self._complete_steps()
        return complete[-1] if complete else None

    def restore(
        self, target_state: Any, step: int | None = None, *, set_aside_failed: bool = False
    ) -> tuple[Any, dict[str, Any]]:
        """Restores a checkpoint into the structure, dtypes and shardings of `target_state`.

        Without `step`, tries the complete steps newest first and falls back to the previous one
        (with a warning) when a step's files fail to restore.

        Args:
            target_state: pytree like the saved state (e.g. a freshly initialised TrainState);
                only its structure, shapes, dtypes and shardings are used. jax.Array leaves come
                back as jax.Array with the same sharding, numpy leaves as numpy.
            step: restore exactly this step (no fallback).
            set_aside_failed: once an older step restored, rename each newer step that failed to
                `<step>.corrupt` (with a warning; never deleted), so the resumed run can save
                those step numbers again. Training sets it; read-only users leave it off.

        Returns:
            (state, meta) of the restored step.

        Raises:
            CheckpointError: no complete step exists, `step` is not complete, or every tried step
                failed to restore; the message lists each step tried and its error.
        """
        candidates = self.candidate_steps(step)
        abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
        )
        failures = {}  # step -> short error message, in the order tried
        for candidate in candidates:
            try:
                restored = self._manager.restore(candidate, args=args)
            except Exception as e:  # orbax/tensorstore raise several types for damaged files
                failures[candidate] = _short(e)
                logging.warning(
                    'Checkpoint step %d in %s failed to restore (%s); trying the previous step.',
                    candidate,
                    self.directory,
                    failures[candidate],
                )
                continue
            logging.info('Restored checkpoint step %d from %s.', candidate, self.directory)
            if set_aside_failed and failures:
                self._set_aside(list(failures))
            return restored['state'], restored['meta']
        raise CheckpointError(
            f'no checkpoint in {self.directory} could be restored; tried '
            + '; '.join(f'step {s}: {message}' for s, message in failures.items())
            + ' (damaged files, or a checkpoint of another model: restore them from a copy, or '
            'move the folder away to start afresh; nothing was changed)'
        )

    def restore_subtree(self, key: str, target: Any, step: int) -> Any:
        """`state[key]` of checkpoint `step` alone (e.g. 'ema_params'), from a read-only reader.

        Args:
            key: a field of the saved state, or a path into one ('extra_ema/ema_1').
            target: pytree like that field (arrays or jax.ShapeDtypeStruct with shardings);
                its structure, shapes, dtypes and shardings are used.
            step: a complete step.

        Raises:
            CheckpointError: the step is not complete or its files fail to restore.
        """
        self.candidate_steps(step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        for name in reversed(key.split('/')):
            abstract = {name: abstract}
        restore = ocp.args.PyTreeRestore(
            item=abstract,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True,
        )
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(state=restore))
        except Exception as e:  # orbax/tensorstore raise several types for damaged files
            raise CheckpointError(
                f'checkpoint step {step} in {self.directory} failed to restore {key}: '
                f'{_short(e)} (damaged files, or a checkpoint of another model)'
            ) from e
        restored = restored['state']
        for name in key.split('/'):
            restored = restored[name]
        return restored

    def candidate_steps(self, step: int | None) -> list[int]:
        """The steps `restore` tries, in order: `[step]`, or every complete step newest first.

        Raises:
            CheckpointError: `step` is given but not complete, or no complete step exists.
        """
        complete = self._complete_steps()
        if step is not None and step not in complete:
            raise CheckpointError(
                f'step {step} is not a complete checkpoint in {self.directory}; '
                f'complete steps: {complete}'
            )
        candidates = [step] if step is not None else complete[::-1]
        if not candidates:
            raise CheckpointError(f'no complete checkpoint in {self.directory}')
        return candidates

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON `meta` of checkpoint `step` (default: the newest complete one), no arrays.

        Raises:
            CheckpointError: no such complete step, or its meta cannot be read.
        """
        complete = self._complete_steps()
        step = complete[-1] if step is None and complete else step
        if step not in complete:
            raise CheckpointError(
                f'step {step} is not a complete checkpoint in {self.directory}; '
                f'complete steps: {complete}'
            )
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )
        except Exception as e:  # orbax raises several types for damaged files
            raise CheckpointError(
                f'could not read the metadata of checkpoint step {step} in {self.directory}: '
                f'{_short(e)}'
            ) from e
        return restored['meta']

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are written and finalized."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager; further calls are no-ops."""
        if not self._closed:
            self._closed = True
            self._manager.close()

    def __enter__(self) -> 'Checkpointer':
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _set_aside(self, steps: list[int]) -> None:
        """Renames the step directories of `steps` to `<name>.corrupt[-k]` (lead process)."""
        if lead.LeadWriter().is_lead:
            for step in steps:
                path = self.directory / self._name_format.build_name(step)
                target, k = path.parent / f'{path.name}.corrupt', 1
                while target.exists():
                    k += 1
                    target = path.parent / f'{path.name}.corrupt-{k}'
                path.rename(target)
                logging.warning(
                    'Checkpoint step %d failed to restore; moved it to %s (not deleted: inspect '
                    'it, then remove it by hand).',
                    step,
                    target,
                )
        multihost_utils.sync_global_devices('Checkpointer: set aside failed steps')
        self._manager.reload()

    def _complete_steps(self) -> list[int]:
        """Complete steps, ascending; warns about (and keeps) every incomplete step directory."""
        self.wait()  # A save in flight is still a tmp dir.
        complete, incomplete = [], []
        for path in self.directory.iterdir():
            if _STEP_RE.fullmatch(path.name):
                if not _is_complete(path):
                    incomplete.append(path)
                elif _misnamed(path):
                    logging.warning(
                        'Skipping checkpoint directory %s: it holds step %d (renamed by hand?); '
                        'give it back its name %d to use it.',
                        path,
                        _stored_step(path),
                        _stored_step(path),
                    )
                else:
                    complete.append(int(path.name))
            elif _is_interrupted_save(path):
                incomplete.append(path)
        for path in sorted(incomplete, key=lambda p: p.name):
            logging.warning(
                'Skipping incomplete checkpoint directory %s (no %s); leaving it on disk.',
                path,
                _STEP_METADATA_FILE,
            )
        return sorted(complete)
