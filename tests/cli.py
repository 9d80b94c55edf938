"""`python -m diffusion_jax.main ARGS` run in this process: the exit status and what it printed.

A subprocess pays a fresh interpreter, JAX's start-up and every compile again; most refusals need
none of that, only main's own flag parsing, validation and dispatch. `run_main` calls what
`app.run` calls (`main.parse_flags`, then `main.main`) with `sys.argv` set as `app.run` leaves it
(ml_collections reads the `--config.*` overrides from it), and gives back the exit status and the
text written to stderr, log records of WARNING and above included, in the order they came. The
flags are left unparsed as they were, with the per-override flags that ml_collections defines
removed, so that the next call starts clean.

A refusal that only a fresh process can show (a device count forced through XLA_FLAGS, noise at
interpreter exit) still needs a subprocess.
"""

import contextlib
import dataclasses
import io
import logging
import sys
from unittest import mock

from absl import flags

from diffusion_jax import main


@dataclasses.dataclass(frozen=True)
class Result:
    """What a run of main left: its exit status and the text it wrote to stderr."""

    returncode: int
    stderr: str


def _exit_code(exit_: SystemExit) -> int:
    if exit_.code is None:
        return 0
    return exit_.code if isinstance(exit_.code, int) else 1


def run_main(*args: str) -> Result:
    """Runs main on `args` (the words after `python -m diffusion_jax.main`) in this process."""
    argv = ['diffusion_jax.main', *args]
    before = set(flags.FLAGS)
    err = io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter('%(levelname)s %(message)s'))
    root = logging.getLogger()
    root.addHandler(handler)
    hook = sys.unraisablehook  # main replaces it for its own process
    code = 0
    try:
        with mock.patch.object(sys, 'argv', argv), contextlib.redirect_stderr(err):
            main.main(main.parse_flags(argv))
    except SystemExit as e:
        code = _exit_code(e)
    finally:
        sys.unraisablehook = hook
        root.removeHandler(handler)
        flags.FLAGS.unparse_flags()
        for name in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, name)
    return Result(code, err.getvalue())


# A tiny digits run: a one-level, 16-channel U-Net (its train step compiles in half the time of
# the digits' two levels) trained 4 steps with checkpoints at 2 and 4, and 4 samples drawn in 2
# spaced steps of the T=250 chain. `conftest.tiny_workdir` trains one; tests that run main
# against it pass the same flags, so that the checkpoint's config and theirs agree.
TINY_DIGITS = (
    '--config=configs/digits.py',
    '--config.model.ch=16',
    '--config.model.num_groups=8',
    '--config.model.ch_mult=(1,)',
    '--config.training.batch_size=8',
    '--config.training.num_train_steps=4',
    '--config.training.checkpoint_every_steps=2',
    '--config.training.sample_every_steps=0',
    '--config.sampling.num_samples=4',
    '--config.sampling.batch_size=4',
    '--config.sampling.num_steps=2',
)


def tiny_digits_args(workdir: str) -> list[str]:
    """main's arguments for the `TINY_DIGITS` run in `workdir`."""
    return [*TINY_DIGITS, f'--workdir={workdir}']
