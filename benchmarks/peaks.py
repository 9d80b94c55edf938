"""Peak dense FLOP/s of a device, for model FLOPs utilisation (MFU).

MFU = model FLOPs per call / seconds per call / (peak FLOP/s per device x devices used). The
model FLOPs are XLA's cost analysis of our compiled program (it leaves out the zero-padding taps
of SAME convs, about 6% fewer than the dense count; notes/performance.md section 1.1); the peer
is credited with the same FLOPs, since it runs the same network.

Which peak applies depends on how the device computes a given dtype:
* GPU float32 runs on TF32 tensor cores: JAX's default matmul precision uses TF32 on recent
  GPUs, and PyTorch lets cuDNN convs use TF32 by default. bfloat16 uses the bf16 peak.
* TPU float32 dots and convs run as bf16 passes by default, so both dtypes use the bf16 peak.
* CPU: an estimate of the fp32 FMA peak from /proc/cpuinfo (`cpu_peak_estimate`), used for
  both dtypes.

Figures not listed here: pass `--peak_tflops` to `benchmarks.run`.
"""

import os
import re

_NOTES = 'notes/performance.md'
_H100_SXM = {
    'bf16': (989.4, f'H100 SXM dense bf16 ({_NOTES} section 3)'),
    'tf32': (494.7, f'H100 SXM dense TF32 ({_NOTES} section 3)'),
}
# (regex on the lower-cased jax/torch device kind, {precision: (TFLOP/s per device, source)}),
# first match wins.
PEAK_TFLOPS = (
    (
        r'h100.*pcie',
        {
            'bf16': (756.0, f'H100 PCIe dense bf16 ({_NOTES} section 6)'),
            'tf32': (378.0, f'H100 PCIe: SXM TF32 x 756 / 989.4, as {_NOTES} section 6 says'),
        },
    ),
    (r'h100 80gb hbm3|h100 sxm', _H100_SXM),  # jax's device_kind: 'NVIDIA H100 80GB HBM3'
    (
        r'h200',
        {
            'bf16': (
                989.4,
                'H200 datasheet: 1,979 bf16 TFLOP/s with sparsity, halved (not in notes)',
            ),
            'tf32': (
                494.7,
                'H200 datasheet: 989 TF32 TFLOP/s with sparsity, halved (not in notes)',
            ),
        },
    ),
    (r'a100', {'bf16': (312.0, f'A100 dense fp16/bf16 ({_NOTES} anchor A8)')}),
    # A v3 chip (123 TFLOP/s bf16) has two TensorCores, and JAX sees each as one device.
    (r'^tpu v3', {'bf16': (61.5, f'TPU v3: 123 TFLOP/s bf16 per chip / 2 cores ({_NOTES})')}),
)


def precision_of(platform: str, dtype: str) -> str:
    """The peak that `dtype` compute uses on `platform` ('cpu', 'gpu', 'cuda', 'tpu').

    Returns:
        'bf16', 'tf32' or 'fp32'.
    """
    if platform == 'cpu':
        return 'fp32'
    if platform == 'tpu' or dtype in ('bfloat16', 'float16'):
        return 'bf16'
    return 'tf32'


def _cpuinfo_fields(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(':')
        if not sep:
            if fields:  # the first processor's block has ended
                break
            continue
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_peak_estimate(cpuinfo: str, num_cores: int) -> tuple[float, str] | None:
    """cores x clock x fp32 FLOP/cycle, read from the text of /proc/cpuinfo; an estimate.

    FLOP/cycle per core = 2 (an FMA) x 2 FMA pipes x fp32 lanes: 16 lanes where 512-bit FMAs run
    at full rate (Intel with avx512f; AMD family >= 26), else 8 (avx2 + fma, which includes
    AMD Zen 4, whose AVX-512 runs on two 256-bit pipes). The clock is 'cpu MHz', the current
    (under a hypervisor, nominal) frequency, not the boost clock; parts with one AVX-512 FMA
    pipe have half this peak. Hence only an estimate.

    Args:
        cpuinfo: the text of /proc/cpuinfo.
        num_cores: cores the process may use.

    Returns:
        (TFLOP/s, a description of the estimate), or None if the fields are missing or the CPU
        has no AVX2 FMA.
    """
    fields = _cpuinfo_fields(cpuinfo)
    flags = set(fields.get('flags', '').split())
    try:
        mhz = float(fields['cpu MHz'])
        family = int(fields.get('cpu family', '0'))
    except (KeyError, ValueError):
        return None
    if not {'fma', 'avx2'} <= flags:
        return None
    vendor = fields.get('vendor_id', '')
    wide = 'avx512f' in flags and (vendor == 'GenuineIntel' or family >= 26)
    lanes = 16 if wide else 8
    per_cycle = 2 * 2 * lanes
    tflops = num_cores * mhz * 1e6 * per_cycle / 1e12
    note = (
        f'estimate: {num_cores} cores x {mhz / 1e3:.3f} GHz (cpu MHz) x {per_cycle} fp32 '
        f'FLOP/cycle (2 FMA pipes x {lanes} lanes x 2; {vendor}, family {family})'
    )
    return tflops, note


def device_peak(
    device_kind: str,
    platform: str,
    dtype: str,
    num_devices: int = 1,
    override_tflops: float | None = None,
    cpuinfo: str | None = None,
    num_cores: int | None = None,
) -> dict | None:
    """The peak FLOP/s that MFU divides by, with where the figure came from.

    Args:
        device_kind: e.g. jax's `devices()[0].device_kind` ('NVIDIA H100 80GB HBM3', 'cpu').
        platform: 'cpu', 'gpu' (or 'cuda') or 'tpu'.
        dtype: the compute dtype, 'float32' or 'bfloat16'.
        num_devices: devices the measured program runs on.
        override_tflops: a per-device peak given by the user (--peak_tflops); wins if set.
        cpuinfo: /proc/cpuinfo text for the CPU estimate; None reads it where it exists.
        num_cores: cores for the CPU estimate; None: the cores this process may use.

    Returns:
        {'tflops' (all devices), 'tflops_per_device', 'num_devices', 'precision', 'source'},
        or None when the device is not in the table and no override was given.
    """
    precision = precision_of('gpu' if platform == 'cuda' else platform, dtype)
    found = None
    if override_tflops:
        found = (override_tflops, '--peak_tflops')
    elif platform == 'cpu':
        found = _read_cpu_estimate(cpuinfo, num_cores)
    else:
        for pattern, table in PEAK_TFLOPS:
            if re.search(pattern, device_kind.lower()):
                found = table.get(precision)
                break
    if found is None:
        return None
    per_device, source = found
    return {
        'tflops': per_device * num_devices,
        'tflops_per_device': per_device,
        'num_devices': num_devices,
        'precision': precision,
        'source': source,
    }


def _read_cpu_estimate(cpuinfo: str | None, num_cores: int | None) -> tuple[float, str] | None:
    if cpuinfo is None:
        try:
            with open('/proc/cpuinfo') as f:
                cpuinfo = f.read()
        except OSError:
            return None
    if num_cores is None:
        num_cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else 1
    return cpu_peak_estimate(cpuinfo, num_cores)


def mfu(flops: float | None, seconds: float, peak: dict | None) -> float | None:
    """flops / seconds / peak FLOP/s (a fraction), or None if either is unknown."""
    if not flops or not peak:
        return None
    return flops / seconds / (peak['tflops'] * 1e12)
