"""Class-conditional CIFAR10, classifier-free guidance: `--config=configs/cifar10_conditional.py`.

The paper's CIFAR10 model and recipe (`cifar10`) with the label of each image embedded and added
to the timestep embedding (10 classes plus a null label), 10% of the training labels replaced by
the null label (Ho & Salimans 2022), and guided sampling with w = 1 over every class in turn.
The labels come from the tfds dataset's `label` feature.

    python -m diffusion_jax.main --config=configs/cifar10_conditional.py --workdir=DIR
"""

import ml_collections

from diffusion_jax.configs import cifar10


def get_config() -> ml_collections.ConfigDict:
    """Returns the conditional CIFAR10 configuration: the CIFAR10 base plus its deltas."""
    config = cifar10.get_config()
    config.model.num_classes = 10
    config.training.label_dropout = 0.1
    config.sampling.guidance_scale = 1.0
    return config
