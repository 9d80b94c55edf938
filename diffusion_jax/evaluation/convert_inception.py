"""Converts pytorch-fid's Inception weights into the .npz that `inception.load_params` reads.

    python -m diffusion_jax.evaluation.convert_inception pt_inception-2015-12-05-6726825d.pth \
        inception_fid.npz

Reading the .pth needs torch (`pip install torch`); the converted file needs nothing but numpy.
Names map one to one (`Mixed_5b.branch1x1.conv.weight` -> `Mixed_5b/branch1x1/conv/kernel`),
convolution kernels go from [out, in, kh, kw] to [kh, kw, in, out] and the classifier from
[out, in] to [in, out]. The output also records the SHA-256 of the source file and a format
version, and is written atomically.
"""

import hashlib
import io
import sys

import numpy as np

from diffusion_jax.evaluation import inception

_BN = {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean', 'running_var': 'var'}


class ConversionError(ValueError):
    """Weights that are not those of the FID Inception network."""


def convert_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """pytorch-fid's state dict (name -> numpy array) -> our flat 'a/b/c' parameters.

    Raises:
      ConversionError: a tensor has no place in the network, or one is missing or misshapen.
    """
    flat = {}
    for name, value in state_dict.items():
        parts = name.split('.')
        if parts[-1] == 'num_batches_tracked':
            continue
        value = np.asarray(value, np.float32)
        if parts[-2:] == ['conv', 'weight']:
            key, value = [*parts[:-1], 'kernel'], value.transpose(2, 3, 1, 0)
        elif parts[-2] == 'bn' and parts[-1] in _BN:
            key = [*parts[:-1], _BN[parts[-1]]]
        elif parts[0] == 'fc' and parts[-1] in ('weight', 'bias'):
            key = ['fc', 'kernel' if parts[-1] == 'weight' else 'bias']
            value = value.T if parts[-1] == 'weight' else value
        else:
            raise ConversionError(f'tensor {name!r} has no place in the FID Inception network')
        flat['/'.join(key)] = value
    expected = inception.param_shapes()
    for key in sorted(set(expected) | set(flat)):
        got = flat[key].shape if key in flat else None
        if got != expected.get(key):
            raise ConversionError(f'{key}: shape {got} in the source, {expected.get(key)} expected')
    return flat


def _read_pth(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ConversionError(
            'reading a .pth needs torch: pip install torch (the converted file needs no torch)'
        ) from e
    state = torch.load(path, map_location='cpu', weights_only=True)
    return {k: v.numpy() for k, v in state.items()}


def convert_file(src: str, dst: str) -> None:
    """Converts `src` (.pth) into `dst` (.npz), atomically."""
    from diffusion_jax import image_io

    with open(src, 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    flat = convert_state_dict(_read_pth(src))
    buf = io.BytesIO()
    np.savez(
        buf, _source_sha256=np.str_(digest), _format=np.int32(inception.FORMAT_VERSION), **flat
    )
    image_io.atomic_write_bytes(dst, buf.getvalue())


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1].startswith('-'):
        sys.stderr.write(
            'usage: python -m diffusion_jax.evaluation.convert_inception SRC.pth DST.npz\n'
        )
        return 2
    src, dst = argv[1], argv[2]
    try:
        convert_file(src, dst)
    except (OSError, ConversionError) as e:
        sys.stderr.write(f'error: {e}\n')
        return 2
    print(f'wrote {dst}: use --config.eval.inception_weights={dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
