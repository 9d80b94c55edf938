"""Benchmarks: `python -m benchmarks.run --suite=cpu|gpu --out=FILE.json`.

Measures, after a warm-up call and with `block_until_ready`:
* train: steps/s and images/s of the jitted train step, and its compile time;
* sampling: images/s of ancestral sampling over all T=1000 steps and of DDIM with 50 steps, the
  sampler's compile time, and compile time against T (one `lax.scan`, so it must stay flat);
* the model FLOPs of a train step and of one reverse step from XLA's cost analysis, and the
  FLOP/s they imply.

The `cpu` suite uses the digits network (8x8, 651k parameters) so it runs in a few minutes on a
laptop; the `gpu` suite uses the paper's CIFAR10 network at batch 128. Timings are medians of
`--repeats` runs. Never run these as tests: they measure, they do not check.
"""

import functools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import app, flags, logging

from configs import cifar10, digits
from diffusion_jax import models, parallel, sampling, train
from diffusion_jax import train_state as train_state_lib

_SUITE = flags.DEFINE_enum('suite', 'cpu', ('cpu', 'gpu'), 'Which sizes to measure.')
_OUT = flags.DEFINE_string('out', None, 'Write the results here as JSON.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs per measurement (median reported).')

# suite -> (config, train batch, sampling batch, train steps per timed run)
SUITES = {
    'cpu': (digits.get_config, 64, 16, 20),
    'gpu': (cifar10.get_config, 128, 256, 50),
}
SAMPLERS = (('ancestral', 1000), ('ddim', 50))  # (sampler, reverse steps); T = 1000 for both
COMPILE_VS_T = (10, 100, 1000)


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _flops(compiled) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax returns one dict per device program
        analysis = analysis[0] if analysis else None
    return float(analysis['flops']) if analysis and 'flops' in analysis else None


def _config(suite: str, num_timesteps: int = 1000):
    config = SUITES[suite][0]()
    config.diffusion.num_timesteps = num_timesteps
    config.diffusion.beta_start, config.diffusion.beta_end = 1e-4, 0.02  # the paper's schedule
    return config


def bench_train(suite: str, repeats: int) -> dict:
    config = _config(suite)
    _, batch_size, _, steps = SUITES[suite]
    mesh = parallel.create_mesh()
    model = models.get_model(config)
    tx, lr_fn = train_state_lib.create_optimizer(config.optim)
    state = train_state_lib.create_train_state(
        model, tx, jax.random.PRNGKey(0), train.image_shape(config)
    )
    state = jax.device_put(state, parallel.replicated(mesh))
    images = np.random.default_rng(0).uniform(-1, 1, (batch_size, *train.image_shape(config)))
    batch = parallel.global_batch({'image': images.astype(np.float32)}, mesh)
    rng = jax.device_put(jax.random.PRNGKey(1), parallel.replicated(mesh))
    step_fn = train.make_jit_train_step(config, train.create_diffusion(config), lr_fn, mesh)
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - start
    holder = [jax.block_until_ready(compiled(state, batch, rng)[0])]  # warm-up

    def run():
        s = holder[0]
        for _ in range(steps):
            s, metrics = compiled(s, batch, rng)
        holder[0] = s
        return metrics['loss']

    seconds = _median_seconds(run, repeats) / steps
    flops = _flops(compiled)
    return {
        'batch_size': batch_size,
        'num_params': int(sum(x.size for x in jax.tree.leaves(state.params))),
        'compile_s': compile_s,
        'step_ms': 1e3 * seconds,
        'steps_per_s': 1 / seconds,
        'images_per_s': batch_size / seconds,
        'xla_flops_per_step': flops,
        'achieved_tflops': flops / seconds / 1e12 if flops else None,
    }


def _sample_fn(suite: str, sampler: str, num_steps: int, num_timesteps: int = 1000):
    config = _config(suite, num_timesteps)
    batch_size = SUITES[suite][2]
    model = models.get_model(config)
    fn = sampling.make_sample_fn(
        model,
        train.create_diffusion(config),
        batch_size=batch_size,
        image_shape=train.image_shape(config),
        sampler=sampler,
        num_steps=num_steps,
        mesh=parallel.create_mesh(),
    )
    params = jax.jit(
        lambda r: model.init(
            r,
            np.zeros((1, *train.image_shape(config)), np.float32),
            np.zeros((1,), np.int32),
            train=False,
        )['params']
    )(jax.random.PRNGKey(0))
    return fn, params, batch_size


def bench_sampling(suite: str, repeats: int) -> dict:
    results = {}
    for sampler, num_steps in SAMPLERS:
        fn, params, batch_size = _sample_fn(suite, sampler, num_steps)
        rng = jax.random.PRNGKey(0)
        start = time.perf_counter()
        compiled = fn.lower(params, rng).compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(compiled(params, rng, np.int32(0)))  # warm-up
        seconds = _median_seconds(functools.partial(compiled, params, rng, np.int32(0)), repeats)
        flops = _flops(compiled)
        results[f'{sampler}_{num_steps}'] = {
            'batch_size': batch_size,
            'num_steps': num_steps,
            'compile_s': compile_s,
            'seconds_per_batch': seconds,
            'images_per_s': batch_size / seconds,
            'hours_for_50k': 50_000 / (batch_size / seconds) / 3600,
            # XLA's cost analysis counts a scan's body once, i.e. one reverse step.
            'xla_flops_per_reverse_step': flops,
            'achieved_tflops': flops * num_steps / seconds / 1e12 if flops else None,
        }
    compile_vs_t = {}
    for num_timesteps in COMPILE_VS_T:
        fn, params, _ = _sample_fn(suite, 'ancestral', None, num_timesteps)
        start = time.perf_counter()
        fn.lower(params, jax.random.PRNGKey(0)).compile()
        compile_vs_t[str(num_timesteps)] = time.perf_counter() - start
    results['compile_s_vs_num_timesteps'] = compile_vs_t
    return results


def main(argv: list[str]) -> None:
    del argv
    suite = _SUITE.value
    results = {
        'suite': suite,
        'machine': {
            'platform': platform.platform(),
            'python': sys.version.split()[0],
            'jax': jax.__version__,
            'backend': jax.default_backend(),
            'devices': [str(d) for d in jax.devices()],
            'device_kind': jax.devices()[0].device_kind,
        },
        'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
    }
    logging.info('train step (%s suite)', suite)
    results['train'] = bench_train(suite, _REPEATS.value)
    logging.info('samplers (%s suite)', suite)
    results['sampling'] = bench_sampling(suite, _REPEATS.value)
    text = json.dumps(results, indent=2)
    print(text)
    if _OUT.value:
        with open(_OUT.value, 'w') as f:
            f.write(text + '\n')


if __name__ == '__main__':
    app.run(main)
