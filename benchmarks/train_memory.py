"""XLA's compiled memory of one train step with and without `model.remat` and microbatches.

    python -m benchmarks.train_memory --config=celeba_hq --batch=64 --out=train_memory.json

Compiles (never runs) the jitted train step of a config on abstract inputs and reads XLA's
buffer assignment (`compiled.memory_analysis()`): the temporaries (activations kept for the
backward pass and scratch space) and the arguments, for each variant. Beside them, the bytes of
residuals JAX saves from the U-Net's forward pass for its backward pass, before any compiler
sees the program. The compiled numbers belong to the backend that compiled them: XLA:CPU
recomputes the remat blocks but schedules them so that its temporaries do not shrink (see
BENCHMARKS.md), so run the same command on the GPU or TPU that will train. Nothing is allocated,
so the 256x256 network fits a laptop's memory.
"""

import argparse
import importlib
import json
import math
import time

import jax

from diffusion_jax import config_lib, experiment, parallel, train

VARIANTS = (
    ('plain', False, 1),
    ('remat', True, 1),
    ('microbatches=4', False, 4),
    ('remat + microbatches=4', True, 4),
)


def residual_bytes(config_name: str, batch: int, remat: bool) -> int:
    """Bytes JAX keeps from the U-Net's forward pass for its backward pass (before XLA).

    `jax.ad_checkpoint`'s saved residuals of the loss's gradient, on abstract inputs: what the
    program asks to keep, whatever a backend's compiler then fuses or schedules.
    """
    from jax._src import ad_checkpoint  # saved_residuals: print_saved_residuals' data

    config = importlib.import_module(f'diffusion_jax.configs.{config_name}').get_config()
    config.model.remat = remat
    exp = experiment.build(config)
    x = jax.ShapeDtypeStruct((batch, *exp.image_shape), jax.numpy.float32)
    t = jax.ShapeDtypeStruct((batch,), jax.numpy.int32)

    def loss(params, x, t):
        out = exp.model.apply({'params': params}, x, t, train=False)
        return jax.numpy.mean(out**2)

    saved = ad_checkpoint.saved_residuals(loss, exp.abstract_state.params, x, t)
    return sum(math.prod(aval.shape) * aval.dtype.itemsize for aval, _ in saved)


def compiled_memory(config_name: str, batch: int, remat: bool, microbatches: int) -> dict:
    """Compiles the train step of `config_name` for a global batch; returns XLA's byte counts."""
    config = importlib.import_module(f'diffusion_jax.configs.{config_name}').get_config()
    config.training.batch_size = batch
    config.model.remat = remat
    config.training.num_microbatches = microbatches
    config_lib.validate(config)
    mesh = parallel.create_mesh(jax.devices()[:1])
    exp = experiment.build(config)
    state = exp.restore_target(mesh)
    images = jax.ShapeDtypeStruct(
        (batch, *exp.image_shape), jax.numpy.float32, sharding=parallel.batch_sharding(mesh)
    )
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=parallel.replicated(mesh))
    step = train.make_jit_train_step(config, exp.diffusion, exp.learning_rate_fn, mesh)
    start = time.perf_counter()
    compiled = step.lower(state, {'image': images}, rng).compile()
    analysis = compiled.memory_analysis()
    return {
        'config': config_name,
        'batch': batch,
        'remat': remat,
        'num_microbatches': microbatches,
        'backend': jax.default_backend(),
        'num_params': exp.num_params,
        'residual_bytes': residual_bytes(config_name, batch // microbatches, remat),
        'temp_bytes': int(analysis.temp_size_in_bytes),
        'argument_bytes': int(analysis.argument_size_in_bytes),
        'output_bytes': int(analysis.output_size_in_bytes),
        'alias_bytes': int(analysis.alias_size_in_bytes),
        'compile_s': round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', default='celeba_hq', help='a shipped config name')
    parser.add_argument('--batch', type=int, default=64, help='global batch')
    parser.add_argument('--out', default=None, help='write the rows as JSON here')
    args = parser.parse_args()
    rows = []
    for name, remat, microbatches in VARIANTS:
        rows.append(
            {'variant': name, **compiled_memory(args.config, args.batch, remat, microbatches)}
        )
        row = rows[-1]
        share = row['temp_bytes'] / rows[0]['temp_bytes']
        print(
            f'{name:24s} temporaries {row["temp_bytes"] / 2**30:7.2f} GiB ({share:5.1%} of plain), '
            f'JAX residuals {row["residual_bytes"] / 2**30:7.2f} GiB, '
            f'arguments {row["argument_bytes"] / 2**30:5.2f} GiB, compile {row["compile_s"]} s',
            flush=True,
        )
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(rows, f, indent=2)


if __name__ == '__main__':
    main()
