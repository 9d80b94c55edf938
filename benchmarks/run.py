"""Benchmarks: `python -m benchmarks.run --suite=cpu|gpu --out=FILE.json [--peer=auto|on|off]`.

Measures, after a warm-up call and with `block_until_ready`:
* train: steps/s and images/s of the jitted train step and its compile time, in the --dtype
  compute dtype and (unless --nobf16_train) also in bfloat16;
* sampling: images/s of ancestral sampling over all T=1000 steps and of DDIM with 50 steps, the
  sampler's compile time, and compile time against T (one `lax.scan`, so it must stay flat);
* the FLOPs of a train step and of one reverse step from XLA's cost analysis, both of the
  compiled program and of the model as the paper writes it (`suites.MODEL_FORM`, lowered only),
  the FLOP/s they imply, and MFU (model FLOPs) against the device's peak (`peaks`;
  --peak_tflops overrides it);
* memory per measurement: the device's `peak_bytes_in_use` where the backend counts it (a
  high-water mark since the process started: measurements run from the smallest to the
  largest), else the process's host RSS sampled during the measurement (`memory`); and XLA's
  own buffer-assignment peak of the compiled program;
* the PyTorch peer (`peer_torch`: diffusers' UNet2DModel as the same network, torch Adam and
  diffusers' schedulers) in a child process of this invocation when --peer allows, with our/peer
  ratios of throughput and memory. On the cpu suite (--interleave) the two sides take turns,
  one timed call each per round (`interleave`), and the ratios also give each round's; on a
  GPU the peer runs first, before JAX takes the device's memory.

The `cpu` suite uses the digits network (8x8, 651k parameters) so it runs in a few minutes on a
laptop; the `gpu` suite uses the paper's CIFAR10 network (35.7M) at batch 128. Both use the
paper's linear betas with T=1000. Timings are medians of --repeats calls. Never run these as
tests: they measure, they do not check.
"""

import contextlib
import functools
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from benchmarks import interleave, memory, peaks, report, suites
from diffusion_jax import experiment, parallel, sampling, train

