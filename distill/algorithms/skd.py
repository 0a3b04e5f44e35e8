"""SKD's rows: speculative knowledge distillation (Xu et al., ICLR 2025).

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
from distill.algorithms import hooks, rollout


class InterleavedRows(rollout.Sampled):
  DEFAULTS = {**rollout.SAMPLING_DEFAULTS, 'top_k_teacher': 25}
  teacher_generates = True

  def check(self) -> None:
    super().check()
    self.positive_int('top_k_teacher')

  def _noise(self, key, B, V):
    """Two draws a step: the student's proposal and the teacher's replacement."""
    if self.sampling.temperature == 0:
      return None, None
    return tuple(sampling.gumbel_noise(k, (B,), V) for k in jax.random.split(key))

  def _choose(self, noise, student_logits_BxV, teacher_logits_BxV):
    student_noise, teacher_noise = noise
    proposal_B, proposal_logp_B, _ = sampling.sample_with_noise(
        student_noise, student_logits_BxV, self.sampling)
    replacement_B, replacement_logp_B, _ = sampling.sample_with_noise(
        teacher_noise, teacher_logits_BxV, self.sampling)
    k = min(self.options['top_k_teacher'], teacher_logits_BxV.shape[-1])
    kth_B = jax.lax.top_k(teacher_logits_BxV, k)[0][:, -1]
    proposal_logit_B = jnp.take_along_axis(teacher_logits_BxV, proposal_B[:, None], axis=-1)[:, 0]
    accepted_B = proposal_logit_B >= kth_B   # ties at the K-th logit count as inside
    return (jnp.where(accepted_B, proposal_B, replacement_B),
            jnp.where(accepted_B, proposal_logp_B, replacement_logp_B),
            (~accepted_B).astype(jnp.float32))

  def rule(self) -> sampling.JointRule:
    return sampling.JointRule(self._noise, self._choose)

  def draw(self, ctx, inputs, batch):
    rows, sample = rollout.joint_sample_rows(
        ctx.student_graphdef, inputs.params, ctx.teacher_graphdef, inputs.teacher_params, batch,
        inputs.rng, self.sampling, self.rule())
    n = sample['mask_BxN'].sum().astype(jnp.float32)
    return hooks.Drawn(rows, inputs.state, {'replaced': (sample['flags_BxN'].sum(), n)}, sample)
