"""GKD: generalized knowledge distillation (Agarwal et al., ICLR 2024).

Each step is, with probability λ (`lmbda`), on-policy: the student samples completions of
the batch's prompts and the divergence is taken on them; otherwise the batch's dataset
completions are used (or, with `seq_kd`, completions sampled from the teacher). The loss
is whatever config.loss says; GKD's own choice is the generalized JSD(β) (configs/
arithmetic_gkd.py). The coin is drawn from the step's rng, so a resumed run flips the same
coins; the branch not taken is never computed (lax.cond). As in the paper, no gradient
flows through the sampling.

kwargs: lmbda ∈ [0, 1] (default 0.5), seq_kd (default False), temperature / top_k / top_p of
the sampling (defaults 1, 0, 1: the plain model distribution).
Metric: on_policy, the fraction of steps that sampled from the student.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from distill.algorithms import rollout
from distill.train import step as step_lib

ROW_KEYS = ('tokens', 'targets', 'input_mask', 'loss_mask')


class GKD(rollout.SamplingAlgorithm):
  DEFAULTS = {**rollout.SAMPLING_DEFAULTS, 'lmbda': 0.5, 'seq_kd': False}

  def validate(self) -> None:
    # Known before the base class builds the sampling config: the teacher must sample too.
    self.teacher_generates = bool(self.kwargs.get('seq_kd', False))
    super().validate()

  def check_options(self, options: dict) -> None:
    lmbda = options['lmbda']
    if not rollout.is_real(lmbda) or not 0.0 <= lmbda <= 1.0:
      raise self.kwarg_error('lmbda', f'must be a probability in [0, 1], got {lmbda!r}')
    if not isinstance(options['seq_kd'], bool):
      raise self.kwarg_error('seq_kd', f'must be True or False, got {options["seq_kd"]!r}')

  def step(self, ctx: step_lib.StepContext, state, teacher_params, batch):
    lmbda = float(self.options['lmbda'])
    rng = step_lib.step_rng(state)
    on_policy = jax.random.bernoulli(jax.random.fold_in(rng, 0), lmbda)
    sample_rng = jax.random.fold_in(rng, 1)

    def student_rows():
      return rollout.sample_rows(ctx.student_graphdef, state['params'], batch, sample_rng,
                                 self.sampling)[0]

    def off_policy_rows():
      if self.options['seq_kd']:
        return rollout.sample_rows(ctx.teacher_graphdef, teacher_params, batch, sample_rng,
                                   self.sampling)[0]
      return {k: batch[k] for k in ROW_KEYS}

    # λ at 0 or 1 needs no branch (and compiles one sampler fewer).
    if lmbda == 1.0:
      rows = student_rows()
    elif lmbda == 0.0:
      rows = off_policy_rows()
    else:
      rows = jax.lax.cond(on_policy, student_rows, off_policy_rows)
    state, metrics = step_lib.train_step(ctx, state, teacher_params, rows)
    metrics['on_policy'] = (on_policy.astype(jnp.float32), jnp.float32(1.0))
    return state, metrics
