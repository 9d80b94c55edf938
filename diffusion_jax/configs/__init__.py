"""The experiment configs, inside the package so that every install has them.

`cifar10` is the base; `digits`, `celeba_hq` and `lsun_church` override its deltas. The
repository's top-level `configs/<name>.py` are aliases for `--config=configs/<name>.py`.
"""
