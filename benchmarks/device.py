"""The one prepared run for the lent GPU (`benchmarks/device.sh` calls it; see its header).

Each step runs as a child process under its own time limit, all inside one overall budget, so
no step can eat the lease: a step that runs out is killed (with its children), recorded as
'timeout', and the next one starts. The benchmark steps write partial JSON as they go, so a
killed step still reports what it measured. Writes OUT/results_gpu.json and prints a short
table last. This file imports no JAX itself: the GPU belongs to the children.

    python benchmarks/device.py --out=DIR [--rehearse] [--budget_s=450]
"""

import argparse
import glob
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA_VERSION = 1

# Seconds per step on the GPU; --rehearse scales them (a 2-core CPU runs reduced sizes slower).
GPU_LIMITS_S = {'environment': 15, 'gpu_tests': 60, 'peer': 110, 'ours': 220, 'digits_cli': 60}
REHEARSE_SCALE = 2.0
DIGITS_STEPS = 200

# Every key results_gpu.json must have, nested with dots; tests/device_test.py checks the
# committed rehearsal against it.
REQUIRED_KEYS = (
    'schema_version',
    'mode',
    'date',
    'budget_s',
    'wall_s',
    'steps.environment.status',
    'steps.gpu_tests.status',
    'steps.peer.status',
    'steps.ours.status',
    'steps.digits_cli.status',
    'environment.python',
    'environment.jax',
    'environment.backend',
    'environment.device_kind',
    'environment.packages',
    'environment.tensorflow_imported',
    'gpu_tests.passed',
    'gpu_tests.failed',
    'gpu_tests.skipped',
    'benchmark.suite',
    'benchmark.train',
    'benchmark.sampling',
    'benchmark.peer',
    'sampling_50k.ancestral_1000.minutes',
    'sampling_50k.ddim_50.minutes',
    'digits_cli.num_train_steps',
    'digits_cli.seconds',
    'digits_cli.final_loss',
    'digits_cli.tensorboard_events',
)
STEP_STATUSES = ('ok', 'failed', 'timeout', 'skipped')

_ENV_SCRIPT = r"""
import importlib.metadata as md, json, sys
import jax
import diffusion_jax  # the package import must not load TensorFlow
names = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'chex', 'numpy', 'ml-collections',
         'tensorboard', 'torch', 'diffusers', 'jax-cuda13-plugin', 'jax-cuda12-plugin')
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
print(json.dumps({
    'python': sys.version.split()[0],
    'jax': jax.__version__,
    'backend': jax.default_backend(),
    'devices': [str(d) for d in jax.devices()],
    'device_kind': jax.devices()[0].device_kind,
    'packages': {n: version(n) for n in names},
    'tensorflow_imported': any(
        m in sys.modules for m in ('tensorflow', 'tensorflow_datasets', 'clu')),
}))
"""


class Runner:
    """Runs steps in child processes within one overall deadline, logging to one file."""

    def __init__(self, out: str, budget_s: float, scale: float, env: dict[str, str]):
        self.out, self.scale, self.env = out, scale, env
        self.deadline = time.monotonic() + budget_s
        self.log_path = os.path.join(out, 'device.log')
        self.steps: dict[str, dict] = {}

    def run(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> str:
        """Runs `argv` as step `name`; returns its stdout (what it printed, even on failure)."""
        limit = min(GPU_LIMITS_S[name] * self.scale, self.deadline - time.monotonic())
        if limit < 5:
            self.steps[name] = {'status': 'skipped', 'why': 'the overall budget is spent'}
            self._log(f'== {name}: skipped, the overall budget is spent\n')
            return ''
        self._log(f'== {name} (limit {limit:.0f} s): {" ".join(argv)}\n')
        start = time.monotonic()
        with open(self.log_path, 'a') as log:
            proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env={**self.env, **(extra_env or {})},
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                start_new_session=True,  # a timeout kills the whole group (the peer's child too)
            )
            try:
                stdout, _ = proc.communicate(timeout=limit)
                status = 'ok' if proc.returncode == 0 else 'failed'
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                stdout, _ = proc.communicate()
                status = 'timeout'
            log.write(stdout)
        seconds = time.monotonic() - start
        self.steps[name] = {
            'status': status,
            'seconds': round(seconds, 1),
            'limit_s': round(limit),
            'returncode': proc.returncode,
        }
        self._log(f'== {name}: {status} in {seconds:.1f} s (exit {proc.returncode})\n')
        return stdout

    def _log(self, text: str) -> None:
        with open(self.log_path, 'a') as log:
            log.write(text)
        sys.stdout.write(text)
        sys.stdout.flush()


def _load(path: str) -> tuple[dict | None, bool]:
    """(the JSON at path, or its '.partial.json' if only that exists; whether it is partial)."""
    for candidate, partial in ((path, False), (path + '.partial.json', True)):
        if os.path.exists(candidate):
            with open(candidate) as f:
                return json.load(f), partial
    return None, False


