"""Mixed precision: the digits config trained in float32 and in bfloat16 from the same seed.

    python -m benchmarks.precision --steps=N --out=DIR

Both runs use the project's own pieces exactly as `train.train_and_evaluate` wires them: the
same `key(config.training.seed)` split into init and train keys, the same digits input
pipeline (so the same batches in the same order), and `train.make_jit_train_step`. Parameters,
Adam state, EMA, the loss and the noise stay float32 in both (`param_dtype`); only
`config.model.dtype`, the compute dtype of the U-Net's convs, dense layers and attention,
differs. Every step's loss is recorded.

Writes DIR/precision.json (both loss curves, step times, the mean loss over the last 20% of the
steps and its relative difference, and the EMA model's loss on the held-out digits with fixed t
and noise) and DIR/precision.png (the smoothed curves and their relative difference).
`--curves=OLD/precision.json` re-summarizes and re-plots an earlier run without training.
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging

from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import experiment, image_io, input_pipeline, models, parallel, train
from diffusion_jax.configs import digits

_STEPS = flags.DEFINE_integer('steps', 8000, 'Train steps per run (the digits default: 8000).')
_OUT = flags.DEFINE_string('out', None, 'Directory for precision.json and precision.png.')
_SMOOTH = flags.DEFINE_integer('smooth', 200, 'Moving-average window of the plot, in steps.')
_CURVES = flags.DEFINE_string(
    'curves', None, 'Re-summarize and re-plot the runs of an earlier precision.json; no training.'
)

DTYPES = ('float32', 'bfloat16')
TAIL = 0.2  # the summary compares the mean loss over this last fraction of the steps
EVAL_DRAWS = 8  # (t, noise) draws per held-out image for the eval loss
_FETCH_EVERY = 100  # steps between host reads of the losses (keeps the device queue full)


def _config(dtype: str, num_steps: int) -> ml_collections.ConfigDict:
    config = digits.get_config()
    config.model.dtype = dtype
    config.training.num_train_steps = num_steps
    return config


def eval_loss(config: ml_collections.ConfigDict, params) -> float:
    """Mean L_simple of `params` on the held-out digits, t and noise fixed by key(0).

    Every test image is used EVAL_DRAWS times: x_start [EVAL_DRAWS * 297, 8, 8, 1].
    """
    images = image_io.to_float(input_pipeline.load_images(config.data, 'test'))
    x_start = jnp.asarray(np.tile(images, (EVAL_DRAWS, 1, 1, 1)))
    diffusion = experiment.create_diffusion(config)
    t_rng, noise_rng = jax.random.split(jax.random.key(0))
    t = jax.random.randint(t_rng, (x_start.shape[0],), 0, diffusion.num_timesteps)
    noise = jax.random.normal(noise_rng, x_start.shape)
    model = models.get_model(config)

    @jax.jit
    def loss(p):
        def model_fn(x_t, t):
            return model.apply({'params': p}, x_t, t, train=False)

        return jnp.mean(
            diffusion_lib.training_losses(diffusion, model_fn, x_start, t, noise)['loss']
        )

    return float(loss(params))


def train_run(config: ml_collections.ConfigDict) -> dict:
    """Trains `config` for `config.training.num_train_steps` steps, as train_and_evaluate does.

    Returns:
        {'loss': [num_steps] per-step training loss, 'nonfinite_steps', 'compile_s',
        'step_ms' (mean over all steps after the first), 'eval_loss' (EMA params)}.
    """
    mesh = parallel.create_mesh()
    init_rng, train_rng, _ = jax.random.split(jax.random.key(config.training.seed), 3)
    exp = experiment.build(config)
    state = exp.init_state(init_rng, mesh)
    batches = parallel.prefetch_to_mesh(
        input_pipeline.train_iterator(
            config.data, global_batch_size=config.training.batch_size, seed=config.training.seed
        ),
        mesh,
    )
    step_fn = train.make_jit_train_step(config, exp.diffusion, exp.learning_rate_fn, mesh)
    batch = next(batches)
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch, train_rng).compile()
    compile_s = time.perf_counter() - start
    losses, nonfinite, pending = [], 0.0, []
    num_steps = config.training.num_train_steps
    for step in range(num_steps):
        if step == 1:
            start = time.perf_counter()  # the first call pays one-time allocation
        state, metrics = compiled(state, batch, train_rng)
        pending.append((metrics['loss'], metrics['nonfinite']))
        if len(pending) == _FETCH_EVERY or step == num_steps - 1:
            for loss, flag in jax.device_get(pending):
                losses.append(float(loss))
                nonfinite += float(flag)
            pending = []
            logging.info('%s step %d: loss %.5f', config.model.dtype, step + 1, losses[-1])
        if step < num_steps - 1:
            batch = next(batches)
    seconds = time.perf_counter() - start
    return {
        'loss': losses,
        'nonfinite_steps': int(nonfinite),
        'compile_s': compile_s,
        'step_ms': 1e3 * seconds / max(num_steps - 1, 1),
        'eval_loss': eval_loss(config, state.ema_params),
    }


def summarize(curves: dict[str, list[float]]) -> dict:
    """The last-20% mean loss per dtype, and bf16's difference from float32 with its noise.

    Both runs see the same batches, t and noise at every step, so the per-step difference
    bf16 - f32 is a paired sample; its standard error says whether the gap is more than noise.

    Args:
        curves: dtype -> per-step losses, all of the same length N.

    Returns:
        {'tail_steps', 'tail_mean': {dtype: float}, 'tail_stderr': {dtype: float} (consecutive
        losses treated as independent), 'relative_difference': (mean_bf16 - mean_f32) /
        mean_f32, 'relative_difference_stderr': the paired standard error of that ratio}.
    """
    n = len(next(iter(curves.values())))
    tail = max(2, round(TAIL * n))
    tails = {k: np.asarray(v[-tail:], np.float64) for k, v in curves.items()}
    means = {k: float(v.mean()) for k, v in tails.items()}
    stderr = {k: float(v.std(ddof=1) / np.sqrt(len(v))) for k, v in tails.items()}
    paired = tails['bfloat16'] - tails['float32']
    return {
        'tail_steps': len(paired),
        'tail_mean': means,
        'tail_stderr': stderr,
        'relative_difference': float(paired.mean()) / means['float32'],
        'relative_difference_stderr': float(paired.std(ddof=1) / np.sqrt(len(paired)))
        / means['float32'],
    }


def moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` steps: [N] -> [N] (the first values average fewer)."""
    csum = np.cumsum(np.insert(np.asarray(x, np.float64), 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


def plot(curves: dict[str, list[float]], window: int, path: str) -> None:
    """Writes the smoothed loss curves and bf16's relative difference to `path` (PNG)."""
    import matplotlib

    matplotlib.use('Agg')
    from matplotlib import pyplot as plt

    smooth = {k: moving_average(np.asarray(v), window) for k, v in curves.items()}
    steps = np.arange(1, len(smooth['float32']) + 1)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))
    for name, y in smooth.items():
        top.plot(steps, y, label=name, lw=1.2)
    top.set_yscale('log')
    top.set_ylabel(f'train loss ({window}-step mean)')
    top.set_title('digits DDPM: float32 vs bfloat16 compute, same seed and batches')
    top.legend()
    top.grid(alpha=0.3)
    rel = 100 * (smooth['bfloat16'] - smooth['float32']) / smooth['float32']
    bottom.plot(steps, rel, color='black', lw=1)
    bottom.axhline(0, color='gray', lw=0.5)
    bottom.set_ylabel('bf16 vs f32 (%)')
    bottom.set_xlabel('step')
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    del argv
    if not _OUT.value:
        raise app.UsageError('--out=DIR is required')
    os.makedirs(_OUT.value, exist_ok=True)
    if _CURVES.value:
        with open(_CURVES.value) as f:
            previous = json.load(f)
        runs, steps, machine = previous['runs'], previous['steps'], previous['machine']
    else:
        runs = {}
        for dtype in DTYPES:
            logging.info('training digits with model.dtype=%s for %d steps', dtype, _STEPS.value)
            runs[dtype] = train_run(_config(dtype, _STEPS.value))
        steps = _STEPS.value
        machine = {
            'jax': jax.__version__,
            'backend': jax.default_backend(),
            'device_kind': jax.devices()[0].device_kind,
        }
    curves = {k: v['loss'] for k, v in runs.items()}
    result = {
        'config': 'configs/digits.py',
        'steps': steps,
        'machine': machine,
        'summary': summarize(curves),
        'runs': runs,
    }
    for dtype, run in runs.items():
        logging.info(
            '%s: %.1f ms/step, eval loss %.5f, tail mean %.5f',
            dtype,
            run['step_ms'],
            run['eval_loss'],
            result['summary']['tail_mean'][dtype],
        )
    with open(os.path.join(_OUT.value, 'precision.json'), 'w') as f:
        json.dump(result, f)
    plot(curves, _SMOOTH.value, os.path.join(_OUT.value, 'precision.png'))
    print(json.dumps({k: v for k, v in result.items() if k != 'runs'}, indent=2))


if __name__ == '__main__':
    app.run(main)
