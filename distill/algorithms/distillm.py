"""DistiLLM's rows: the adaptive off-policy regime (Ko et al., ICML 2024).

The probability φ of training on student-generated outputs (SGO) starts at
`init_threshold` (0) and grows by `threshold_step` (0.1, capped at 1) whenever the
validation loss has risen by at least `loss_eps` (0.1) — the schedule of the authors'
released code: the reference level is the validation loss at the last rise (the first
evaluation, here, since the trainer does not evaluate before step 1; the reference code
evaluates before training). Each step draws u ~ U(0, 1) from the step's rng:
  u < φ_fresh, or u < φ while the replay buffer is not full: the student samples the
      batch's prompts; those rows are trained on and pushed into the buffer;
  otherwise u < φ: a batch drawn (without replacement) from the full buffer;
  otherwise: the dataset batch.
φ_fresh is the replay-ratio schedule: 'decreasing' φ·(1 − t/T) (the code's default),
'constant' φ/2, 'increasing' φ·t/T, with t the step and T config.total_steps.

The buffer is a fixed-capacity ring of rows (the oldest are overwritten, as the reference's
deque does) held as arrays in state['algo'] with φ and the reference loss, so checkpoints
restore it exactly. φ changes in `after_eval`, on the host, from the evaluation metrics.
The divergence is config.loss: DistiLLM's skew KL / skew reverse KL (α = 0.1) in its config.

kwargs: init_threshold, threshold_step, loss_eps (any finite number; a negative one grows φ
at every evaluation after the first), capacity (rows, ≥ batch size; the paper uses 1000),
replay_ratio, val_metric (an evaluation metric, default 'ce': the student's validation
cross-entropy, as in the reference), and the sampling temperature / top_k / top_p.
Metrics: source_fresh / source_replay / source_data (fractions of steps), sgo_probability.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from distill.algorithms import hooks, rollout
from distill.algorithms.hooks import ROW_KEYS

REPLAY_RATIOS = ('decreasing', 'constant', 'increasing')
VAL_METRICS = ('ce', 'perplexity', 'kl_forward', 'kl_reverse')
DATA, FRESH, REPLAY = 0, 1, 2


class AdaptiveReplayRows(rollout.Sampled):
  DEFAULTS = {**rollout.SAMPLING_DEFAULTS, 'init_threshold': 0.0, 'threshold_step': 0.1,
              'loss_eps': 0.1, 'capacity': 1000, 'replay_ratio': 'decreasing',
              'val_metric': 'ce'}

  samples = False   # dataset and replayed rows are not fresh samples

  def check(self) -> None:
    super().check()
    o = self.options
    for name in ('init_threshold', 'threshold_step'):
      self.real_in(name, 0.0, 1.0)
    if not hooks.is_real(o['loss_eps']) or not math.isfinite(o['loss_eps']):
      raise self.kwarg_error('loss_eps', f'must be a finite number, got {o["loss_eps"]!r}')
    capacity, batch_size = o['capacity'], self.config.data.batch_size
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < batch_size:
      raise self.kwarg_error('capacity', f'must be an int >= config.data.batch_size '
                             f'({batch_size}), got {capacity!r}')
    if o['replay_ratio'] not in REPLAY_RATIOS:
      raise self.kwarg_error('replay_ratio', f'must be one of {REPLAY_RATIOS}, got '
                             f'{o["replay_ratio"]!r}')
    if o['val_metric'] not in VAL_METRICS:
      raise self.kwarg_error('val_metric', f'must be one of {VAL_METRICS}, got '
                             f'{o["val_metric"]!r}')
    if not self.config.eval_steps and o['init_threshold'] == 0.0:
      raise ValueError('DistiLLM grows the probability of student outputs at evaluations, but '
                       'config.eval_steps is 0 and init_threshold is 0: it would never sample. '
                       'Set config.eval_steps > 0.')

  def init_state(self):
    C, T = self.options['capacity'], self.run.seq_len
    return {
        'threshold': jnp.float32(self.options['init_threshold']),
        'reference_loss': jnp.float32(jnp.inf),   # inf: not yet evaluated
        'buffer': {'tokens': jnp.zeros((C, T), jnp.int32), 'targets': jnp.zeros((C, T), jnp.int32),
                   'input_mask': jnp.zeros((C, T), jnp.int32),
                   'loss_mask': jnp.zeros((C, T), jnp.float32)},
        'size': jnp.int32(0),
        'next': jnp.int32(0),
    }

  def _fresh_probability(self, threshold, step):
    ratio = self.options['replay_ratio']
    if ratio == 'constant':
      return 0.5 * threshold
    progress = (step + 1).astype(jnp.float32) / self.config.total_steps
    return threshold * (progress if ratio == 'increasing' else 1.0 - progress)

  def draw(self, ctx, inputs, batch):
    state, rng = inputs.state, inputs.rng
    C = self.options['capacity']
    u = jax.random.uniform(jax.random.fold_in(rng, 0))
    threshold = state['threshold']
    full = state['size'] >= C
    fresh = (u < self._fresh_probability(threshold, inputs.step)) | ((u < threshold) & ~full)
    source = jnp.where(fresh, FRESH, jnp.where(u < threshold, REPLAY, DATA))
    buffer_state = {k: state[k] for k in ('buffer', 'size', 'next')}

    def data(buf):
      return {k: batch[k] for k in ROW_KEYS}, buf

    def student(buf):
      rows, _ = rollout.sample_rows(ctx.student_graphdef, inputs.params, batch,
                                    jax.random.fold_in(rng, 1), self.sampling)
      B = rows['tokens'].shape[0]
      slots = (buf['next'] + jnp.arange(B)) % C
      buf = {'buffer': {k: buf['buffer'][k].at[slots].set(rows[k]) for k in ROW_KEYS},
             'size': jnp.minimum(buf['size'] + B, C), 'next': (buf['next'] + B) % C}
      return rows, buf

    def replay(buf):
      B = batch['tokens'].shape[0]
      slots = jax.random.choice(jax.random.fold_in(rng, 2), C, (B,), replace=False)
      return {k: buf['buffer'][k][slots] for k in ROW_KEYS}, buf

    rows, buffer_state = jax.lax.switch(source, (data, student, replay), buffer_state)
    one = jnp.float32(1.0)
    metrics = {f'source_{name}': ((source == value).astype(jnp.float32), one)
               for name, value in (('data', DATA), ('fresh', FRESH), ('replay', REPLAY))}
    metrics['sgo_probability'] = (threshold, one)
    return hooks.Drawn(rows, dict(state, **buffer_state), metrics)

  def after_eval(self, state, eval_metrics: dict):
    name = self.options['val_metric']
    if name not in eval_metrics:
      raise ValueError(f'DistiLLM val_metric {name!r} is not among the evaluation metrics '
                       f'{sorted(eval_metrics)}')
    loss = float(eval_metrics[name])
    threshold, reference = float(state['threshold']), float(state['reference_loss'])
    if not math.isfinite(reference):
      reference = loss
    elif loss >= reference + self.options['loss_eps']:
      threshold = min(threshold + self.options['threshold_step'], 1.0)
      reference = loss
    put = lambda value, like: jax.device_put(np.float32(value), like.sharding)
    return dict(state, threshold=put(threshold, state['threshold']),
                reference_loss=put(reference, state['reference_loss']))