def _pytest_counts(text: str) -> dict[str, int]:
    counts = {'passed': 0, 'failed': 0, 'skipped': 0, 'errors': 0}
    for number, word in re.findall(r'(\d+) (passed|failed|skipped|errors?)', text):
        counts['errors' if word.startswith('error') else word] += int(number)
    return counts


def _finish_benchmark(bench: dict) -> dict:
    """Adds MFU and ours/peer ratios to a benchmark record that stopped before doing so."""
    if 'ratios' in bench or not bench.get('train') or not bench.get('machine'):
        return bench
    from absl import flags

    from benchmarks import run

    flags.FLAGS.mark_as_parsed()
    bench.setdefault('sampling', {})
    run.add_mfu_and_ratios(bench)
    return bench


def _fifty_k(bench: dict) -> dict:
    """Minutes for 50,000 samples, extrapolated from the timed full chains of each sampler."""
    out = {}
    for name in ('ancestral_1000', 'ddim_50'):
        row = bench.get('sampling', {}).get(name)
        out[name] = {
            'minutes': 50_000 / row['images_per_s'] / 60 if row else None,
            'from': f'{row["batch_size"]} images in {row["seconds_per_batch"]:.3g} s per chain'
            if row
            else 'not measured',
        }
    return out


def _digits_summary(workdir: str, seconds: float | None) -> dict:
    """What the digits CLI run left: final loss (from its TensorBoard events), files written."""
    record = {
        'num_train_steps': DIGITS_STEPS,
        'seconds': seconds,
        'final_loss': None,
        'tensorboard_events': 0,
        'checkpoints': [],
        'sample_grids': [],
    }
    events = sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*')))
    record['tensorboard_events'] = len(events)
    if events:
        from tensorboard.backend.event_processing import event_accumulator

        acc = event_accumulator.EventAccumulator(events[-1])
        acc.Reload()
        if 'loss' in acc.Tags().get('scalars', []):
            last = acc.Scalars('loss')[-1]
            record['final_loss'], record['final_loss_step'] = last.value, last.step
    ckpt_dir = os.path.join(workdir, 'checkpoints')
    if os.path.isdir(ckpt_dir):
        record['checkpoints'] = sorted(os.listdir(ckpt_dir))
    samples = os.path.join(workdir, 'samples')
    record['sample_grids'] = sorted(os.listdir(samples)) if os.path.isdir(samples) else []
    return record


def missing_keys(results: dict) -> list[str]:
    """The REQUIRED_KEYS absent from `results`, and steps with an unknown status."""
    missing = []
    for key in REQUIRED_KEYS:
        node = results
        for part in key.split('.'):
            if not isinstance(node, dict) or part not in node:
                missing.append(key)
                break
            node = node[part]
    for name, step in results.get('steps', {}).items():
        if step.get('status') not in STEP_STATUSES:
            missing.append(f'steps.{name}.status (got {step.get("status")!r})')
    return missing


def _row(label: str, row: dict, theirs: dict | None, key: str, fmt: str, unit: str) -> str:
    """One table row: ours, the peer's, their ratio and our MFU (a '-' where missing)."""
    their_text = f'{theirs[key]:{fmt}} {unit}' if theirs else '-'
    ratio = f'{row[key] / theirs[key]:.2f}x' if theirs else '-'
    mfu = f'{100 * row["mfu"]:.1f}%' if row.get('mfu') is not None else '-'
    return (
        f'| {label}, batch {row["batch_size"]} | {row[key]:{fmt}} {unit} | {their_text} | '
        f'{ratio} | {mfu} |'
    )


