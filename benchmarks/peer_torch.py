"""The PyTorch peer: diffusers' `UNet2DModel` as our exact U-Net, trained and sampled the usual way.

    python -m benchmarks.peer_torch --suite=cpu --out=FILE.json

`benchmarks.run` starts this as a child process of the same invocation, and each side's memory
is then its own process's. On a GPU it runs first, before our side touches the accelerator (so
JAX's GPU preallocation cannot starve it); on the CPU suite it serves (--serve): it prepares
every measurement, then times one call at a time when our side asks, in turns with ours
(`interleave`). Sizes come from `suites`; like ours, every timing follows one warm-up call and
is the median of the timed calls, synchronising with `torch.cuda.synchronize` on CUDA.
* train: the network from `peer_config` (its parameter count must equal ours), in train mode
  (dropout as configured); eps-prediction MSE at t ~ U{0..T-1} with `DDPMScheduler.add_noise`;
  torch Adam with config.optim's lr, betas, eps and linear warm-up (fused kernel); global-norm
  clipping at config.optim.grad_clip; EMA with config.optim.ema_decay (`torch._foreach_lerp_`).
* sampling: diffusers' scheduler loop as `DDPMPipeline` runs it: `DDPMScheduler` over all
  T=1000 steps (fixed_large variance, x0 clipped), and `DDIMScheduler` with 50 steps (eta 0,
  linspace spacing, x0 clipped), as our samplers.
Eager PyTorch (no torch.compile), float32 or under `torch.autocast(bfloat16)`; on CUDA with
`cudnn.benchmark`, the counterpart of XLA's compile-time autotuning. Afterwards (--check) it
converts the peer's weights with `diffusion_jax.convert` and checks, with JAX on the CPU, that
our U-Net computes the same function.
"""

import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from absl import app, flags, logging

from benchmarks import interleave, memory, peer_config, suites

_SUITE = flags.DEFINE_enum('suite', 'cpu', tuple(suites.SUITES), 'Which sizes to measure.')
_OUT = flags.DEFINE_string('out', None, 'Write the results here as JSON.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs per measurement (median reported).')
_TRAIN_DTYPES = flags.DEFINE_list('train_dtypes', ['float32'], 'Compute dtype of each train row.')
_SAMPLE_DTYPE = flags.DEFINE_enum('sample_dtype', 'float32', suites.DTYPES, 'Sampling dtype.')
_THREADS = flags.DEFINE_integer('threads', None, 'torch CPU threads (default: usable cores).')
_CHECK = flags.DEFINE_bool('check', True, 'Check with JAX on the CPU that ours = the peer.')
_SERVE = flags.DEFINE_bool(
    'serve',
    False,
    'CPU suites: prepare every measurement, then time calls as `benchmarks.run` asks on stdin, '
    "in turns with ours (`benchmarks.interleave`); --repeats is then the caller's.",
)


def _device(suite: str) -> torch.device:
    if suite == 'cpu' or (suite == 'rehearse' and not torch.cuda.is_available()):
        return torch.device('cpu')
    if not torch.cuda.is_available():
        raise RuntimeError(f'--suite={suite} runs the peer on CUDA, but torch sees no CUDA GPU')
    return torch.device('cuda')


def _device_name(device: torch.device) -> str:
    """The CUDA device's name (as JAX's device_kind gives it), or the CPU's model name."""
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    try:
        with open('/proc/cpuinfo') as f:
            names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or 'cpu'


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One measurement, warmed up.

    Attributes:
        call: runs it once and returns when the device is done.
        record: its fixed fields (batch size, dtype, ...).
        timing: the median seconds of one call -> the record's timing fields.
    """

    call: Callable[[], object]
    record: dict
    timing: Callable[[float], dict]


def _median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def _peak_memory(device: torch.device, record: dict):
    """Fills `record['memory']` with the block's peak: CUDA allocator bytes, or host RSS."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        yield
        record['memory'] = {
            'kind': 'device',
            'peak_bytes': torch.cuda.max_memory_allocated(device),
            'note': 'torch.cuda.max_memory_allocated during the measurement',
        }
        return
    with memory.HostRssPeak() as host:
        yield
    record['memory'] = host.as_dict()


def _autocast(device: torch.device, dtype: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == 'bfloat16')