_SUITE = flags.DEFINE_enum('suite', 'cpu', tuple(suites.SUITES), 'Which sizes to measure.')
_OUT = flags.DEFINE_string('out', None, 'Write the results here as JSON.')
_REPEATS = flags.DEFINE_integer(
    'repeats', 5, 'Timed calls per measurement, per side (the median is reported).'
)
_DTYPE = flags.DEFINE_enum(
    'dtype',
    'float32',
    suites.DTYPES,
    'Compute dtype (ours: config.model.dtype; the peer: autocast).',
)
_BF16_TRAIN = flags.DEFINE_bool('bf16_train', True, 'Also time a bfloat16 train step.')
_PEER = flags.DEFINE_enum(
    'peer', 'auto', ('auto', 'on', 'off'), 'The PyTorch peer; auto: if torch and diffusers exist.'
)
_PEER_RESULT = flags.DEFINE_string(
    'peer_result',
    None,
    'Read the peer from this JSON (written by `python -m benchmarks.peer_torch --out=...`) '
    'instead of running it; `benchmarks/device.sh` runs the peer under its own time limit.',
)
_PEER_CHECK = flags.DEFINE_bool('peer_check', True, "Check the peer computes our U-Net's function.")
_INTERLEAVE = flags.DEFINE_bool(
    'interleave',
    True,
    'cpu suite: time ours and the peer in turns, one call each per round (`interleave`), so '
    "that this machine's slow spells fall on both; otherwise the peer runs first, all at once.",
)
_PEAK_TFLOPS = flags.DEFINE_float('peak_tflops', None, 'Peak TFLOP/s per device for MFU.')
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _seconds(fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    return statistics.median(_seconds(fn, repeats))


def _measure(
    fn: Callable[[], object], repeats: int, peer_call: Callable[[], float] | None = None
) -> tuple[float, dict, list[float]]:
    """(median seconds of fn, the memory record of the timed calls, the seconds of each).

    With `peer_call` (`interleave.Peer.time` of the same measurement), the peer's calls take
    turns with ours (`interleave.take_turns`).
    """
    with memory.HostRssPeak() as host:
        if peer_call is None:
            times = _seconds(fn, repeats)
        else:
            times, _ = interleave.take_turns(
                lambda: jax.block_until_ready(fn()), peer_call, repeats
            )
        seconds = statistics.median(times)
    stats = jax.devices()[0].memory_stats()
    if stats and 'peak_bytes_in_use' in stats:
        record = {
            'kind': 'device',
            'peak_bytes': int(stats['peak_bytes_in_use']),
            'note': 'peak_bytes_in_use of device 0 since the process started',
        }
    else:  # XLA:CPU does not count its bytes
        record = host.as_dict()
    return seconds, record, times


def _peer_call(peer: interleave.Peer | None, name: str) -> Callable[[], float] | None:
    """Times one call of the peer's `name` measurement, if a serving peer has it."""
    if peer is None or name not in peer.names:
        return None
    return functools.partial(peer.time, name)


def _flops(program) -> float | None:
    """XLA's FLOP count of a compiled or a lowered (unoptimised) program."""
    analysis = program.cost_analysis()
    if isinstance(analysis, list):  # older jax returns one dict per device program
        analysis = analysis[0] if analysis else None
    return float(analysis['flops']) if analysis and 'flops' in analysis else None


def _program_bytes(compiled) -> int | None:
    """XLA's buffer-assignment peak of the compiled program (arguments, outputs, temporaries)."""
    try:
        return int(compiled.memory_analysis().peak_memory_in_bytes)
    except (AttributeError, TypeError, ValueError):
        return None


def bench_train(suite: str, dtype: str, repeats: int, peer: interleave.Peer | None = None) -> dict:
    """Times the jitted train step on a fixed random batch [B, S, S, C] in [-1, 1].

    With `peer` (serving), its train step of the same dtype takes turns with ours.
    """
    config, s = suites.get_config(suite, dtype=dtype), suites.SUITES[suite]
    mesh = parallel.create_mesh()
    exp = experiment.build(config)
    num_params = exp.num_params
    assert num_params == s.num_params, f'{num_params:,} parameters, the suite says {s.num_params:,}'
    state = exp.init_state(jax.random.key(0), mesh)
    images = np.random.default_rng(0).uniform(-1, 1, (s.train_batch, *exp.image_shape))
    batch = parallel.global_batch({'image': images.astype(np.float32)}, mesh)
    rng = jax.device_put(jax.random.key(1), parallel.replicated(mesh))
    step_fn = train.make_jit_train_step(config, exp.diffusion, exp.learning_rate_fn, mesh)
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - start
    holder = [jax.block_until_ready(compiled(state, batch, rng)[0])]  # warm-up

    def run():
        s_ = holder[0]
        for _ in range(s.train_steps):
            s_, metrics = compiled(s_, batch, rng)
        holder[0] = s_
        return metrics['loss']

    call_seconds, mem, times = _measure(run, repeats, _peer_call(peer, f'train_{dtype}'))
    seconds = call_seconds / s.train_steps
    flops = _flops(compiled)
    paper = suites.get_config(suite, dtype=dtype, paper_form=True)
    paper_exp = experiment.build(paper)
    paper_fn = train.make_jit_train_step(
        paper, paper_exp.diffusion, paper_exp.learning_rate_fn, mesh
    )
    paper_state = state.replace(apply_fn=paper_exp.model.apply)  # the step calls apply_fn
    model_flops = _flops(paper_fn.lower(paper_state, batch, rng))
    return {
        'batch_size': s.train_batch,
        'dtype': dtype,
        'num_params': num_params,
        'compile_s': compile_s,
        'step_ms': 1e3 * seconds,
        'steps_per_s': 1 / seconds,
        'images_per_s': s.train_batch / seconds,
        'xla_flops_per_step': flops,
        'model_flops_per_step': model_flops,
        'achieved_tflops': model_flops / seconds / 1e12 if model_flops else None,
        'memory': mem,
        'xla_program_peak_bytes': _program_bytes(compiled),
        'round_seconds': times,  # each timed call, `train_steps` steps
    }


def _make_sample_fn(config, sampler: str, num_steps, batch_size: int):
    """The jitted one-scan sampler of `config`'s network, and the experiment it was built from."""
    exp = experiment.build(config)
    fn = sampling.make_sample_fn(
        exp.model,
        exp.diffusion,
        batch_size=batch_size,
        image_shape=exp.image_shape,
        sampler=sampler,
        num_steps=num_steps,
        mesh=parallel.create_mesh(),
    )
    return fn, exp


def _sample_fn(suite: str, sampler: str, num_steps, num_timesteps: int = 1000, dtype='float32'):
    config = suites.get_config(suite, num_timesteps, dtype)
    batch_size = suites.SUITES[suite].sample_batch
    fn, exp = _make_sample_fn(config, sampler, num_steps, batch_size)
    shape = (1, *exp.image_shape)
    params = jax.jit(
        lambda r: exp.model.init(
            r, np.zeros(shape, np.float32), np.zeros((1,), np.int32), train=False
        )['params']
    )(jax.random.key(0))
    return fn, params, batch_size


def bench_sampling(
    suite: str, dtype: str, repeats: int, peer: interleave.Peer | None = None
) -> dict:
    """Times each of `suites.SAMPLERS` on one batch, from noise to images.

    With `peer` (serving), its sampler of the same name takes turns with ours.
    """
    results = {}
    for sampler, num_steps in suites.SAMPLERS:
        fn, params, batch_size = _sample_fn(suite, sampler, num_steps, dtype=dtype)
        rng = jax.random.key(0)
        start = time.perf_counter()
        compiled = fn.lower(params, rng).compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(compiled(params, rng, np.int32(0)))  # warm-up
        run = functools.partial(compiled, params, rng, np.int32(0))
        name = f'{sampler}_{num_steps}'
        seconds, mem, times = _measure(run, repeats, _peer_call(peer, name))
        flops = _flops(compiled)
        paper = suites.get_config(suite, dtype=dtype, paper_form=True)
        paper_fn = _make_sample_fn(paper, sampler, num_steps, batch_size)[0]  # same params
        model_flops = _flops(paper_fn.lower(params, rng))
        results[name] = {
            'batch_size': batch_size,
            'num_steps': num_steps,
            'dtype': dtype,
            'compile_s': compile_s,
            'seconds_per_batch': seconds,
            'images_per_s': batch_size / seconds,
            'hours_for_50k': 50_000 / (batch_size / seconds) / 3600,
            # XLA's cost analysis counts a scan's body once, i.e. one reverse step.
            'xla_flops_per_reverse_step': flops,
            'model_flops_per_reverse_step': model_flops,
            'achieved_tflops': model_flops * num_steps / seconds / 1e12 if model_flops else None,
            'memory': mem,
            'xla_program_peak_bytes': _program_bytes(compiled),
            'round_seconds': times,
        }
    return results


def compile_vs_num_timesteps(suite: str) -> dict[str, float]:
    """Compile seconds of the ancestral sampler for each T in `suites.COMPILE_VS_T`."""
    out = {}
    for num_timesteps in suites.COMPILE_VS_T:
        fn, params, _ = _sample_fn(suite, 'ancestral', None, num_timesteps)
        start = time.perf_counter()
        fn.lower(params, jax.random.key(0)).compile()
        out[str(num_timesteps)] = time.perf_counter() - start
    return out


def _peer_unavailable(mode: str) -> dict | None:
    """The peer's record if it is not to run (--peer=off, or torch or diffusers missing)."""
    if mode == 'off':
        return {'status': 'off'}
    missing = [m for m in ('torch', 'diffusers') if importlib.util.find_spec(m) is None]
    if missing:
        if mode == 'on':
            raise app.UsageError(f'--peer=on needs {missing}: pip install -e ".[bench]"')
        return {'status': 'peer not installed', 'missing': missing}
    return None


def _peer_args(
    suite: str, train_dtypes, sample_dtype: str, repeats: int | None, out: str
) -> list[str]:
    """The peer's command line; `repeats` None: it serves (--serve), ours sets the rounds."""
    timing = ['--serve'] if repeats is None else [f'--repeats={repeats}']
    return [
        '-m',
        'benchmarks.peer_torch',
        f'--suite={suite}',
        f'--train_dtypes={",".join(train_dtypes)}',
        f'--sample_dtype={sample_dtype}',
        *timing,
        f'--check={_PEER_CHECK.value}',
        f'--out={out}',
    ]


def _peer_env() -> dict:
    # The peer's JAX (its correctness check only) stays on the CPU, off the GPU.
    return {**os.environ, 'JAX_PLATFORMS': 'cpu'}


def _peer_record(mode: str, returncode: int, out: str, args: list[str]) -> dict:
    """The peer's JSON record once its process has exited with `returncode`."""
    if returncode:
        if mode == 'on':
            raise RuntimeError(f'the peer failed (exit {returncode}); see its log above')
        return {'status': 'failed', 'returncode': returncode}
    with open(out) as f:
        result = json.load(f)
    command = 'python ' + ' '.join(a for a in args if not a.startswith('--out='))
    return {'status': 'ok', 'command': command, **result}


def run_peer(mode: str, suite: str, train_dtypes, sample_dtype: str, repeats: int) -> dict:
    """Runs `benchmarks.peer_torch` in a child process of this interpreter; its JSON record."""
    unavailable = _peer_unavailable(mode)
    if unavailable:
        return unavailable
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'peer.json')
        args = _peer_args(suite, train_dtypes, sample_dtype, repeats, out)
        proc = subprocess.run([sys.executable, *args], cwd=_REPO, env=_peer_env(), check=False)
        return _peer_record(mode, proc.returncode, out, args)


