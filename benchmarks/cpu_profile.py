"""Where the CPU train step's time goes: a profile of the compiled step, per operation kind.

    python -m benchmarks.cpu_profile [--steps=20] [--out=profile.json]

Compiles the `cpu` suite's train step (the digits network, batch 64, float32) as
`benchmarks.run` does, runs it under `jax.profiler` and reads the trace: XLA:CPU records one
event per thunk (a fusion, a copy, a convolution or a matmul), named after its HLO instruction.
Each instruction is put in one kind by what the compiled HLO says about it: the operations inside
it (convolution, dot, reduce) and the JAX name stack of its metadata (inside the U-Net or not:
the loss, the optimizer, the EMA and the non-finite check). Prints, per kind, the thunks per
step and their time per step, next to the step's wall time. Where XLA:CPU runs a thunk
asynchronously (Eigen's convolutions, since `diffusion_jax.xla_cpu`'s default) its event
covers only its launch, so `--ablation` times the step's parts instead: the forward pass, the
forward and backward passes, and the whole step, each compiled alone. Set XLA_FLAGS before it
runs to profile other XLA options.
"""

import ast
import collections
import contextlib
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import suites
from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import experiment, parallel, train

_STEPS = flags.DEFINE_integer('steps', 20, 'Profiled train steps (after a warm-up step).')
_OUT = flags.DEFINE_string('out', None, 'Write the table as JSON here.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Unprofiled timed runs of --steps steps (median).')
_PROFILE = flags.DEFINE_bool('profile', True, 'Also profile; False: time the step only.')
_ABLATION = flags.DEFINE_bool('ablation', False, 'Time the forward, forward+backward and step.')
_CONFIG = flags.DEFINE_multi_string('set', [], 'Config overrides KEY=VALUE, e.g. model.remat=1.')

