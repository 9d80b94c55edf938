"""The Inception network of FID and IS, in Flax: the 2015-12-05 graph as pytorch-fid ports it.

FID (Heusel et al. 2017) and IS (Salimans et al. 2016) are defined by one specific network: the
TensorFlow Inception graph of 2015-12-05 used by TTUR, pytorch-fid and clean-fid, with 2048-d
"pool3" features and 1008 logits. It is InceptionV3 (Szegedy et al. 2016) with four quirks that
pytorch-fid reproduces and we follow: the average pools of the A, C and first E blocks ignore
the padding (`count_include_pad=False`), the last E block max-pools its pool branch, BatchNorm
uses eps 1e-3, and the classifier has 1008 outputs.

Preprocessing (pytorch-fid's): uint8 images -> x / 255 in [0, 1] -> bilinear resize to 299x299
with half-pixel centres, edge samples clamped and no antialiasing, also when shrinking (torch's
`interpolate(mode='bilinear', align_corners=False)`; here `jax.image.resize(..., 'bilinear',
antialias=False)`) -> 2x - 1 in [-1, 1]. TTUR's TensorFlow graph resizes inside the graph with
TF1's `ResizeBilinear`, which has no half-pixel centres, so pytorch-fid's numbers (and ours)
differ slightly from TTUR's for images that are not 299x299. Weights are never downloaded:
`load_params` reads the `.npz` that `convert_inception` writes from pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth`.

Convolutions and the classifier run at `Precision.HIGHEST`: GPUs would otherwise use TF32 for
float32 and the features would depend on the device. Checked against pytorch-fid 0.3.0's own
modules (torch 2.13 CPU, random weights and BatchNorm statistics, 8x8, 32x32 and 341x317
inputs): features and logits agree to 1e-6 relative.

Parameter names mirror torchvision's (`Mixed_5b/branch1x1/conv/kernel`), so the converter only
renames separators and transposes.
"""

import functools
import hashlib
import io
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util
from jax.sharding import Mesh

from diffusion_jax import errors, image_io, parallel

NUM_FEATURES = 2048
NUM_LOGITS = 1008
INPUT_SIZE = 299
BN_EPSILON = 1e-3
FORMAT_VERSION = 2  # of the converted .npz (2: with the arrays' checksum)
# pytorch-fid's file name carries the first hex digits of its SHA-256 (torch.hub's convention).
OFFICIAL_SHA256_PREFIX = '6726825d'
_PRECISION = jax.lax.Precision.HIGHEST  # no TF32: the same features on every device


class InceptionWeightsError(errors.UserError, ValueError):
    """A missing or mismatched Inception weights file."""


HOWTO = (
    "download pytorch-fid's pt_inception-2015-12-05-6726825d.pth (the pytorch-fid GitHub "
    'releases) on a machine with internet and convert it with `python -m '
    'diffusion_jax.evaluation.convert_inception SRC DST.npz`'
)


class BasicConv(nn.Module):
    """Conv (no bias) -> BatchNorm with running statistics -> ReLU."""

    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        (ph, pw) = self.padding
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=self.strides,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=_PRECISION,
            name='conv',
        )(x)
        bn = _BatchNorm(name='bn')
        return nn.relu(bn(x))


class _BatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param('scale', nn.initializers.ones, (c,))
        bias = self.param('bias', nn.initializers.zeros, (c,))
        mean = self.param('mean', nn.initializers.zeros, (c,))
        var = self.param('var', nn.initializers.ones, (c,))
        return (x - mean) * jax.lax.rsqrt(var + BN_EPSILON) * scale + bias