def start_peer(
    mode: str, suite: str, train_dtypes, sample_dtype: str, tmp: str
) -> tuple[interleave.Peer | None, dict]:
    """Starts `benchmarks.peer_torch --serve`; (the serving peer or None, its record so far).

    Returns once the peer has prepared and warmed up all its measurements.
    """
    unavailable = _peer_unavailable(mode)
    if unavailable:
        return None, unavailable
    out = os.path.join(tmp, 'peer.json')
    args = _peer_args(suite, train_dtypes, sample_dtype, None, out)
    try:
        peer = interleave.Peer([sys.executable, *args], cwd=_REPO, env=_peer_env())
    except interleave.PeerError as e:
        if mode == 'on':
            raise RuntimeError(f'the peer failed to start: {e}') from e
        return None, {'status': 'failed', 'error': str(e)}
    return peer, {'status': 'serving', 'args': args, 'out': out}


def finish_peer(peer: interleave.Peer, mode: str, record: dict) -> dict:
    """Stops the serving peer; its JSON record (`run_peer`'s, with 'interleaved': True).

    Args:
        peer: the serving peer (`start_peer`).
        mode: --peer.
        record: the record `start_peer` returned with it.
    """
    result = _peer_record(mode, peer.finish(), record['out'], record['args'])
    return {**result, 'interleaved': True} if result['status'] == 'ok' else result


