"""What XLA:GPU makes of the GPU suite's programs, compiled on this host for a GPU it lacks.

    python -m benchmarks.gpu_compile --target=h200 --out=gpu_compile.json

The `gpu` suite's network (the paper's CIFAR10 U-Net, 35,746,307 parameters): the train step in
float32 and bfloat16 at batch 128 and 256, and the one-scan samplers at batch 256 (ancestral
over T = 10, 100 and 1000; DDIM with 50 steps), each compiled for `--target` (a GPU described in
`benchmarks/gpu_targets/`) by JAX's deviceless ahead-of-time compilation. Nothing runs. Per
program: the compile time (on this host's CPUs, not the GPU machine's), XLA's FLOP count, XLA's
compiled memory (temporaries and the buffer-assignment peak) and the library calls in the
compiled program: cuDNN's convolutions and fused attention, cuBLAS's GEMMs (custom calls by
target name). The attention blocks choose cuDNN as they would on that GPU
(`layers.cudnn_max_head_dim` of the target device). It needs jaxlib's CUDA plugin
(`pip install -e ".[cuda13]"`), not a GPU: a check, before a GPU is lent, that the programs
compile for it, and of what they will ask of it.
"""

import argparse
import collections
import contextlib
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import suites, train_memory
from benchmarks.run import _flops, _program_bytes
from diffusion_jax import experiment, parallel, sampling

TRAIN_BATCHES = (128, 256)
SAMPLE_BATCH = 256
SAMPLERS = (('ancestral', None, 10), ('ancestral', None, 100), ('ancestral', None, 1000),
            ('ddim', 50, 1000))  # (sampler, reverse steps (None: all T), T)  # fmt: skip


@contextlib.contextmanager
def cudnn_checks_for(device: Any) -> Iterator[None]:
    """JAX's cuDNN attention answers its compute-capability checks for `device` meanwhile.

    `jax.nn.dot_product_attention(implementation='cudnn')` asks the local GPU's capability while
    it traces (jax 0.10: `fused_attention_stablehlo.check_compute_capability`). Without a GPU
    the answer is "none", and 256-channel heads, which Hopper takes, are refused; the compiled
    program should be the target's, so the two checks answer for it here. A JAX without those
    functions is left alone.
    """
    from jax._src.cudnn import fused_attention_stablehlo as fused

    have = tuple(int(x) for x in device.compute_capability.split('.'))

    def at_least(capability: str) -> bool:
        return have >= tuple(int(x) for x in capability.split('.'))

    def equal(capability: str) -> bool:
        return have == tuple(int(x) for x in capability.split('.'))

    names = {'check_compute_capability': at_least, 'is_cuda_compute_capability_equal': equal}
    saved = {name: getattr(fused, name) for name in names if hasattr(fused, name)}
    try:
        for name in saved:
            setattr(fused, name, names[name])
        yield
    finally:
        for name, fn in saved.items():
            setattr(fused, name, fn)


def library_calls(hlo_text: str) -> dict[str, int]:
    """Custom-call targets of a compiled HLO module and how often each is called."""
    return dict(collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo_text)))


def _record(compiled, compile_s: float, **fields) -> dict:
    analysis = compiled.memory_analysis()
    return {
        **fields,
        'compile_s': round(compile_s, 1),
        'xla_flops': _flops(compiled),
        'temp_bytes': int(analysis.temp_size_in_bytes),
        'xla_program_peak_bytes': _program_bytes(compiled),
        'library_calls': library_calls(compiled.as_text()),
    }


def compile_train(devices: list, dtype: str, batch: int) -> dict:
    """Compiles the `gpu` suite's train step for `devices` at a global batch."""
    config = suites.get_config('gpu', dtype=dtype)
    config.training.batch_size = batch
    compiled, _, compile_s = train_memory.compile_train_step(config, devices)
    return _record(compiled, compile_s, program='train', dtype=dtype, batch=batch)


def compile_sampler(devices: list, sampler: str, num_steps: int | None, num_timesteps: int) -> dict:
    """Compiles one sampler of the `gpu` suite (float32) for `devices` at `SAMPLE_BATCH`."""
    config = suites.get_config('gpu', num_timesteps)
    mesh = parallel.create_mesh(devices)
    exp = experiment.build(config, devices[0])
    fn = sampling.make_sample_fn(
        exp.model,
        exp.diffusion,
        batch_size=SAMPLE_BATCH,
        image_shape=exp.image_shape,
        sampler=sampler,
        num_steps=num_steps,
        mesh=mesh,
    )
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=parallel.replicated(mesh))
    first_index = jax.ShapeDtypeStruct((), jnp.int32, sharding=parallel.replicated(mesh))
    start = time.perf_counter()
    compiled = fn.lower(exp.restore_target(mesh).params, rng, first_index).compile()
    return _record(
        compiled,
        time.perf_counter() - start,
        program=f'{sampler}_{num_steps or num_timesteps}',
        num_timesteps=num_timesteps,
        batch=SAMPLE_BATCH,
    )


def _summary(row: dict) -> str:
    dtype, num_timesteps = row.get('dtype', 'float32'), row.get('num_timesteps', 1000)
    gib = 2**30
    flops = 'n/a' if row['xla_flops'] is None else f'{row["xla_flops"] / 1e12:.2f}'
    return (
        f'{row["program"]:14s} {dtype:9s} T={num_timesteps:<5d} batch {row["batch"]:3d}: '
        f'compile {row["compile_s"]:6.1f} s, {flops} TFLOP, '
        f'temporaries {row["temp_bytes"] / gib:6.2f} GiB, '
        f'peak {row["xla_program_peak_bytes"] / gib:6.2f} GiB, calls {row["library_calls"]}'
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--target', choices=train_memory.TARGETS, default='h200')
    parser.add_argument('--out', default=None, help='write the rows as JSON here')
    args = parser.parse_args()
    devices = train_memory.target_devices(args.target)
    print(f'compiling for {devices[0].device_kind}', flush=True)
    jobs = [(compile_train, (dtype, batch)) for dtype in suites.DTYPES for batch in TRAIN_BATCHES]
    jobs += [(compile_sampler, sampler) for sampler in SAMPLERS]
    rows = []
    for fn, job_args in jobs:
        with cudnn_checks_for(devices[0]):  # the model's init traces attention too
            rows.append({'device': devices[0].device_kind, **fn(devices, *job_args)})
        print(_summary(rows[-1]), flush=True)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(rows, f, indent=2)


if __name__ == '__main__':
    main()