def _table(results: dict) -> str:
    lines = ['| step | status | seconds |', '|---|---|---:|']
    for name, step in results['steps'].items():
        lines.append(f'| {name} | {step["status"]} | {step.get("seconds", "-")} |')
    bench = results['benchmark']
    lines += [
        '',
        '| measurement | ours | peer | ours / peer | MFU ours |',
        '|---|---:|---:|---:|---:|',
    ]
    peer = bench.get('peer', {}) if bench.get('peer', {}).get('status') == 'ok' else {}
    for dtype, row in bench.get('train', {}).items():
        theirs = peer.get('train', {}).get(dtype)
        lines.append(_row(f'train {dtype}', row, theirs, 'steps_per_s', '.2f', 'steps/s'))
    for name, row in bench.get('sampling', {}).items():
        if isinstance(row, dict) and 'images_per_s' in row:
            theirs = peer.get('sampling', {}).get(name)
            lines.append(_row(name, row, theirs, 'images_per_s', '.3g', 'img/s'))
    for name, row in results['sampling_50k'].items():
        minutes = '-' if row['minutes'] is None else f'{row["minutes"]:.1f} min'
        lines.append(f'| 50k samples, {name} | {minutes} | | | |')
    cli = results['digits_cli']
    loss = '-' if cli['final_loss'] is None else f'{cli["final_loss"]:.4f}'
    lines.append(
        f'| digits CLI, {cli["num_train_steps"]} steps | {cli["seconds"]} s, loss {loss} | | | |'
    )
    t = results['gpu_tests']
    lines.append(
        f'| gpu tests | {t["passed"]} passed, {t["failed"]} failed, {t["skipped"]} skipped | | | |'
    )
    return '\n'.join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', required=True, help='Folder for results_gpu.json and the log.')
    parser.add_argument('--rehearse', action='store_true', help='CPU rehearsal: reduced sizes.')
    parser.add_argument('--budget_s', type=float, default=450.0, help='Overall time limit.')
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    start = time.monotonic()
    suite, repeats = ('rehearse', 1) if args.rehearse else ('gpu', 1)
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    env['PYTHONPATH'] = os.pathsep.join(p for p in (env.get('PYTHONPATH'), REPO) if p)
    runner = Runner(args.out, args.budget_s, REHEARSE_SCALE if args.rehearse else 1.0, env)
    py = sys.executable

    environment = runner.run('environment', [py, '-c', _ENV_SCRIPT])
    ok = runner.steps['environment']['status'] == 'ok'
    environment = json.loads(environment.strip().splitlines()[-1]) if ok else {}

    # LLVM -O0: the tests compile their small programs (on the CPU as reference too) fast.
    gpu_env = {'XLA_FLAGS': '--xla_backend_optimization_level=0'}
    if args.rehearse:
        gpu_env['DIFFUSION_JAX_GPU_TESTS_ON_CPU'] = '1'
    tests_out = runner.run(
        'gpu_tests',
        [
            py,
            '-m',
            'pytest',
            '-q',
            '-m',
            'gpu',
            'tests/gpu_test.py',
            '-p',
            'no:cacheprovider',
            '-o',
            'addopts=-ra',
        ],
        gpu_env,
    )
    lines = tests_out.strip().splitlines()
    gpu_tests = _pytest_counts(lines[-1] if lines else '')

    peer_path = os.path.join(args.out, 'peer.json')
    runner.run(
        'peer',
        [
            py,
            '-m',
            'benchmarks.peer_torch',
            f'--suite={suite}',
            '--train_dtypes=float32,bfloat16',
            '--sample_dtype=float32',
            f'--repeats={repeats}',
            f'--out={peer_path}',
        ],
        {'JAX_PLATFORMS': 'cpu'},
    )
    peer, peer_partial = _load(peer_path)
    if peer is not None and peer_partial:
        with open(peer_path, 'w') as f:  # benchmarks.run reads what the peer measured
            json.dump({**peer, 'partial': True}, f)

    bench_path = os.path.join(args.out, 'bench.json')
    ours = [
        py,
        '-m',
        'benchmarks.run',
        f'--suite={suite}',
        f'--repeats={repeats}',
        f'--out={bench_path}',
    ]
    ours += [f'--peer_result={peer_path}'] if peer is not None else ['--peer=off']
    runner.run('ours', ours)
    bench, bench_partial = _load(bench_path)
    bench = _finish_benchmark(bench or {})
    bench.setdefault('suite', suite)
    bench.setdefault('train', {})
    bench.setdefault('sampling', {})
    bench.setdefault('peer', {'status': 'not measured'})
    bench['partial'] = bench_partial

    with tempfile.TemporaryDirectory() as workdir:
        runner.run(
            'digits_cli',
            [
                py,
                '-m',
                'diffusion_jax.main',
                '--config=configs/digits.py',
                f'--workdir={workdir}',
                f'--config.training.num_train_steps={DIGITS_STEPS}',
                '--config.training.log_every_steps=50',
                '--config.training.sample_every_steps=0',
            ],
        )
        digits = _digits_summary(workdir, runner.steps['digits_cli'].get('seconds'))

    results = {
        'schema_version': SCHEMA_VERSION,
        'mode': 'rehearse' if args.rehearse else 'gpu',
        'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
        'host': platform.node(),
        'budget_s': args.budget_s,
        'wall_s': round(time.monotonic() - start, 1),
        'steps': runner.steps,
        'environment': environment,
        'gpu_tests': gpu_tests,
        'benchmark': bench,
        'sampling_50k': _fifty_k(bench),
        'digits_cli': digits,
    }
    with open(os.path.join(args.out, 'results_gpu.json'), 'w') as f:
        json.dump(results, f, indent=2)
        f.write('\n')
    print(_table(results))
    problems = missing_keys(results)
    if problems:
        print('results_gpu.json lacks:', ', '.join(problems))
    failed = [n for n, s in runner.steps.items() if s['status'] != 'ok']
    print(
        f'wrote {os.path.join(args.out, "results_gpu.json")} in {results["wall_s"]} s; '
        f'steps not ok: {failed or "none"}'
    )
    return 1 if problems or failed else 0


if __name__ == '__main__':
    sys.exit(main())