def _peak(row: dict, kind: str, platform_name: str, num_devices: int) -> dict | None:
    return peaks.device_peak(
        kind, platform_name, row['dtype'], num_devices, override_tflops=_PEAK_TFLOPS.value
    )


def add_mfu_and_ratios(results: dict) -> None:
    """Adds 'peak' and 'mfu' to every row (ours and the peer's) and results['ratios']."""
    machine = results['machine']
    peer = results['peer'] if results['peer'].get('status') == 'ok' else None
    ours_rows = {f'train_{k}': v for k, v in results['train'].items()}
    ours_rows.update(
        {k: v for k, v in results['sampling'].items() if isinstance(v, dict) and 'dtype' in v}
    )
    results['ratios'] = {}
    for name, row in ours_rows.items():
        is_train = name.startswith('train_')
        flops = row['model_flops_per_step'] if is_train else row['model_flops_per_reverse_step']
        seconds = row['step_ms'] / 1e3 if is_train else row['seconds_per_batch']
        flops = flops if is_train or flops is None else flops * row['num_steps']
        row['peak'] = _peak(row, machine['device_kind'], machine['backend'], machine['num_devices'])
        row['mfu'] = peaks.mfu(flops, seconds, row['peak'])
        if peer is None:
            continue
        theirs = peer['train'].get(name[6:]) if is_train else peer['sampling'].get(name)
        if theirs is None:
            continue
        platform_name = 'cpu' if machine['backend'] == 'cpu' else 'cuda'
        theirs['peak'] = _peak(theirs, peer['device'], platform_name, 1)
        their_seconds = theirs['step_ms'] / 1e3 if is_train else theirs['seconds_per_batch']
        theirs['mfu'] = peaks.mfu(flops, their_seconds, theirs['peak'])
        same_kind = row['memory']['kind'] == theirs['memory']['kind']
        results['ratios'][name] = {
            'ours_over_peer_throughput': row['images_per_s'] / theirs['images_per_s'],
            'ours_over_peer_peak_memory': (
                row['memory']['peak_bytes'] / theirs['memory']['peak_bytes'] if same_kind else None
            ),
        }
        if peer.get('interleaved'):  # the same rounds on both sides, in turns
            results['ratios'][name]['rounds'] = interleave.round_ratios(
                row['round_seconds'], theirs['round_seconds']
            )


