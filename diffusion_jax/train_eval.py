"""Evaluation during training: sample quality of the EMA parameters every N steps.

With `config.training.eval_every_steps` > 0, the training loop hands its state to `Evaluator`
every that many steps. It draws `config.training.eval_num_samples` images with the sampler that
`config.sampling` names (ancestral, respaced or DDIM, compiled once for the run), scores them as
they are drawn (FID and IS through Inception on the devices when `config.eval.inception_weights`
is given, against the cached reference statistics; the digits classifier's IS and FD on the
digits), and writes the scores to TensorBoard as `eval/<metric>`. With
`config.training.best_metric`, it keeps the checkpoint with the best score so far in
`WORKDIR/best/` (a workdir of its own: `--workdir=WORKDIR/best --mode=sample` samples from it).

Every evaluation draws the same noise (`config.sampling.seed`), so scores of two steps differ by
the parameters only. Nothing here touches the compiled train step.
"""

import math
import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from diffusion_jax import checkpointing, evaluate, experiment, generate, lead, parallel
from diffusion_jax.evaluation import inception

BEST_DIR = 'best'
# Metrics `best_metric` may name, and whether a lower value is better.
LOWER_IS_BETTER = {'fid': True, 'inception_score': False, 'digits_fd': True, 'digits_is': False}
# Every score an evaluation reports (a conditional digits model's accuracy besides the above).
_SCORES = (*LOWER_IS_BETTER, 'digits_accuracy')


class Evaluator:
    """Scores the EMA parameters every `eval_every_steps` steps; keeps the best checkpoint."""

    def __init__(self, exp: experiment.Experiment, mesh: Mesh, workdir: str):
        config = exp.config
        self.config, self.mesh, self.workdir = config, mesh, workdir
        self.every = config.training.eval_every_steps
        self.sample_fn = exp.sampler(mesh)
        params = evaluate.load_inception(config)  # refused now, not after hours of training
        self.feature_fn = None
        if params is not None:
            evaluate.check_reference(config)
            self.feature_fn = inception.make_feature_fn(params, mesh=mesh)
        self.metric = config.training.best_metric
        self.best = None
        if self.metric:
            self.best = checkpointing.Checkpointer(
                generate.checkpoint_dir(os.path.join(workdir, BEST_DIR)),
                keep=1,
                save_every_steps=1,
            )
        self.best_value = self._stored_best()

    def _stored_best(self) -> float | None:
        """The best score so far, from the kept checkpoint of an earlier run of this workdir."""
        if self.best is None or self.best.latest_valid_step() is None:
            return None
        meta = self.best.restore_meta()
        return meta.get('value') if meta.get('metric') == self.metric else None

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def __call__(self, step: int, state: Any) -> dict[str, float]:
        """Scores `state.ema_params`; saves `state` as the best if it is. Returns the scores."""
        metrics = self.score(state.ema_params)
        logging.info(
            'step %d: eval of %d samples: %s',
            step,
            self.config.training.eval_num_samples,
            ', '.join(f'{k} {v:.4f}' for k, v in metrics.items()),
        )
        if self.metric:
            self._keep_if_best(step, state, metrics)
        return metrics

    def score(self, params: Any) -> dict[str, float]:
        """FID/IS (with Inception weights) and the digits metrics (on digits) of fresh samples.

        Every process returns the same numbers.
        """
        config, num = self.config, self.config.training.eval_num_samples
        batch = config.sampling.batch_size
        streamed = None
        if self.feature_fn is not None:
            streamed = evaluate.StreamingFidIs(self.feature_fn, self.mesh, num)
        kept = []  # the digits classifier reads every image on the lead: 64 bytes each
        rng = jax.random.key(config.sampling.seed)
        for start in range(0, num, batch):
            count = min(batch, num - start)
            images = generate.to_uint8(self.sample_fn(params, rng, start))
            if streamed is not None:
                streamed(images, count, start)
            if config.data.dataset == 'digits':
                kept.append(np.asarray(parallel.to_host(images))[:count])
        metrics: dict[str, float] = {}
        if kept and lead.LeadWriter().is_lead:
            labels = generate.sample_labels(config, num)
            found = evaluate.digits_scores(np.concatenate(kept), labels)
            metrics.update({k: found[k] for k in ('digits_is', 'digits_fd', 'digits_accuracy')
                            if k in found})  # fmt: skip
        if streamed is not None:
            found = evaluate.fid_is(config, self.mesh, streamed)
            metrics.update({k: found[k] for k in ('fid', 'inception_score') if k in found})
        return _same_on_every_process(metrics)

    def _keep_if_best(self, step: int, state: Any, metrics: dict[str, float]) -> None:
        value = metrics[self.metric]
        lower = LOWER_IS_BETTER[self.metric]
        better = self.best_value is None or (
            value < self.best_value if lower else value > self.best_value
        )
        if not better:
            return
        meta = {'config': self.config.to_dict(), 'step': step, 'metric': self.metric}
        self.best.save(step, state, meta={**meta, 'value': value}, force=True)
        self.best.wait()
        logging.info('step %d: best %s so far (%.4f); kept in %s', step, self.metric, value,
                     os.path.join(self.workdir, BEST_DIR))  # fmt: skip
        self.best_value = value

    def close(self) -> None:
        if self.best is not None:
            self.best.close()


def _same_on_every_process(metrics: dict[str, float]) -> dict[str, float]:
    """Process 0's scores on every process (the lead computes the digits metrics and FID)."""
    names = sorted(_SCORES)
    values = np.asarray([float(metrics.get(k, math.nan)) for k in names], np.float64)
    if jax.process_count() > 1:  # JAX moves float32 (x64 is off): scores to 7 digits
        values = np.asarray(multihost_utils.broadcast_one_to_all(values.astype(np.float32)))
    return {k: float(v) for k, v in zip(names, values, strict=True) if not math.isnan(v)}