_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z\-]+)\((.*)$')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _parse_hlo(text: str) -> tuple[dict[str, set[str]], dict[str, tuple[str, str, list[str]]]]:
    """(computation -> opcodes in it, ENTRY instruction -> (opcode, op_name, called comps))."""
    computations: dict[str, set[str]] = collections.defaultdict(set)
    entry: dict[str, tuple[str, str, list[str]]] = {}
    current, in_entry = None, False
    for line in text.splitlines():
        if line and not line.startswith(' ') and '{' in line and '(' in line:
            header = line.split('(')[0].split()
            in_entry = header[0] == 'ENTRY'
            current = header[-1].lstrip('%')
            continue
        m = _INSTRUCTION.match(line)
        if not m or current is None:
            continue
        name, opcode, rest = m.groups()
        computations[current].add(opcode)
        if in_entry:
            op_name = _OP_NAME.search(rest)
            entry[name] = (opcode, op_name.group(1) if op_name else '', _CALLS.findall(rest))
    return computations, entry


def classify(opcode: str, op_name: str, inner: set[str]) -> str:
    """The kind of one thunk (see the module docstring).

    Forward and backward are not told apart: XLA's fusions keep the name stack of one of their
    ops, which for the kernel gradients' convolutions is often the forward pass's.
    """
    if 'convolution' in inner or opcode == 'convolution':
        return 'convolutions (forward and both gradients)'
    if 'dot' in inner or opcode == 'dot':
        return 'matmuls (dense layers, attention)'
    if opcode == 'copy' or inner <= {'copy', 'transpose', 'parameter', 'bitcast'}:
        return 'copies and transposes'
    if 'UNet' in op_name:
        if 'reduce' in inner:
            return 'reductions (GroupNorm statistics)'
        return 'elementwise (GroupNorm, swish, ...)'
    if opcode in ('while', 'call', 'conditional'):
        return 'control flow'
    return 'optimizer, clipping, EMA, non-finite check, loss'


def _compiled_step(overrides: list[str]):
    config = suites.get_config('cpu')
    for item in overrides:
        key, value = item.split('=', 1)
        section, name = key.split('.')
        with contextlib.suppress(ValueError, SyntaxError):  # else a plain string
            value = ast.literal_eval(value)
        config[section][name] = value
    mesh = parallel.create_mesh()
    exp = experiment.build(config)
    state = exp.init_state(jax.random.key(0), mesh)
    batch_size = suites.SUITES['cpu'].train_batch
    images = np.random.default_rng(0).uniform(-1, 1, (batch_size, *exp.image_shape))
    batch = parallel.global_batch({'image': images.astype(np.float32)}, mesh)
    rng = jax.device_put(jax.random.key(1), parallel.replicated(mesh))
    step_fn = train.make_jit_train_step(config, exp.diffusion, exp.learning_rate_fn, mesh)
    return step_fn.lower(state, batch, rng).compile(), state, batch, rng


def _median_ms(fn, args, steps: int, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            out = fn(*args)
        jax.block_until_ready(out)
        timings.append((time.perf_counter() - start) / steps)
    return 1e3 * sorted(timings)[len(timings) // 2]


def ablation(steps: int, overrides: list[str], repeats: int) -> dict[str, float]:
    """ms per call of the step's parts, compiled alone: the loss (forward pass), the loss and
    its gradient (forward and backward passes), and the whole step (plus the optimizer, the
    clipping, the EMA and the non-finite check). Their differences attribute the step's time
    where the profile's thunk times cannot (XLA:CPU's Eigen convolutions run asynchronously)."""
    compiled, state, batch, rng = _compiled_step(overrides)
    config = suites.get_config('cpu')
    exp = experiment.build(config)
    inputs, dropout_rng = train._step_inputs(batch, rng, exp.diffusion, None, 0, 0.0)

    def loss(params):
        losses, _ = train._loss_and_grads(params, state.apply_fn, exp.diffusion, inputs,
                                          dropout_rng, 1)  # fmt: skip
        return losses['loss']

    def forward(params):
        def model_fn(x_t, t):
            return state.apply_fn({'params': params}, x_t, t, train=True,
                                  rngs={'dropout': dropout_rng})  # fmt: skip

        x_start, t, noise = inputs[:3]
        losses = diffusion_lib.training_losses(exp.diffusion, model_fn, x_start, t, noise)
        return jnp.mean(losses['loss'])

    def grads(params):
        return train._loss_and_grads(params, state.apply_fn, exp.diffusion, inputs,
                                     dropout_rng, 1)[1]  # fmt: skip

    holder = [state]

    def step():
        holder[0], metrics = compiled(holder[0], batch, rng)
        return metrics['loss']

    return {
        'forward_ms': _median_ms(jax.jit(forward), (state.params,), steps, repeats),
        'forward_backward_ms': _median_ms(jax.jit(grads), (state.params,), steps, repeats),
        'step_ms': _median_ms(step, (), steps, repeats),
    }


def _trace_events(directory: str) -> list[dict]:
    path = glob.glob(os.path.join(directory, '**', 'perfetto_trace.json.gz'), recursive=True)[0]
    with gzip.open(path) as f:
        data = json.load(f)
    return data['traceEvents'] if isinstance(data, dict) else data


def profile(steps: int, overrides: list[str], repeats: int = 3, trace: bool = True) -> dict:
    compiled, state, batch, rng = _compiled_step(overrides)
    state, _ = jax.block_until_ready(compiled(state, batch, rng))  # warm-up
    timings = []
    for _ in range(repeats):  # unprofiled: the step's own time, the median run
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, batch, rng)
        jax.block_until_ready(metrics)
        timings.append((time.perf_counter() - start) / steps)
    step_ms = 1e3 * sorted(timings)[len(timings) // 2]
    if not trace:
        return {'step_ms': step_ms, 'xla_flags': os.environ.get('XLA_FLAGS', '')}
    computations, entry = _parse_hlo(compiled.as_text())
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(steps):
                state, metrics = compiled(state, batch, rng)
            jax.block_until_ready(metrics)
            wall = (time.perf_counter() - start) / steps
        events = _trace_events(tmp)
    per_kind: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get('ph') != 'X' or e.get('name') not in entry:
            continue
        opcode, op_name, calls = entry[e['name']]
        inner = set().union(*(computations.get(c, set()) for c in calls))
        kind = classify(opcode, op_name, inner)
        per_kind[kind][0] += 1
        per_kind[kind][1] += float(e['dur']) * 1e-3  # us -> ms
    rows = {k: {'thunks': n / steps, 'ms': ms / steps} for k, (n, ms) in per_kind.items()}
    return {
        'step_ms': step_ms,
        'step_wall_ms': 1e3 * wall,
        'thunk_ms': sum(r['ms'] for r in rows.values()),
        'thunks': sum(r['thunks'] for r in rows.values()),
        'kinds': dict(sorted(rows.items(), key=lambda kv: -kv[1]['ms'])),
        'xla_flags': os.environ.get('XLA_FLAGS', ''),
        'overrides': overrides,
    }


def main(argv: list[str]) -> None:
    del argv
    if _ABLATION.value:
        parts = ablation(_STEPS.value, _CONFIG.value, _REPEATS.value)
        print(', '.join(f'{k} {v:.1f}' for k, v in parts.items()))
        return
    result = profile(_STEPS.value, _CONFIG.value, _REPEATS.value, _PROFILE.value)
    if not _PROFILE.value:
        print(f'step {result["step_ms"]:.1f} ms')
        return
    print(
        f'step {result["step_ms"]:.1f} ms ({result["step_wall_ms"]:.1f} ms profiled); thunks '
        f'{result["thunks"]:.0f}'
        f' per step, {result["thunk_ms"]:.1f} ms in them'
    )
    print('| kind | thunks per step | ms per step | share of thunk time |')
    print('|---|---:|---:|---:|')
    for kind, row in result['kinds'].items():
        share = row['ms'] / result['thunk_ms']
        print(f'| {kind} | {row["thunks"]:.0f} | {row["ms"]:.1f} | {share:.0%} |')
    if _OUT.value:
        with open(_OUT.value, 'w') as f:
            json.dump(result, f, indent=1)


if __name__ == '__main__':
    app.run(main)
