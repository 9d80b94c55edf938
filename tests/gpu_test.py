"""Accelerator tests (`pytest -m gpu`): the same functions on the GPU as on the CPU.

They skip where JAX's default backend is the CPU (CI, laptops). `benchmarks/device.sh` runs them
on the lent GPU; its `--rehearse` run sets DIFFUSION_JAX_GPU_TESTS_ON_CPU=1 so that their code
also runs here (then the "accelerator" is the CPU itself and the comparisons are trivially
close, but a broken test or an API missing from the lent image's JAX still fails).

Each test compares the default backend's result with an independent computation on the CPU
backend of the same process, at float32 matmul precision 'highest' (TF32 off) where exactness
is the point.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from diffusion_jax import experiment, models, parallel, train
from diffusion_jax import train_state as train_state_lib
from diffusion_jax.models import layers

ON_ACCELERATOR = jax.default_backend() != 'cpu'
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not ON_ACCELERATOR and not os.environ.get('DIFFUSION_JAX_GPU_TESTS_ON_CPU'),
        reason='needs an accelerator (JAX default backend is the CPU)',
    ),
]


def _tiny_config(dtype: str = 'float32'):
    config = digits.get_config()
    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.0
    config.model.dtype = dtype
    config.diffusion.num_timesteps = 20
    return config


def _init(config, device):
    """The model and a host (numpy) train state whose parameters are all non-zero.

    DDPM zero-initialises each block's last convolution, so the initial network is almost the
    identity on its skip paths and outputs ~1e-5: every parameter gets N(0, 0.05^2) added, so
    that each layer contributes to the output being compared.
    """
    model = models.get_model(config)
    tx, _ = train_state_lib.create_optimizer(config.optim)
    with jax.default_device(device):
        state = train_state_lib.create_train_state(
            model, tx, jax.random.key(0), experiment.image_shape(config)
        )
    leaves, treedef = jax.tree.flatten(jax.device_get(state.params))
    rng = np.random.default_rng(1)
    params = treedef.unflatten([p + rng.normal(0, 0.05, p.shape).astype(p.dtype) for p in leaves])
    return model, jax.device_get(state.replace(params=params, ema_params=params))


def _batch(config, n: int = 8) -> np.ndarray:
    shape = (n, *experiment.image_shape(config))
    return np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)


def test_the_default_backend_is_an_accelerator_with_memory_stats():
    if not ON_ACCELERATOR:
        pytest.skip('rehearsal on the CPU: there is no accelerator to describe')
    device = jax.devices()[0]
    assert device.platform in ('gpu', 'tpu'), device
    stats = device.memory_stats()
    assert stats and stats['bytes_limit'] > 2**30, stats


def test_unet_forward_matches_the_cpu():
    config = _tiny_config()
    cpu = jax.devices('cpu')[0]
    model, state = _init(config, cpu)
    x, t = _batch(config), np.arange(8, dtype=np.int32)

    def forward(params, x, t):
        return model.apply({'params': params}, x, t, train=False)

    with jax.default_matmul_precision('highest'):
        on_cpu = jax.jit(forward)(*jax.device_put((state.params, x, t), cpu))
        here = jax.jit(forward)(*jax.device_put((state.params, x, t), jax.devices()[0]))
    np.testing.assert_allclose(np.asarray(here), np.asarray(on_cpu), rtol=1e-4, atol=1e-4)
    assert float(jnp.std(on_cpu)) > 0.1  # every layer contributes (see _init)


def test_train_step_matches_the_cpu():
    config = _tiny_config()
    cpu = jax.devices('cpu')[0]
    _, state = _init(config, cpu)
    diffusion = experiment.create_diffusion(config)
    _, lr_fn = train_state_lib.create_optimizer(config.optim)
    batch = {'image': _batch(config)}
    results = []
    with jax.default_matmul_precision('highest'):
        for mesh in (parallel.create_mesh([cpu]), parallel.create_mesh()):
            step = train.make_jit_train_step(config, diffusion, lr_fn, mesh)
            placed = jax.device_put(state, parallel.replicated(mesh))  # a copy: it is donated
            rng = jax.device_put(jax.random.key(1), parallel.replicated(mesh))
            new_state, metrics = step(placed, parallel.global_batch(batch, mesh), rng)
            results.append((jax.device_get(new_state.params), jax.device_get(metrics)))
    (cpu_params, cpu_metrics), (params, metrics) = results
    np.testing.assert_allclose(metrics['loss'], cpu_metrics['loss'], rtol=1e-4)
    np.testing.assert_allclose(metrics['grad_norm'], cpu_metrics['grad_norm'], rtol=1e-3)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(cpu_params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)


def test_bfloat16_attention_agrees_with_float32():
    """The attention block in bf16 (cuDNN's fused kernel where `attention_implementation` picks
    it) stays within bf16 rounding of the float32 XLA computation."""
    x = jax.random.normal(jax.random.key(2), (4, 16, 16, 64), jnp.float32)
    max_head_dim = layers.cudnn_max_head_dim()  # as `models.get_model` decides it
    f32 = layers.AttnBlock(dtype=jnp.float32)
    bf16 = layers.AttnBlock(dtype=jnp.bfloat16, cudnn_max_head_dim=max_head_dim)
    params = f32.init(jax.random.key(3), x)
    with jax.default_matmul_precision('highest'):
        want = jax.jit(f32.apply)(params, x)
    got = jax.jit(bf16.apply)(params, x)
    error = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
    assert error < 0.1 * float(jnp.max(jnp.abs(want))), error
    implementation = layers.attention_implementation(jnp.bfloat16, 64, max_head_dim)
    print('attention implementation:', implementation)