def create_unet(suite: str, device: torch.device) -> diffusers.UNet2DModel:
    """The suite's network as a diffusers UNet2DModel on `device`, float32 parameters."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**peer_config.unet2d_kwargs(suites.get_config(suite)))
    num_params = sum(p.numel() for p in unet.parameters())
    if num_params != suites.SUITES[suite].num_params:
        expected = suites.SUITES[suite].num_params
        raise RuntimeError(f'peer has {num_params:,} parameters, ours {expected:,}')
    return unet.to(device)


def _ddpm_scheduler(config) -> diffusers.DDPMScheduler:
    diffusion = config.diffusion
    return diffusers.DDPMScheduler(
        num_train_timesteps=diffusion.num_timesteps,
        beta_start=diffusion.beta_start,
        beta_end=diffusion.beta_end,
        beta_schedule='linear',
        variance_type='fixed_large',
        clip_sample=True,
        prediction_type='epsilon',
    )


def prepare_train(suite: str, dtype: str, device: torch.device) -> Prepared:
    """Adam steps on a fixed random batch [B, C, S, S] in [-1, 1] (ours: the same values).

    One call runs the suite's `train_steps` steps; the record gives ms per step.
    """
    config, s = suites.get_config(suite, dtype=dtype), suites.SUITES[suite]
    unet = create_unet(suite, device).train()
    scheduler = _ddpm_scheduler(config)
    o = config.optim
    params = list(unet.parameters())
    opt = torch.optim.Adam(
        params, lr=o.learning_rate, betas=(o.beta1, o.beta2), eps=o.eps, fused=True
    )
    warmup = o.warmup_steps
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(step / warmup, 1.0) if warmup else 1.0
    )
    ema = [p.detach().clone() for p in params]
    size, channels = config.data.image_size, config.data.num_channels
    images = np.random.default_rng(0).uniform(-1, 1, (s.train_batch, size, size, channels))
    x_start = torch.from_numpy(images.astype(np.float32).transpose(0, 3, 1, 2)).to(device)
    num_timesteps = config.diffusion.num_timesteps

    def step() -> torch.Tensor:
        t = torch.randint(0, num_timesteps, (s.train_batch,), device=device)
        noise = torch.randn_like(x_start)
        x_t = scheduler.add_noise(x_start, noise, t)
        with _autocast(device, dtype):
            eps = unet(x_t, t).sample
        loss = F.mse_loss(eps.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        opt.step()
        lr_sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - o.ema_decay)
        return loss.detach()

    def run() -> float:
        for _ in range(s.train_steps):
            loss = step()
        return float(loss)  # waits for the last step, as block_until_ready does

    def timing(seconds_per_call: float) -> dict:
        seconds = seconds_per_call / s.train_steps
        return {
            'step_ms': 1e3 * seconds,
            'steps_per_s': 1 / seconds,
            'images_per_s': s.train_batch / seconds,
        }

    float(step())  # warm-up
    return Prepared(run, {'batch_size': s.train_batch, 'dtype': dtype}, timing)


def prepare_sampler(
    suite: str, sampler: str, num_steps: int, dtype: str, device: torch.device
) -> Prepared:
    """The diffusers scheduler loop over `num_steps` reverse steps; one call samples a batch."""
    config, s = suites.get_config(suite, dtype=dtype), suites.SUITES[suite]
    unet = create_unet(suite, device).eval()
    if sampler == 'ancestral':
        scheduler = _ddpm_scheduler(config)
    else:
        diffusion = config.diffusion
        scheduler = diffusers.DDIMScheduler(
            num_train_timesteps=diffusion.num_timesteps,
            beta_start=diffusion.beta_start,
            beta_end=diffusion.beta_end,
            beta_schedule='linear',
            clip_sample=True,
            set_alpha_to_one=True,  # our last DDIM step goes to alpha_bar = 1
            timestep_spacing='linspace',  # round(linspace(0, T - 1, n)), as ours
            prediction_type='epsilon',
        )
    scheduler.set_timesteps(num_steps)
    size, channels = config.data.image_size, config.data.num_channels
    shape = (s.sample_batch, channels, size, size)
    generator = torch.Generator(device=device).manual_seed(0)

    @torch.inference_mode()
    def sample() -> torch.Tensor:
        x = torch.randn(shape, generator=generator, device=device)
        for t in scheduler.timesteps:
            with _autocast(device, dtype):
                eps = unet(x, t).sample
            x = scheduler.step(eps.float(), t, x, generator=generator).prev_sample
        return x

    def run() -> None:
        sample()
        _sync(device)

    def timing(seconds: float) -> dict:
        images_per_s = s.sample_batch / seconds
        return {
            'seconds_per_batch': seconds,
            'images_per_s': images_per_s,
            'hours_for_50k': 50_000 / images_per_s / 3600,
        }

    run()  # warm-up
    return Prepared(
        run, {'batch_size': s.sample_batch, 'num_steps': num_steps, 'dtype': dtype}, timing
    )


def check_same_function(suite: str) -> dict:
    """Max |ours - peer| of one forward pass with the peer's weights converted to ours.

    Runs on the CPU in float32: x [2, S, S, C] standard normal, t = [3, T - 7].
    """
    # Only here, so the timing above runs without JAX in this process; on the CPU, so that it
    # does not take GPU memory.
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
    import jax

    from diffusion_jax import convert, models

    config = suites.get_config(suite)
    unet = create_unet(suite, torch.device('cpu')).eval()
    tensors = {k: v.detach().numpy() for k, v in unet.state_dict().items()}
    params = convert.convert_tensors(tensors, config)
    size, channels = config.data.image_size, config.data.num_channels
    x = np.random.default_rng(1).standard_normal((2, size, size, channels)).astype(np.float32)
    t = np.array([3, config.diffusion.num_timesteps - 7], np.int32)
    ours = models.get_model(config).apply({'params': params}, x, t, train=False)
    with torch.inference_mode():
        theirs = unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t)).sample
    theirs = theirs.numpy().transpose(0, 2, 3, 1)
    diff = float(np.max(np.abs(np.asarray(ours) - theirs)))
    return {
        'max_abs_diff': diff,
        'max_abs_output': float(np.max(np.abs(theirs))),
        'jax_backend': jax.default_backend(),
        'same_function': diff < 1e-3,
    }


def measure(prepared: Prepared, repeats: int, device: torch.device) -> dict:
    """The record of `prepared`: the median of `repeats` timed calls, and their peak memory."""
    record = dict(prepared.record)
    with _peak_memory(device, record):
        seconds = _median_seconds(prepared.call, repeats, device)
    record.update(prepared.timing(seconds))
    return record


def _prepare_all(suite: str, train_dtypes: list[str], sample_dtype: str, device: torch.device):
    """(name, `Prepared`) per measurement, as `benchmarks.run` names them; prepared lazily."""
    for dtype in train_dtypes:
        logging.info('peer train step (%s, %s)', suite, dtype)
        yield f'train_{dtype}', prepare_train(suite, dtype, device)
    for sampler, num_steps in suites.SAMPLERS:
        logging.info('peer %s sampler, %d steps', sampler, num_steps)
        yield (
            f'{sampler}_{num_steps}',
            prepare_sampler(suite, sampler, num_steps, sample_dtype, device),
        )


def _results_header(suite: str, device: torch.device) -> dict:
    return {
        'versions': {'torch': torch.__version__, 'diffusers': diffusers.__version__},
        'device': _device_name(device),
        'threads': torch.get_num_threads(),
        'num_params': suites.SUITES[suite].num_params,
        'train': {},
        'sampling': {},
    }


def _store(results: dict, name: str, record: dict) -> None:
    if name.startswith('train_'):
        results['train'][name.removeprefix('train_')] = record
    else:
        results['sampling'][name] = record


def run_all(
    suite: str,
    train_dtypes: list[str],
    sample_dtype: str,
    repeats: int,
    on_row: Callable[[dict], None] = lambda results: None,
) -> dict:
    """Every peer measurement of the suite, as the JSON record `benchmarks.run` merges.

    `on_row(results so far)` is called after each measurement.
    """
    device = _device(suite)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    results = _results_header(suite, device)
    for name, prepared in _prepare_all(suite, train_dtypes, sample_dtype, device):
        _store(results, name, measure(prepared, repeats, device))
        on_row(results)
    return results


def serve_all(suite: str, train_dtypes: list[str], sample_dtype: str) -> dict:
    """Prepares every measurement, then times calls as `benchmarks.run` asks (`interleave`).

    CPU only: on a GPU our side would share the device with this process. Returns the same
    record as `run_all`, each row the median of the calls timed, with 'round_seconds' listing
    them; a measurement never asked for is left out.
    """
    device = _device(suite)
    if device.type != 'cpu':
        raise RuntimeError('--serve times the peer in turns with ours, which needs a CPU suite')
    out = interleave.protocol_stream()  # first: nothing printed while preparing reaches it
    results = _results_header(suite, device)
    prepared = dict(_prepare_all(suite, train_dtypes, sample_dtype, device))
    timed = interleave.serve({name: p.call for name, p in prepared.items()}, sys.stdin, out)
    for name, record in timed.items():
        row = dict(prepared[name].record, memory=record['memory'])
        row.update(prepared[name].timing(statistics.median(record['seconds'])))
        row['round_seconds'] = record['seconds']
        _store(results, name, row)
    return results


def main(argv: list[str]) -> None:
    del argv
    threads = _THREADS.value or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)

    def write_partial(results: dict) -> None:  # a run stopped by a time limit keeps these
        if _OUT.value:
            with open(_OUT.value + '.partial.json', 'w') as f:
                json.dump(results, f, indent=2)

    suite, train_dtypes, sample_dtype = _SUITE.value, _TRAIN_DTYPES.value, _SAMPLE_DTYPE.value
    if _SERVE.value:
        results = serve_all(suite, train_dtypes, sample_dtype)
    else:
        results = run_all(suite, train_dtypes, sample_dtype, _REPEATS.value, write_partial)
    if _CHECK.value:
        results['check'] = check_same_function(suite)
        logging.info('ours vs peer, same weights: %s', results['check'])
    text = json.dumps(results, indent=2)
    if _OUT.value:
        with open(_OUT.value, 'w') as f:
            f.write(text + '\n')
    else:
        print(text)


if __name__ == '__main__':
    app.run(main)
