"""XLA's compiled memory of one train step with and without `model.remat` and microbatches.

    python -m benchmarks.train_memory --config=celeba_hq --batch=64 --out=train_memory.json
    python -m benchmarks.train_memory --config=celeba_hq --batch=64 --target=h100

Compiles (never runs) the jitted train step of a config on abstract inputs and reads XLA's
buffer assignment (`compiled.memory_analysis()`): the temporaries (activations kept for the
backward pass and scratch space) and the arguments, for each variant. Beside them, the bytes of
residuals JAX saves from the U-Net's forward pass for its backward pass, before any compiler
sees the program. The compiled numbers belong to the backend that compiled them. Without
`--target` that is this host's first device; on a CPU, remat saves memory only with the
command line's XLA:CPU flags (`diffusion_jax.xla_cpu`, which this package applies on import).
`--target=h100` or `h200` compiles for that GPU without one (JAX's deviceless ahead-of-time
compilation; needs `pip install -e ".[cuda13]"`, not a GPU): XLA:GPU's own program and buffer
assignment, though its autotuning, which needs the device, is skipped. Nothing is allocated, so
the 256x256 network fits a laptop's memory.
"""

import argparse
import importlib
import json
import math
import pathlib
import time
from typing import Any

import jax

from diffusion_jax import config_lib, experiment, parallel, train

# GPUs to compile for without one (`--target`): XLA's GpuTargetConfig of each, as text.
TARGETS_DIR = pathlib.Path(__file__).parent / 'gpu_targets'
TARGETS = tuple(sorted(p.stem for p in TARGETS_DIR.glob('*.txtpb')))

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


def target_devices(target: str | None) -> list:
    """One device to compile for: this host's first, or a GPU described by `TARGETS[target]`.

    A GPU target needs jaxlib's CUDA plugin (`pip install -e ".[cuda13]"`) but no GPU: XLA
    compiles for the described device without one (JAX's deviceless ahead-of-time compilation).
    """
    if target is None:
        return jax.devices()[:1]
    from jax.experimental import topologies

    # This host's backend is the CPU; the GPU is compile-only. Set before JAX starts a backend:
    # a CUDA plugin started without a GPU fails and is dropped.
    jax.config.update('jax_platforms', 'cpu')

    text = (TARGETS_DIR / f'{target}.txtpb').read_text()
    topology = topologies.get_topology_desc(platform='cuda', target_config=text, topology='1x1x1')
    return topology.devices[:1]


def compile_train_step(config: Any, devices: list) -> tuple[Any, experiment.Experiment, float]:
    """(compiled train step, its experiment, compile seconds) for `config` on `devices`, on
    abstract inputs: a global batch of `config.training.batch_size` images."""
    mesh = parallel.create_mesh(devices)
    exp = experiment.build(config, devices[0])
    batch = config.training.batch_size
    images = jax.ShapeDtypeStruct(
        (batch, *exp.image_shape), jax.numpy.float32, sharding=parallel.batch_sharding(mesh)
    )
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=parallel.replicated(mesh))
    step = train.make_jit_train_step(config, exp.diffusion, exp.learning_rate_fn, mesh)
    start = time.perf_counter()
    compiled = step.lower(exp.restore_target(mesh), {'image': images}, rng).compile()
    return compiled, exp, time.perf_counter() - start


def compiled_memory(
    config_name: str, batch: int, remat: bool, microbatches: int, devices: list
) -> dict:
    """Compiles the train step of `config_name` for a global batch on `devices`; returns XLA's
    byte counts."""
    config = importlib.import_module(f'diffusion_jax.configs.{config_name}').get_config()
    config.training.batch_size = batch
    config.model.remat = remat
    config.training.num_microbatches = microbatches
    config_lib.validate(config)
    compiled, exp, compile_s = compile_train_step(config, devices)
    analysis = compiled.memory_analysis()
    return {
        'config': config_name,
        'batch': batch,
        'remat': remat,
        'num_microbatches': microbatches,
        'device': devices[0].device_kind,
        'num_params': exp.num_params,
        'residual_bytes': residual_bytes(config_name, batch // microbatches, remat),
        'temp_bytes': int(analysis.temp_size_in_bytes),
        'argument_bytes': int(analysis.argument_size_in_bytes),
        'output_bytes': int(analysis.output_size_in_bytes),
        'alias_bytes': int(analysis.alias_size_in_bytes),
        'compile_s': round(compile_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', default='celeba_hq', help='a shipped config name')
    parser.add_argument('--batch', type=int, default=64, help='global batch')
    parser.add_argument('--out', default=None, help='write the rows as JSON here')
    parser.add_argument(
        '--target',
        choices=TARGETS,
        default=None,
        help='compile for this GPU, without one (needs the CUDA plugin); default: this host',
    )
    args = parser.parse_args()
    devices = target_devices(args.target)
    print(f'compiling for {devices[0].device_kind}', flush=True)
    rows = []
    for name, remat, microbatches in VARIANTS:
        rows.append(
            {
                'variant': name,
                **compiled_memory(args.config, args.batch, remat, microbatches, devices),
            }
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