def _matmul_tflops(dtype: str) -> float:
    """TFLOP/s of a large square matmul on device 0: what the device reaches in practice."""
    n = 2048 if jax.default_backend() == 'cpu' else 8192
    a = jnp.ones((n, n), jnp.dtype(dtype))
    matmul = jax.jit(lambda x: x @ x)
    jax.block_until_ready(matmul(a))
    return 2 * n**3 / _median_seconds(lambda: matmul(a), 3) / 1e12


def _write_partial(results: dict) -> None:
    """The measurements so far, to `--out`.partial.json: a run stopped by a limit keeps them."""
    if _OUT.value:
        with open(_OUT.value + '.partial.json', 'w') as f:
            json.dump(results, f, indent=2)


def main(argv: list[str]) -> None:
    del argv
    with contextlib.ExitStack() as stack:
        _run(stack)


def _run(stack: contextlib.ExitStack) -> None:
    suite, dtype, repeats = _SUITE.value, _DTYPE.value, _REPEATS.value
    train_dtypes = suites.train_dtypes(dtype, _BF16_TRAIN.value)
    results = {
        'suite': suite,
        'dtype': dtype,
        'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
        'load_average_start': os.getloadavg(),
    }
    # The peer first, before JAX takes the accelerator (and, on GPUs, most of its memory); on
    # the cpu suite it only prepares, then takes turns with ours.
    peer = None
    if _PEER_RESULT.value:
        with open(_PEER_RESULT.value) as f:
            results['peer'] = {
                'status': 'ok',
                'command': f'read from {_PEER_RESULT.value}',
                **json.load(f),
            }
    elif _INTERLEAVE.value and suite == 'cpu':
        logging.info('PyTorch peer (--peer=%s), serving in turns with ours', _PEER.value)
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        peer, results['peer'] = start_peer(_PEER.value, suite, train_dtypes, dtype, tmp)
        if peer is not None:
            stack.callback(peer.close)  # stops the child if ours fails
    else:
        logging.info('PyTorch peer (--peer=%s)', _PEER.value)
        results['peer'] = run_peer(_PEER.value, suite, train_dtypes, dtype, repeats)
    results['machine'] = {
        'platform': platform.platform(),
        'python': sys.version.split()[0],
        'jax': jax.__version__,
        'backend': jax.default_backend(),
        'devices': [str(d) for d in jax.devices()],
        'device_kind': jax.devices()[0].device_kind,
        'num_devices': jax.device_count(),
        'cpu_cores': len(os.sched_getaffinity(0)),
        'matmul_tflops': _matmul_tflops(dtype),
    }
    # Smallest memory first: the device's peak_bytes_in_use only ever grows.
    logging.info('samplers (%s suite, %s)', suite, dtype)
    results['sampling'] = bench_sampling(suite, dtype, repeats, peer)
    _write_partial(results)
    results['train'] = {}
    for train_dtype in reversed(train_dtypes):
        logging.info('train step (%s suite, %s)', suite, train_dtype)
        results['train'][train_dtype] = bench_train(suite, train_dtype, repeats, peer)
        _write_partial(results)
    results['train'] = {k: results['train'][k] for k in train_dtypes}
    if peer is not None:  # before anything else runs: the peer's check takes the CPU
        results['peer'] = finish_peer(peer, _PEER.value, results['peer'])
    results['sampling']['compile_s_vs_num_timesteps'] = compile_vs_num_timesteps(suite)
    results['load_average_end'] = os.getloadavg()
    add_mfu_and_ratios(results)
    text = json.dumps(results, indent=2)
    print(text)
    print(report.format_table(results))
    if _OUT.value:
        with open(_OUT.value, 'w') as f:
            f.write(text + '\n')


if __name__ == '__main__':
    app.run(main)
