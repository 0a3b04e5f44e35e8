"""SKD: speculative knowledge distillation (Xu et al., ICLR 2025).

The student proposes each token from its own sampling distribution; when the proposal is
not among the teacher's top-K tokens at that position, the teacher's own sample replaces
it. Both models decode side by side (two KV caches, one fixed-shape loop inside the step),
so every later token, the student's and the teacher's, conditions on the interleaved
prefix. The loss is then any divergence of config.loss on the interleaved sequences.
K = 1 makes every token the teacher's greedy choice unless the student agrees; a K as
large as the vocabulary keeps every student token (plain on-policy KD).

kwargs: top_k_teacher K ≥ 1 (default 25), and the sampling temperature / top_k / top_p
used for the student's proposals and the teacher's replacements alike.
Metric: replaced (fraction of generated tokens the teacher replaced).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from distill import sampling
from distill.algorithms import rollout
from distill.train import step as step_lib


class SKD(rollout.SamplingAlgorithm):
  DEFAULTS = {**rollout.SAMPLING_DEFAULTS, 'top_k_teacher': 25}
  teacher_generates = True

  def check_options(self, o: dict) -> None:
    k = o['top_k_teacher']
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
      raise self.kwarg_error('top_k_teacher', f'must be an int >= 1, got {k!r}')

  def _choose(self, rng, student_logits_BxV, teacher_logits_BxV):
    student_rng, teacher_rng = jax.random.split(rng)
    proposal_B, proposal_logp_B, _ = sampling.sample_from_logits(student_rng, student_logits_BxV,
                                                                 self.sampling)
    replacement_B, replacement_logp_B, _ = sampling.sample_from_logits(
        teacher_rng, teacher_logits_BxV, self.sampling)
    k = min(self.options['top_k_teacher'], teacher_logits_BxV.shape[-1])
    kth_B = jax.lax.top_k(teacher_logits_BxV, k)[0][:, -1]
    proposal_logit_B = jnp.take_along_axis(teacher_logits_BxV, proposal_B[:, None], axis=-1)[:, 0]
    accepted_B = proposal_logit_B >= kth_B   # ties at the K-th logit count as inside
    return (jnp.where(accepted_B, proposal_B, replacement_B),
            jnp.where(accepted_B, proposal_logp_B, replacement_logp_B),
            (~accepted_B).astype(jnp.float32))

  def step(self, ctx: step_lib.StepContext, state, teacher_params, batch):
    rows, sample = rollout.joint_sample_rows(
        ctx.student_graphdef, state['params'], ctx.teacher_graphdef, teacher_params, batch,
        step_lib.step_rng(state), self.sampling, self._choose)
    state, metrics = step_lib.train_step(ctx, state, teacher_params, rows)
    n = sample['mask_BxN'].sum().astype(jnp.float32)
    metrics['replaced'] = (sample['flags_BxN'].sum(), n)
    return state, metrics
