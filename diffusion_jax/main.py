"""Command line entry point: `python -m diffusion_jax.main --config=CONFIG --workdir=DIR`.

The only module that defines flags. It loads and validates the config, then dispatches on
`--mode`. Every user error (bad flag, unknown or mistyped config key, missing config file,
impossible config, missing dataset, bad checkpoint) ends with one line on stderr and exit
status 2 instead of a traceback.
"""

import difflib
import errno
import inspect
import logging as std_logging
import os
import sys
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from diffusion_jax import config_lib, errors, host_malloc, xla_cpu

# Before JAX starts its CPU backend: the XLA:CPU options this project measured to be faster,
# and glibc malloc thresholds that keep XLA:CPU's freed buffers for the next step.
xla_cpu.apply_defaults()
host_malloc.apply_default()

MODES = ('train', 'sample', 'eval')

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file, e.g. configs/digits.py.', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and samples go.')
_MODE = flags.DEFINE_enum('mode', 'train', MODES, 'What to do.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address',
    None,
    'Multi-host jobs: host:port of process 0, with --num_processes and --process_id. Not '
    'needed on Cloud TPU VMs, which join by themselves.',
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-host jobs: process count.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-host jobs: this process, 0-based.')


# Libraries whose INFO lines (dozens per checkpoint) would bury the training log.
_CHATTY = ('/orbax/', '/jax/_src/', '/etils/')
_ORBAX_DIR = f'{os.sep}orbax{os.sep}'


class _QuietLibraries(std_logging.Filter):
    """Drops other libraries' INFO records unless --verbosity >= 1; warnings pass, except
    orbax's note that a checkpoint folder opened read-only (by sample and eval) is read-only.

    Orbax logs each failure of its background save threads with a traceback; below
    --verbosity=1 its records keep their one-line message only, since the error itself ends
    the run with main's one `error:` line.
    """

    def filter(self, record: std_logging.LogRecord) -> bool:
        if _ORBAX_DIR in record.pathname:
            if 'is read only' in str(record.msg):
                return False
            if record.exc_info and logging.get_verbosity() < 1:
                record.exc_info, record.exc_text = None, None
        if record.levelno >= std_logging.WARNING or logging.get_verbosity() >= 1:
            return True
        return not any(part in record.pathname for part in _CHATTY)


def _drop_closed_loop_noise(unraisable) -> None:
    """Hides orbax's leftover async reads after a failed restore; other reports pass through.

    When a damaged checkpoint fails to restore, tensorstore finishes the reads still in flight
    after orbax closed their asyncio loop, and each reports an unraisable
    `RuntimeError('Event loop is closed')`: hundreds of tracebacks after the one useful line.
    """
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == 'Event loop is closed':
        return
    if _is_abandoned_orbax_read(unraisable.object):
        return
    sys.__unraisablehook__(unraisable)


def _is_abandoned_orbax_read(obj: object) -> bool:
    """True for an orbax coroutine closed unfinished (its restore already failed and was reported).

    When the interpreter finalises such a coroutine at exit, orbax's read wraps the close in its
    own exception ('Encountered error while reading array index'), reported as unraisable after
    the error message the user should see last.
    """
    return inspect.iscoroutine(obj) and _ORBAX_DIR in obj.cr_code.co_filename


class _NoOrphanedFutures(std_logging.Filter):
    """Drops asyncio's 'Future/Task exception was never retrieved' (same cause as above)."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return 'exception was never retrieved' not in str(record.msg).split('\n', 1)[0]


def _unknown_key_message(error: str, argv: list[str]) -> str:
    """'unknown config key: config.model.batch_size (did you mean config.model.ch?)'.

    Names the override that does not exist: the first `--config.a.b=...` of `argv` whose path
    leaves the loaded config, with the closest key at that level as a suggestion. Falls back
    to ml_collections' own text (`error`) when the config itself could not be loaded.
    """
    config = _config_file_of(argv)
    for arg in argv:
        if config is None or not arg.startswith('--config.'):
            continue
        path = arg[len('--') :].split('=', 1)[0].split('.')
        node = config
        for depth, name in enumerate(path[1:], start=1):
            if not hasattr(node, 'keys') or name not in node:
                full = '.'.join(path[: depth + 1])
                keys = list(node.keys()) if hasattr(node, 'keys') else []
                close = difflib.get_close_matches(name, keys, n=1)
                hint = f' (did you mean {".".join(path[:depth])}.{close[0]}?)' if close else ''
                return f'unknown config key: {full}{hint}'
            node = node[name]
    text = ' '.join(error.replace("\\'", "'").split())
    return f'unknown config key: {text}'


def _config_file_of(argv: list[str]) -> Any:
    """The config that `--config=PATH` in `argv` names, without overrides; None if it fails.

    ml_collections applies the overrides while it loads the file, so after a bad override the
    flag holds no config to compare the overrides with.
    """
    path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
    try:
        return None if path is None else config_lib.load_config_file(path)
    except config_lib.ConfigError:  # only a better message is lost; the error is still reported
        return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config-loading errors turned into one-line messages."""
    try:
        rest = flags.FLAGS(argv)
        config = _CONFIG.value
    except flags.Error as e:
        errors.fail(str(e))
    except (AttributeError, KeyError) as e:  # an unknown --config.x.y key: the config is locked
        errors.fail(_unknown_key_message(str(e), argv))
    except (OSError, ImportError, SyntaxError) as e:
        errors.fail(f'could not load --config: {str(e).splitlines()[-1].strip()}')
    if config is None:
        errors.fail('--config is required, e.g. --config=configs/digits.py')
    try:
        config.to_dict()  # config_flags defers a failed load to the first access
    except OSError as e:
        errors.fail(f'could not load --config: {str(e).splitlines()[-1].strip()}')
    if not _WORKDIR.value:
        errors.fail('--workdir is required, e.g. --workdir=/tmp/ddpm_digits')
    return rest


def main(argv: list[str]) -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())  # jax's loggers reach root's handler
    absl_logger = std_logging.getLogger('absl')  # orbax's: whichever handler shows them
    if not any(isinstance(f, _QuietLibraries) for f in absl_logger.filters):
        absl_logger.addFilter(_QuietLibraries())
    sys.unraisablehook = _drop_closed_loop_noise
    std_logging.getLogger('asyncio').addFilter(_NoOrphanedFutures())
    if len(argv) > 1:
        errors.fail(f'unexpected arguments: {" ".join(argv[1:])}')
    config = _CONFIG.value
    try:
        # Sample and eval check their settings against the checkpoint's diffusion once read.
        training = _MODE.value == 'train'
        config_lib.validate(config, weights_from_checkpoint=not training, training=training)
    except config_lib.ConfigError as e:
        errors.fail(str(e))
    workdir = _WORKDIR.value
    # Heavy imports (jax, TensorFlow) only after the cheap checks above.
    from diffusion_jax import parallel

    try:
        parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except ValueError as e:
        errors.fail(str(e))
    from diffusion_jax import evaluate, generate, train

    logging.info('workdir: %s', workdir)
    modes = {
        'train': train.train_and_evaluate,
        'sample': generate.run_sample_mode,
        'eval': evaluate.run_eval_mode,
    }
    _check_workdir(workdir)
    mesh = parallel.create_mesh()  # every device of every process, made once for the mode
    try:
        modes[_MODE.value](config, workdir, mesh)
    except errors.UserError as e:
        errors.fail(str(e))
    except OSError as e:  # the environment: permissions, a full disk, a path that is a file
        logging.debug('the error in full', exc_info=True)
        errors.fail(_os_error_message(e), one_line=True)
    except (RuntimeError, ValueError) as e:  # XLA's and tensorstore's resource errors
        message = _resource_message(e)
        if message is None:
            raise
        errors.fail(message, one_line=True)


