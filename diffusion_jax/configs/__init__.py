"""The experiment configs, inside the package so that every install has them.

`cifar10` is the base; `digits`, `celeba_hq`, `lsun_church` and the class-conditional
`cifar10_conditional` and `digits_conditional` override its deltas. The repository's top-level
`configs/<name>.py` are aliases for `--config=configs/<name>.py`.
"""
