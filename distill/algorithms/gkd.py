"""GKD's rows: generalized knowledge distillation (Agarwal et al., ICLR 2024).

Each step is, with probability λ (`lmbda`), on-policy: the student samples completions of
the batch's prompts; otherwise the batch's dataset completions are used (or, with `seq_kd`,
completions sampled from the teacher). The objective is whatever config.loss says; GKD's
own choice is the generalized JSD(β) (configs/arithmetic_gkd.py). The coin is drawn from the
step's rng, so a resumed run flips the same coins; the branch not taken is never computed
(lax.cond). As in the paper, no gradient flows through the sampling.

kwargs: lmbda ∈ [0, 1] (default 0.5), seq_kd (default False), temperature / top_k / top_p of
the sampling (defaults 1, 0, 1: the plain model distribution).
Metric: on_policy, the fraction of steps that sampled from the student.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from distill.algorithms import hooks, rollout


class MixedRows(rollout.Sampled):
  DEFAULTS = {**rollout.SAMPLING_DEFAULTS, 'lmbda': 0.5, 'seq_kd': False}
  samples = False   # dataset rows are not sampled: a policy-gradient objective can't use them

  def check(self) -> None:
    self.real_in('lmbda', 0.0, 1.0)
    # Known before the sampling config is checked: the teacher must sample too.
    self.teacher_generates = self.boolean('seq_kd')
    super().check()

  def draw(self, ctx, inputs, batch):
    lmbda = float(self.options['lmbda'])
    on_policy = jax.random.bernoulli(jax.random.fold_in(inputs.rng, 0), lmbda)
    sample_rng = jax.random.fold_in(inputs.rng, 1)

    def student_rows():
      return rollout.sample_rows(ctx.student_graphdef, inputs.params, batch, sample_rng,
                                 self.sampling)[0]

    def off_policy_rows():
      if self.options['seq_kd']:
        return rollout.sample_rows(ctx.teacher_graphdef, inputs.teacher_params, batch, sample_rng,
                                   self.sampling)[0]
      return {k: batch[k] for k in hooks.ROW_KEYS}

    # λ at 0 or 1 needs no branch (and compiles one sampler fewer).
    if lmbda == 1.0:
      rows = student_rows()
    elif lmbda == 0.0:
      rows = off_policy_rows()
    else:
      rows = jax.lax.cond(on_policy, student_rows, off_policy_rows)
    metrics = {'on_policy': (on_policy.astype(jnp.float32), jnp.float32(1.0))}
    return hooks.Drawn(rows, inputs.state, metrics)
