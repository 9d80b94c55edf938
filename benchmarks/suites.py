"""What each benchmark suite measures: the network, the batch sizes and the dtypes.

Shared by `benchmarks.run` (our JAX side) and `benchmarks.peer_torch` (the PyTorch peer, a
separate process), so that both sides measure the same network at the same sizes.
"""

import dataclasses
from collections.abc import Callable

import ml_collections

from diffusion_jax.configs import cifar10, digits


@dataclasses.dataclass(frozen=True)
class Suite:
    """One suite's sizes.

    Attributes:
        get_config: the config whose network is measured.
        train_batch: images per train step.
        sample_batch: images per sampler call.
        train_steps: train steps per timed run (the reported time is per step).
        num_params: the network's parameter count; both sides must have exactly this many.
    """

    get_config: Callable[[], ml_collections.ConfigDict]
    train_batch: int
    sample_batch: int
    train_steps: int
    num_params: int


SUITES = {
    # The digits network (8x8x1): a few minutes on a 2-core laptop CPU.
    'cpu': Suite(digits.get_config, 64, 16, 20, 651_041),
    # The paper's CIFAR10 network (unet2d16b2) at the paper's train batch.
    'gpu': Suite(cifar10.get_config, 128, 256, 50, 35_746_307),
    # `benchmarks/device.sh --rehearse`: the gpu suite's code paths on a CPU, at digits sizes.
    'rehearse': Suite(digits.get_config, 8, 4, 2, 651_041),
}
SAMPLERS = (('ancestral', 1000), ('ddim', 50))  # (sampler, reverse steps); T = 1000 for both
COMPILE_VS_T = (10, 100, 1000)
DTYPES = ('float32', 'bfloat16')  # compute dtypes; parameters and optimizer stay float32


# The computation of the network as the paper writes it, whose FLOPs MFU counts: the same
# function and parameters as any other `conv_impl`, `upsample_impl` and `nin_impl`
# (`models.subpixel` needs 4/9 of an Upsample conv's multiplies, so counting the compiled
# program's would credit the faster formulation with less work).
MODEL_FORM = {'conv_impl': 'xla', 'upsample_impl': 'repeat', 'nin_impl': 'dense'}


def get_config(
    suite: str, num_timesteps: int = 1000, dtype: str = 'float32', paper_form: bool = False
) -> ml_collections.ConfigDict:
    """The suite's config with the paper's linear betas (1e-4 to 0.02) over `num_timesteps`.

    The digits config trains with a cosine schedule and T=250; the benchmarks use the paper's
    schedule for both suites (speed does not depend on the betas, only on T for sampling).
    `paper_form` computes the network as the paper writes it (XLA's 3x3 convs, each Upsample
    a repeat and a 3x3 conv), whatever the backend's 'auto' would pick: the program whose
    FLOPs count as the model's (`MODEL_FORM`).
    """
    if suite not in SUITES:
        raise ValueError(f'unknown suite {suite!r}; choose one of {sorted(SUITES)}')
    if dtype not in DTYPES:
        raise ValueError(f'unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}')
    config = SUITES[suite].get_config()
    config.diffusion.num_timesteps = num_timesteps
    config.diffusion.beta_schedule = 'linear'
    config.diffusion.beta_start, config.diffusion.beta_end = 1e-4, 0.02
    config.model.dtype = dtype
    if paper_form:
        config.model.update(MODEL_FORM)
    return config


def train_dtypes(dtype: str, also_bfloat16: bool) -> tuple[str, ...]:
    """The compute dtypes of the train rows: `dtype`, then bfloat16 if asked and not the same."""
    return (dtype, 'bfloat16') if also_bfloat16 and dtype != 'bfloat16' else (dtype,)