def _disk_full_message(first: str) -> str:
    return (
        f'the disk is full: {first}; free some space and run again (files already there are '
        'kept; training resumes from its newest complete checkpoint)'
    )


def _resource_message(e: Exception) -> str | None:
    """One line for a full disk or exhausted memory reported by XLA or tensorstore; else None."""
    text = str(e).strip()
    first = text.splitlines()[0][:300] if text else type(e).__name__
    if 'No space left on device' in text:
        return _disk_full_message(first)
    if 'RESOURCE_EXHAUSTED' in text:
        return (
            f'out of memory: {first}; use a smaller batch (--config.training.batch_size, '
            '--config.sampling.batch_size or --config.eval.batch_size)'
        )
    return None


def _os_error_message(e: OSError) -> str:
    """'Permission denied: /w/train.lock (...)' from an OSError, with what to check; a full
    disk (or quota) gets `_disk_full_message`, whichever layer raised it (a Python write in
    one of orbax's threads raises OSError, tensorstore a ValueError)."""
    what = f'{e.strerror}: {e.filename}' if e.strerror and e.filename else str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return _disk_full_message(what)
    return f'{what} (check the path, its permissions and the free disk space)'


def _check_workdir(workdir: str) -> None:
    """Refuses a --workdir that is an existing file before anything is loaded."""
    if '://' not in workdir and os.path.exists(workdir) and not os.path.isdir(workdir):
        errors.fail(f'--workdir {workdir} is a file, not a folder: give a folder path')


def run() -> None:
    app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
    run()
