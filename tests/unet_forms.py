"""A U-Net built two ways (two values of one `*_impl` attribute) must be the same function."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import unet


def assert_same_params_and_function(field: str, impls: tuple[str, str], **kwargs) -> dict:
    """Builds `unet.UNet(**kwargs, field=impl)` for both impls on 8x8x1 inputs and asserts equal
    initial parameters, and, on random weights, losses within 1e-5 and gradients within 1e-4 of
    each other. Returns the first impl's initial variables."""
    nets = {impl: unet.UNet(dropout=0.0, out_ch=1, **kwargs, **{field: impl}) for impl in impls}
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8, 1)), jnp.float32)
    t = jnp.array([3, 200], jnp.int32)
    inits = {
        impl: jax.jit(functools.partial(net.init, train=False))(jax.random.key(0), x, t)
        for impl, net in nets.items()
    }
    first, second = impls
    jax.tree.map(np.testing.assert_array_equal, inits[second], inits[first])
    # Random weights everywhere (the fresh output conv and proj_out start near zero).
    params = jax.tree.map(
        lambda p: jnp.asarray(0.2 * np.random.default_rng(p.size).normal(size=p.shape)),
        inits[first],
    )

    def loss(net):
        return lambda p: jnp.mean(jnp.square(net.apply(p, x, t, train=False) - x))

    values = {impl: jax.jit(jax.value_and_grad(loss(net)))(params) for impl, net in nets.items()}
    np.testing.assert_allclose(values[second][0], values[first][0], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
        values[second][1],
        values[first][1],
    )
    return inits[first]
