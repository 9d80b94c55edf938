"""Converts pytorch-fid's Inception weights into the .npz that `inception.load_params` reads.

    python -m diffusion_jax.evaluation.convert_inception pt_inception-2015-12-05-6726825d.pth \
        inception_fid.npz

Reading the .pth needs torch (`pip install torch`); the converted file needs nothing but numpy.
SRC may also be an .npz of the same state dict (torch names, torch layouts) saved with numpy,
for machines without torch and for tests.
Names map one to one (`Mixed_5b.branch1x1.conv.weight` -> `Mixed_5b/branch1x1/conv/kernel`),
convolution kernels go from [out, in, kh, kw] to [kh, kw, in, out] and the classifier from
[out, in] to [in, out]. The output also records the SHA-256 of the source file and a format
version, and is written atomically.
"""

import hashlib
import sys
import zipfile

import numpy as np

from diffusion_jax import errors
from diffusion_jax.evaluation import inception

_BN = {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean', 'running_var': 'var'}


# Weights that are not those of the FID Inception network.
ConversionError = errors.ConversionError


def _convert_tensor(name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """One torch tensor -> (our flat key, our layout)."""
    *module, leaf = name.split('.')
    if module and module[-1] == 'conv' and leaf == 'weight':
        if value.ndim != 4:
            raise ConversionError(f'{name}: a conv weight [out, in, kh, kw], got {value.shape}')
        return '/'.join([*module, 'kernel']), value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if module and module[-1] == 'bn' and leaf in _BN:
        return '/'.join([*module, _BN[leaf]]), value
    if module == ['fc'] and leaf == 'weight':
        return 'fc/kernel', value.T  # [out, in] -> [in, out]
    if module == ['fc'] and leaf == 'bias':
        return 'fc/bias', value
    raise ConversionError(f'tensor {name!r} has no place in the FID Inception network')


def convert_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """pytorch-fid's state dict -> our flat parameters, checked against the network.

    Args:
      state_dict: torch name -> array in torch layout, e.g. 'Mixed_5b.branch1x1.conv.weight'
        [out, in, kh, kw], 'Mixed_5b.branch1x1.bn.running_var' [out], 'fc.weight'
        [1008, 2048]; `num_batches_tracked` entries are ignored.

    Returns:
      Flat 'a/b/c' key -> float32 array in our layout: 'Mixed_5b/branch1x1/conv/kernel'
      [kh, kw, in, out], '.../bn/{scale,bias,mean,var}' [out], 'fc/kernel' [2048, 1008],
      'fc/bias' [1008].

    Raises:
      ConversionError: a tensor has no place in the network, or one is missing or misshapen.
    """
    flat = {}
    for name, value in state_dict.items():
        if name.endswith('num_batches_tracked'):
            continue
        try:
            value = np.asarray(value, np.float32)
        except (TypeError, ValueError) as e:
            raise ConversionError(f'tensor {name!r} is not numeric: {e}') from e
        key, value = _convert_tensor(name, value)
        flat[key] = value
    expected = inception.param_shapes()
    for key in sorted(set(expected) | set(flat)):
        if key not in flat:
            raise ConversionError(f'{key} (shape {expected[key]}) is missing from the source')
        if key not in expected:
            raise ConversionError(f'{key} is not a parameter of the FID Inception network')
        if flat[key].shape != expected[key]:
            raise ConversionError(
                f'{key}: shape {flat[key].shape} in the source, {expected[key]} expected'
            )
    return flat


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A state dict from a torch .pth (needs torch) or a numpy .npz of torch-named arrays."""
    if path.endswith('.npz'):
        try:
            with np.load(path) as f:
                return {k: f[k] for k in f.files}
        except (ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ConversionError(f'cannot read {path} as an .npz: {e}') from e
    try:
        import torch  # only here: the converted file needs no torch
    except ImportError as e:
        raise ConversionError(
            'reading a .pth needs torch: pip install torch to convert; the converted file '
            'needs no torch'
        ) from e
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises many types for a file that is not a state dict
        raise ConversionError(
            f'cannot read {path} as a torch state dict: {type(e).__name__}: {e}'
        ) from e
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConversionError(f'{path} holds no state dict of tensors')
    return {k: v.numpy() for k, v in state.items()}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def convert_file(src: str, dst: str) -> None:
    """Converts `src` (pytorch-fid's .pth, or its state dict as .npz) into `dst` (.npz).

    `dst` is written atomically by `inception.save_params`, with `_source_sha256` (hex SHA-256
    of `src`), `_params_sha256` (of the converted arrays) and `_format`.

    Raises:
      OSError: `src` cannot be read or `dst` cannot be written.
      ConversionError: `src` is not the FID Inception network's state dict.
    """
    digest = _sha256(src)
    flat = convert_state_dict(_read_state_dict(src))
    inception.save_params(dst, flat, source_sha256=digest)


def main(argv: list[str]) -> int:
    """`convert_inception SRC DST`: 0 on success, 2 with one `error: ...` line on bad input."""
    if len(argv) != 3 or argv[1].startswith('-'):
        sys.stderr.write(
            'usage: python -m diffusion_jax.evaluation.convert_inception SRC.pth DST.npz\n'
        )
        return 2
    src, dst = argv[1], argv[2]
    try:
        convert_file(src, dst)
    except (OSError, ConversionError) as e:
        message = ' '.join(str(e).split())  # torch's messages span lines; ours is one
        sys.stderr.write(f'error: {message[:500]}\n')
        return 2
    sys.stdout.write(f'wrote {dst}: use --config.eval.inception_weights={dst}\n')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
