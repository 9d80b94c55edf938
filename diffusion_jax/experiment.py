"""One way to build an experiment from its config: network, diffusion, optimizer, state shape.

Training, sampling, evaluation, `convert` and the benchmarks all start from `build(config)`, so
the model, the diffusion tables and the TrainState they use are the same by construction.
Building is cheap: the train state exists only as shapes (`abstract_state`) until `init_state`
initialises it, so a read-only mode restores a checkpoint without compiling `model.init`.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax
from jax.sharding import Mesh

from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import models, parallel, sampling, schedules, timestep_sampling
from diffusion_jax import train_state as train_state_lib


def create_diffusion(config: ml_collections.ConfigDict) -> diffusion_lib.GaussianDiffusion:
    """The `GaussianDiffusion` that `config.diffusion` describes."""
    c = config.diffusion
    betas = schedules.get_beta_schedule(
        c.beta_schedule, c.num_timesteps, beta_start=c.beta_start, beta_end=c.beta_end
    )
    return diffusion_lib.GaussianDiffusion.create(
        betas, c.model_mean_type, c.model_var_type, c.loss_type
    )


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(H, W, C) of one image of `config.data`."""
    data = config.data
    return (data.image_size, data.image_size, data.num_channels)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything an experiment's config determines before any weights exist.

    Attributes:
        config: the config it was built from.
        model: the unbound denoising network (`models.get_model`).
        diffusion: the diffusion the network is trained for.
        image_shape: (H, W, C) of one image.
        tx: the optimizer (clipping included).
        learning_rate_fn: the schedule `tx` uses.
        abstract_state: the TrainState as `jax.ShapeDtypeStruct` leaves, unplaced.
    """

    config: ml_collections.ConfigDict
    model: nn.Module
    diffusion: diffusion_lib.GaussianDiffusion
    image_shape: tuple[int, int, int]
    tx: optax.GradientTransformation
    learning_rate_fn: optax.Schedule
    abstract_state: train_state_lib.TrainState

    @property
    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.abstract_state.params))

    def init_state(self, rng: jax.Array, mesh: Mesh) -> train_state_lib.TrainState:
        """A freshly initialised TrainState, replicated over `mesh`."""
        state = train_state_lib.create_train_state(
            self.model,
            self.tx,
            rng,
            self.image_shape,
            _loss_history(self.config),
            len(self.config.optim.ema_decays),
        )
        return jax.device_put(state, parallel.replicated(mesh))

    def sampler(
        self,
        mesh: Mesh | None,
        *,
        batch_size: int | None = None,
        sampler: str | None = None,
        num_steps: Any = None,
        guidance_scale: float | None = None,
    ) -> sampling.Sampler:
        """The sampler `config.sampling` describes (`sampling.make_sample_fn`), over `mesh`.

        `batch_size`, `sampler`, `num_steps` and `guidance_scale` override the config's when
        given.
        """
        s = self.config.sampling
        return sampling.make_sample_fn(
            self.model,
            self.diffusion,
            batch_size=batch_size or s.batch_size,
            image_shape=self.image_shape,
            sampler=sampler or s.sampler,
            num_steps=num_steps if num_steps is not None else s.num_steps,
            spacing=s.spacing,
            eta=s.eta,
            clip_denoised=s.clip_denoised,
            mesh=mesh,
            class_label=s.class_label,
            guidance_scale=s.guidance_scale if guidance_scale is None else guidance_scale,
        )

    def restore_target(self, mesh: Mesh) -> Any:
        """`abstract_state` with every leaf replicated over `mesh`: what a checkpoint fills."""
        sharding = parallel.replicated(mesh)
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
            self.abstract_state,
        )


def _loss_history(config: ml_collections.ConfigDict) -> Any:
    """The timestep sampler's empty history, or None for uniform t."""
    if config.training.t_sampler == 'uniform':
        return None
    return timestep_sampling.init_history(config.diffusion.num_timesteps)


def build(config: ml_collections.ConfigDict, device: Any = None) -> Experiment:
    """Builds the experiment `config` describes (a validated config; see `config_lib`).

    `device` decides the attention blocks' cuDNN use (`models.get_model`); None: this machine's.
    """
    model = models.get_model(config, device)
    tx, learning_rate_fn = train_state_lib.create_optimizer(config.optim)
    shape = image_shape(config)
    abstract_state = jax.eval_shape(
        lambda: train_state_lib.create_train_state(
            model,
            tx,
            jax.random.key(0),
            shape,
            _loss_history(config),
            len(config.optim.ema_decays),
        )
    )
    return Experiment(
        config=config,
        model=model,
        diffusion=create_diffusion(config),
        image_shape=shape,
        tx=tx,
        learning_rate_fn=learning_rate_fn,
        abstract_state=abstract_state,
    )