def _avg_pool(x: jax.Array) -> jax.Array:
    """3x3, stride 1, padding 1, padding not counted (pytorch-fid's count_include_pad=False)."""
    return nn.avg_pool(x, (3, 3), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x: jax.Array, strides: int = 2, pad: int = 0) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(strides, strides), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, (1, 1), name='branch1x1')(x)
        b5 = BasicConv(48, (1, 1), name='branch5x5_1')(x)
        b5 = BasicConv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
        b3 = BasicConv(64, (1, 1), name='branch3x3dbl_1')(x)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
        bp = BasicConv(self.pool_features, (1, 1), name='branch_pool')(_avg_pool(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, (3, 3), strides=2, name='branch3x3')(x)
        bd = BasicConv(64, (1, 1), name='branch3x3dbl_1')(x)
        bd = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
        bd = BasicConv(96, (3, 3), strides=2, name='branch3x3dbl_3')(bd)
        return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of the factorised 7x7
        b1 = BasicConv(192, (1, 1), name='branch1x1')(x)
        b7 = BasicConv(c7, (1, 1), name='branch7x7_1')(x)
        b7 = BasicConv(c7, row[0], padding=row[1], name='branch7x7_2')(b7)
        b7 = BasicConv(192, col[0], padding=col[1], name='branch7x7_3')(b7)
        bd = BasicConv(c7, (1, 1), name='branch7x7dbl_1')(x)
        for i, (kernel, pad) in enumerate((col, row, col), start=2):
            bd = BasicConv(c7, kernel, padding=pad, name=f'branch7x7dbl_{i}')(bd)
        bd = BasicConv(192, row[0], padding=row[1], name='branch7x7dbl_5')(bd)
        bp = BasicConv(192, (1, 1), name='branch_pool')(_avg_pool(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(192, (1, 1), name='branch3x3_1')(x)
        b3 = BasicConv(320, (3, 3), strides=2, name='branch3x3_2')(b3)
        b7 = BasicConv(192, (1, 1), name='branch7x7x3_1')(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
        b7 = BasicConv(192, (3, 3), strides=2, name='branch7x7x3_4')(b7)
        return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):
    max_pool_branch: bool  # the last E block of the FID graph max-pools

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(320, (1, 1), name='branch1x1')(x)
        b3 = BasicConv(384, (1, 1), name='branch3x3_1')(x)
        b3 = jnp.concatenate(
            [
                BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
                BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3),
            ],
            axis=-1,
        )
        bd = BasicConv(448, (1, 1), name='branch3x3dbl_1')(x)
        bd = BasicConv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
        bd = jnp.concatenate(
            [
                BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
                BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd),
            ],
            axis=-1,
        )
        pooled = _max_pool(x, strides=1, pad=1) if self.max_pool_branch else _avg_pool(x)
        bp = BasicConv(192, (1, 1), name='branch_pool')(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """The FID Inception network: [B, 299, 299, 3] in [-1, 1] -> (pool3 [B, 2048], logits)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = BasicConv(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)
        x = BasicConv(32, (3, 3), name='Conv2d_2a_3x3')(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
        x = _max_pool(x)
        x = BasicConv(80, (1, 1), name='Conv2d_3b_1x1')(x)
        x = BasicConv(192, (3, 3), name='Conv2d_4a_3x3')(x)
        x = _max_pool(x)
        x = InceptionA(32, name='Mixed_5b')(x)
        x = InceptionA(64, name='Mixed_5c')(x)
        x = InceptionA(64, name='Mixed_5d')(x)
        x = InceptionB(name='Mixed_6a')(x)
        for name, c7 in (
            ('Mixed_6b', 128),
            ('Mixed_6c', 160),
            ('Mixed_6d', 160),
            ('Mixed_6e', 192),
        ):
            x = InceptionC(c7, name=name)(x)
        x = InceptionD(name='Mixed_7a')(x)
        x = InceptionE(False, name='Mixed_7b')(x)
        x = InceptionE(True, name='Mixed_7c')(x)
        pool = jnp.mean(x, axis=(1, 2))
        return pool, nn.Dense(NUM_LOGITS, precision=_PRECISION, name='fc')(pool)


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
    """torch's `interpolate(mode='bilinear', align_corners=False)`, in NHWC.

    Output pixel i samples the input at (i + 0.5) * in / out - 0.5, clamped to the edge pixels,
    with no antialiasing filter when shrinking.

    Args:
      x: [B, H, W, C] float.
      height: output height.
      width: output width.

    Returns:
      [B, height, width, C], same dtype.
    """
    shape = (x.shape[0], height, width, x.shape[-1])
    return jax.image.resize(x, shape, 'bilinear', antialias=False)


def preprocess(images_uint8: jax.Array) -> jax.Array:
    """pytorch-fid's input: (resize_299(x / 255)) * 2 - 1.

    Args:
      images_uint8: [B, H, W, 3] uint8, any H and W.

    Returns:
      [B, 299, 299, 3] float32 in [-1, 1].
    """
    x = images_uint8.astype(jnp.float32) / 255.0
    return 2.0 * resize_bilinear(x, INPUT_SIZE, INPUT_SIZE) - 1.0


@functools.cache
def param_shapes() -> dict[str, tuple[int, ...]]:
    """{'Mixed_5b/branch1x1/conv/kernel': shape, ...} of every parameter."""
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    params = jax.eval_shape(InceptionV3().init, jax.random.key(0), x)['params']
    flat = traverse_util.flatten_dict(params, sep='/')
    return {k: tuple(v.shape) for k, v in flat.items()}


def random_params(rng: jax.Array) -> dict[str, Any]:
    """Random parameters of the network's shapes (tests and shape checks), not a trained net.

    Kernels are He-normal, so activations keep their scale through the ReLUs; BatchNorm scales
    and variances are uniform in [0.5, 1.5], shifts and means 0.1 * N(0, 1). Drawn without
    running the network, which takes half a minute to initialise on a CPU.

    Args:
      rng: a PRNG key.

    Returns:
      The nested parameter dict that `make_feature_fn` takes.
    """
    # NumPy seeded from the key: one jitted draw of ~470 shapes compiles for over a minute.
    gen = np.random.default_rng(np.asarray(jax.random.randint(rng, (4,), 0, 2**31 - 1)))
    flat = {}
    for key, shape in sorted(param_shapes().items()):
        leaf = key.rsplit('/', 1)[1]
        if leaf == 'kernel':  # conv [kh, kw, in, out] or fc [in, out]
            std = np.sqrt(2.0 / np.prod(shape[:-1]))
            value = gen.standard_normal(shape, np.float32) * std
        elif leaf in ('scale', 'var'):
            value = gen.uniform(0.5, 1.5, shape)
        else:  # BatchNorm 'bias' and 'mean', fc 'bias'
            value = 0.1 * gen.standard_normal(shape, np.float32)
        flat[key] = jnp.asarray(value, jnp.float32)
    return traverse_util.unflatten_dict(flat, sep='/')


def params_sha256(flat: dict[str, np.ndarray]) -> str:
    """SHA-256 over the sorted names, dtypes, shapes and bytes of a flat parameter dict."""
    digest = hashlib.sha256()
    for key in sorted(flat):
        value = np.ascontiguousarray(flat[key])
        digest.update(f'{key}:{value.dtype.str}:{value.shape};'.encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def save_params(path: str, params: dict[str, Any], *, source_sha256: str) -> None:
    """Writes parameters as the converted .npz `load_params` reads, atomically.

    Args:
      path: destination (local or gs://).
      params: nested or flat ('Mixed_5b/branch1x1/conv/kernel') dict of float32 arrays.
      source_sha256: hex SHA-256 of the file they were converted from (recorded, checked by
        `load_params` against `config.eval.inception_sha256`).
    """

    flat = traverse_util.flatten_dict(params, sep='/') if _is_nested(params) else params
    flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    buf = io.BytesIO()
    np.savez(
        buf,
        _format=np.int32(FORMAT_VERSION),
        _source_sha256=np.str_(source_sha256),
        _params_sha256=np.str_(params_sha256(flat)),
        **flat,
    )
    image_io.atomic_write_bytes(path, buf.getvalue())


def _is_nested(params: dict[str, Any]) -> bool:
    return any(isinstance(v, dict) for v in params.values())


def load_params(path: str, *, source_sha256: str = OFFICIAL_SHA256_PREFIX) -> dict[str, Any]:
    """Reads converted weights (`save_params`'s .npz) and checks them before any use.

    Args:
      path: the .npz file (`config.eval.inception_weights`), local or gs://.
      source_sha256: the SHA-256 (or a prefix of it) the weights must have been converted from
        (`config.eval.inception_sha256`); '' accepts any source, with a warning that the scores
        are not comparable with published ones.

    Returns:
      The nested parameter dict that `make_feature_fn` takes, float32 arrays.

    Raises:
      InceptionWeightsError: the file is missing or unreadable, has another format version, its
        arrays do not match their stored checksum (damaged or edited), it was converted from a
        file with another checksum, or a parameter is missing, extra or misshapen (the message
        names the first such key).
    """
    flat, meta = _read_npz(path)
    _check_provenance(path, flat, meta, source_sha256)
    _check_shapes(path, flat)
    return traverse_util.unflatten_dict(
        {k: jnp.asarray(v, jnp.float32) for k, v in flat.items()}, sep='/'
    )


def _read_npz(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(parameter arrays by flat name, metadata by '_'-prefixed name) of a converted .npz."""
    if not path or not epath.Path(path).is_file():
        raise InceptionWeightsError(f'no Inception weights file at {path!r}: {HOWTO}')
    try:
        arrays = image_io.load_arrays(path)
    except (OSError, image_io.ArrayFileError) as e:
        raise InceptionWeightsError(f'cannot read Inception weights {path}: {e}; {HOWTO}') from e
    flat = {k: v for k, v in arrays.items() if not k.startswith('_')}
    meta = {k: v.item() for k, v in arrays.items() if k.startswith('_')}
    return flat, meta


def _check_provenance(
    path: str, flat: dict[str, np.ndarray], meta: dict[str, Any], source_sha256: str
) -> None:
    """Checks the format version, the arrays' checksum and the source file's SHA-256 prefix."""
    version = meta.get('_format')
    if version != FORMAT_VERSION:
        raise InceptionWeightsError(
            f'{path} has format version {version}, this code reads {FORMAT_VERSION}: convert '
            'the .pth again with `python -m diffusion_jax.evaluation.convert_inception SRC DST`'
        )
    if meta.get('_params_sha256') != params_sha256(flat):
        raise InceptionWeightsError(
            f'{path} is damaged: its arrays do not match the checksum stored when it was '
            'written; convert the .pth again with `python -m '
            'diffusion_jax.evaluation.convert_inception SRC DST`'
        )
    source = str(meta.get('_source_sha256', ''))
    if not source.startswith(source_sha256):
        raise InceptionWeightsError(
            f'{path} was converted from a file with SHA-256 {source}, not from the expected '
            f'{source_sha256}... (config.eval.inception_sha256); use the official '
            f'pt_inception-2015-12-05-{OFFICIAL_SHA256_PREFIX}.pth, or pass '
            "--config.eval.inception_sha256='' to accept these weights (FID and IS will not be "
            'comparable with published numbers)'
        )
    if not source.startswith(OFFICIAL_SHA256_PREFIX):
        logging.warning(
            '%s was not converted from the official pt_inception-2015-12-05-%s.pth (source '
            'SHA-256 %s): FID and IS will not be comparable with published numbers',
            path,
            OFFICIAL_SHA256_PREFIX,
            source,
        )


def _check_shapes(path: str, flat: dict[str, np.ndarray]) -> None:
    """Checks that `flat` has exactly the network's parameters, each float and rightly shaped."""
    expected = param_shapes()
    for key in sorted(set(expected) | set(flat)):
        got = flat[key].shape if key in flat else None
        if got != expected.get(key) or not np.issubdtype(flat[key].dtype, np.floating):
            what = f'shape {got}' if got != expected.get(key) else f'dtype {flat[key].dtype}'
            raise InceptionWeightsError(
                f'{path} does not fit the FID Inception network: {key} has {what}, expected '
                f'float shape {expected.get(key)}; {HOWTO}'
            )


def _features(params: dict[str, Any], images: jax.Array) -> tuple[jax.Array, jax.Array]:
    return InceptionV3().apply({'params': params}, preprocess(images))


@functools.lru_cache
def _jitted_features(mesh: Mesh | None) -> Callable:
    """One jitted network per mesh, shared by every `make_feature_fn` (compiling it is slow)."""
    if mesh is None:
        return jax.jit(_features)
    batched = parallel.batch_sharding(mesh)
    return jax.jit(
        _features, in_shardings=(parallel.replicated(mesh), batched), out_shardings=batched
    )


def make_feature_fn(
    params: dict[str, Any], *, mesh: Mesh | None = None
) -> Callable[[np.ndarray], tuple[jax.Array, jax.Array]]:
    """Returns the jitted `fn(images_uint8) -> (pool, logits)` of the FID network.

    `fn` takes uint8 [B, H, W, 3] (numpy, or a global jax.Array sharded over `mesh`'s devices
    of every process; any H and W; tile grayscale to 3 channels first), applies
    `preprocess` and returns pool [B, 2048] float32 (FID's features, >= 0) and logits
    [B, 1008] float32 (IS's classifier). It compiles once per input shape.

    Args:
      params: from `load_params` or `random_params`.
      mesh: with a mesh, the parameters are replicated on its devices and each batch is split
        along B over them (B must be a multiple of `mesh.size`); without one, jit's default
        device runs it.

    Returns:
      The feature function.
    """
    jitted = _jitted_features(mesh)
    if mesh is not None:
        params = jax.device_put(params, parallel.replicated(mesh))

    def feature_fn(images_uint8: np.ndarray | jax.Array) -> tuple[jax.Array, jax.Array]:
        images = images_uint8 if isinstance(images_uint8, jax.Array) else np.asarray(images_uint8)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f'expected uint8 [B, H, W, 3], got {images.dtype} {images.shape}')
        if mesh is not None and images.shape[0] % mesh.size:
            raise parallel.BatchSizeError(
                f'a batch of {images.shape[0]} images does not split over the {mesh.size} '
                f'devices of the mesh; pad it to a multiple of {mesh.size}'
            )
        return jitted(params, images)

    return feature_fn
