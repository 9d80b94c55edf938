"""Each 3x3 convolution shape of the digits network, timed alone against its FLOP count.

    python -m benchmarks.conv_shapes [--batch=64] [--repeats=20] [--out=FILE.json]

Finds the convolutions of the `cpu` suite's forward pass (their input shape, kernel and stride)
from its jaxpr, and for each distinct shape times one jitted call that computes the forward
convolution and both backward ones (the input and the kernel gradient), as a train step does,
in each implementation of `models.layers.conv3x3` (`conv_impl`: XLA's convolution, one im2col
matmul, nine shifted matmuls, Winograd's F(2x2, 3x3); the last is XLA's convolution for the
stride-2 conv) and as XLA's convolution on NCHW data (the other layout).
Reports the median of `--repeats` calls and GFLOP/s, counting
2 B Ho Wo 9 Cin Cout per convolution, three per call.
"""

import collections
import json
import statistics
import time

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import suites
from diffusion_jax import experiment
from diffusion_jax.models import layers

_BATCH = flags.DEFINE_integer('batch', 64, 'Images per call (the cpu suite trains at 64).')
_REPEATS = flags.DEFINE_integer('repeats', 20, 'Timed calls per shape and implementation.')
_OUT = flags.DEFINE_string('out', None, 'Write the table as JSON here.')
IMPLS = ('xla', 'xla_nchw', 'im2col', 'shifted', 'winograd')


def network_convs(batch: int) -> collections.Counter:
    """(H, W, Cin, Cout, stride) -> how many of the forward pass's convolutions have it."""
    config = suites.get_config('cpu')
    exp = experiment.build(config)
    x = jnp.zeros((batch, *exp.image_shape), jnp.float32)
    t = jnp.zeros((batch,), jnp.int32)
    params = exp.abstract_state.params
    jaxpr = jax.make_jaxpr(lambda p: exp.model.apply({'params': p}, x, t, train=False))(params)
    shapes = collections.Counter()

    def visit(eqns):
        for eqn in eqns:
            if eqn.primitive.name == 'conv_general_dilated':
                lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
                _, h, w, cin = lhs
                shapes[(h, w, cin, rhs[-1], eqn.params['window_strides'][0])] += 1
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub.eqns)

    visit(jaxpr.jaxpr.eqns)
    return shapes


def _timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_shape(shape: tuple, batch: int, impl: str, repeats: int) -> dict:
    h, w, cin, cout, stride = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, h, w, cin)), jnp.float32)
    conv = layers.conv3x3(cout, name='conv', strides=stride, impl=impl.removesuffix('_nchw'),
                          dtype=jnp.float32, param_dtype=jnp.float32)  # fmt: skip
    params = conv.init(jax.random.key(0), x)
    out_shape = jax.eval_shape(conv.apply, params, x).shape
    if impl == 'xla_nchw':  # the same conv on NCHW data with an OIHW kernel
        x = jnp.transpose(x, (0, 3, 1, 2))
        params = jax.tree.map(lambda a: a.transpose(3, 2, 0, 1) if a.ndim == 4 else a, params)

        def apply(p, x):
            k = p['params']['kernel']
            pad = 'SAME' if stride == 1 else ((0, 1), (0, 1))
            numbers = ('NCHW', 'OIHW', 'NCHW')
            y = jax.lax.conv_general_dilated(x, k, (stride, stride), pad, dimension_numbers=numbers)
            return y + p['params']['bias'][None, :, None, None]

        out_shape = jax.eval_shape(apply, params, x).shape
        conv = type('NCHW', (), {'apply': staticmethod(apply)})
    cotangent = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)

    @jax.jit
    def fwd_bwd(params, x):
        y, vjp = jax.vjp(conv.apply, params, x)
        return y, vjp(cotangent)

    seconds = _timed(fwd_bwd, params, x, repeats=repeats)
    ho, wo = (out_shape[2], out_shape[3]) if impl == 'xla_nchw' else out_shape[1:3]
    flops = 3 * 2 * batch * ho * wo * 9 * cin * cout
    return {'ms': 1e3 * seconds, 'gflops': flops / seconds / 1e9, 'mflop': flops / 1e6}


def main(argv: list[str]) -> None:
    del argv
    rows = []
    for shape, count in sorted(network_convs(_BATCH.value).items()):
        row = {'shape': shape, 'count': count}
        for impl in IMPLS:
            row[impl] = time_shape(shape, _BATCH.value, impl, _REPEATS.value)
        rows.append(row)
    print('| HxW, Cin -> Cout, stride | in the net | MFLOP | ' + ' | '.join(IMPLS) + ' |')
    print('|---|---:|---:|' + '---:|' * len(IMPLS))
    for row in rows:
        h, w, cin, cout, stride = row['shape']
        cells = [f'{row[i]["ms"]:.2f} ms, {row[i]["gflops"]:.0f} GFLOP/s' for i in IMPLS]
        print(f"| {h}x{w}, {cin} -> {cout}, {stride} | {row['count']} | "
              f"{row['xla']['mflop']:.0f} | " + ' | '.join(cells) + ' |')  # fmt: skip
    total = {i: sum(r['count'] * r[i]['ms'] for r in rows) for i in IMPLS}
    print('weighted by count, ms per train step:', ', '.join(f'{i} {total[i]:.1f}' for i in IMPLS))
    if _OUT.value:
        with open(_OUT.value, 'w') as f:
            json.dump({'batch': _BATCH.value, 'rows': rows, 'total_ms': total}, f, indent=1)


if __name__ == '__main__':
    app.run(main)
