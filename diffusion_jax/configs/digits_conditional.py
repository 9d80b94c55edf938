"""Class-conditional digits with classifier-free guidance: `--config=configs/digits_conditional.py`.

The embedded default (`digits`) with one change of network and three of training and sampling:
the U-Net embeds the digit's label (10 classes, plus the null label of the unconditional branch;
Improved DDPM's `label_emb`, 652,449 parameters instead of 651,041), 10% of the training labels
are replaced by the null label (Ho & Salimans 2022), and sampling guides with w = 1:
eps = 2 eps(x, y) - eps(x, null). Samples are drawn round-robin over the digits (image i is
digit i mod 10), so the grid has one row per digit.

    python -m diffusion_jax.main --config=configs/digits_conditional.py --workdir=/tmp/ddpm_cond

`--mode=eval` scores 1000 samples with the digits classifier: its IS and FD, and the class
accuracy of the samples against the labels they were drawn with; and sweeps w over
`eval.guidance_sweep`, written as a table and a plot. Measured: see README.md.
"""

import ml_collections

from diffusion_jax.configs import digits


def get_config() -> ml_collections.ConfigDict:
    """Returns the conditional digits configuration: the digits config plus its deltas."""
    config = digits.get_config()
    config.model.num_classes = 10
    config.training.label_dropout = 0.1
    config.sampling.guidance_scale = 1.0
    config.eval.guidance_sweep = (0.0, 1.0, 3.0)
    return config
