"""MiniLLM's rows and objective: reverse KL by policy gradient (Gu et al., ICLR 2024).

The student minimises KL(q‖p) over whole sequences. With per-token rewards
r_t = log p(y_t | y<t) − log q(y_t | y<t), the gradient splits into
  single-step: Σ_t ∇ KL(q(·|y<t) ‖ p(·|y<t)), computed exactly over the vocabulary at every
      position of the sampled sequence and differentiated directly (the configured token
      objective, which must be reverse KL);
  long-term:   −Σ_t R_{t+1} ∇ log q(y_t | y<t), REINFORCE with the future rewards
      normalised by their number (length normalisation):
      R_{t+1} = mean of r_t' over the sampled tokens t' > t (0 for the last token).
Sampling is teacher-mixed: y_t ~ p̃ = α·p + (1−α)·q (α = `teacher_mix`, 0.2), both models
decoding side by side; each token is reweighted by w_t = q(y_t)/p̃(y_t) (≤ 1/(1−α)) in both
terms, and the long-term term uses PPO's clipped form max(−R·w_t, −R·clip(w_t, 1±ε))
(ε = `clip_range`, 0.2). The weights and rewards are constants; the single-step term and the
policy-gradient surrogate go through the chunked loss when config.loss.chunk_size > 0.

Simplifications (honest list): one gradient step per sample (no PPO inner epochs, so the
PPO ratio is w_t itself; the clip only removes gradient where w_t leaves [1−ε, 1+ε]); no
value function, reward whitening or reward clipping; no language-modelling loss on a
pre-training corpus; the long-term term uses the future rewards R_{t+1} of the paper (the
released code also adds r_t itself there and whitens).

kwargs: teacher_mix α ∈ [0, 1), clip_range ε > 0, length_norm (True; False: plain sums of
future rewards), and the sampling temperature (> 0) / top_k / top_p applied to both models.
Metrics: single_step (mean KL(q‖p)), long_term (surrogate value), importance_weight,
reward (mean r_t, a per-token estimate of −KL(q‖p) under the mix), sample_length.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from distill import sampling
from distill.algorithms import divergence, hooks, policy_gradient, rollout


class TeacherMixedRows(rollout.Sampled):
  """Tokens drawn from α·p + (1−α)·q, both models decoding side by side."""
  DEFAULTS = {**rollout.SAMPLING_DEFAULTS, 'teacher_mix': 0.2}
  teacher_generates = True

  def check(self) -> None:
    super().check()
    o = self.options
    if not hooks.is_real(o['teacher_mix']) or not 0.0 <= o['teacher_mix'] < 1.0:
      raise self.kwarg_error('teacher_mix', f'must be in [0, 1), got {o["teacher_mix"]!r}')

  def _noise(self, key, B, V):
    return sampling.gumbel_noise(key, (B,), V)

  def _choose(self, noise_BxG, student_logits_BxV, teacher_logits_BxV):
    """A token of α·p̃_teacher + (1−α)·q̃_student (each after temperature/top-k/top-p)."""
    alpha = self.options['teacher_mix']
    log_q = jax.nn.log_softmax(sampling.sampling_logits(student_logits_BxV, self.sampling), -1)
    log_p = jax.nn.log_softmax(sampling.sampling_logits(teacher_logits_BxV, self.sampling), -1)
    log_mix = jnp.logaddexp(jnp.log1p(-alpha) + log_q,
                            jnp.log(alpha) + log_p) if alpha > 0 else log_q
    plain = sampling.SamplingConfig(max_new_tokens=1)
    token_B, logp_B, _ = sampling.sample_with_noise(noise_BxG, log_mix, plain)
    return token_B, logp_B, jnp.zeros(token_B.shape, jnp.float32)

  def draw(self, ctx, inputs, batch):
    rows, sample = rollout.joint_sample_rows(
        ctx.student_graphdef, inputs.params, ctx.teacher_graphdef, inputs.teacher_params, batch,
        inputs.rng, self.sampling, sampling.JointRule(self._noise, self._choose))
    return hooks.Drawn(rows, inputs.state, {}, sample)


class MiniLLMObjective(policy_gradient.PolicyGradient):
  """Single-step term + clipped, length-normalised long-term term (see the module doc)."""
  DEFAULTS = {'clip_range': 0.2, 'length_norm': True}

  def check(self) -> None:
    super().check()
    if not hooks.is_real(self.options['clip_range']) or not self.options['clip_range'] > 0:
      raise self.kwarg_error('clip_range', f'must be > 0, got {self.options["clip_range"]!r}')
    self.boolean('length_norm')

  def loss(self, ctx, params, trainable, scored, drawn, state):
    del trainable, state
    rows = drawn.rows
    log_mix_BxT, log_p_BxT, mask_BxT = scored.log_sample_BxT, scored.log_p_BxT, scored.mask_BxT
    teacher_h, teacher_w = scored.teacher_h, scored.teacher_w
    weights_BxT, normaliser, norm = scored.weights_BxT, scored.normaliser, scored.norm
    student_h, student_w = hooks.model_outputs(ctx.student_graphdef, params, rows)
    log_q_BxT = policy_gradient.target_logprobs(student_h, student_w, rows['targets'],
                                                ctx.chunk_size, ctx.student_softcap)
    w_BxT = jnp.where(mask_BxT > 0, jnp.exp(log_q_BxT - log_mix_BxT), 0.0)
    future_BxT = future_rewards(log_p_BxT - log_q_BxT, mask_BxT, self.options['length_norm'])
    eps = self.options['clip_range']
    clipped = jnp.where(future_BxT >= 0, w_BxT > 1 + eps, w_BxT < 1 - eps)
    # PPO-clip with the ratio at w: where the clipped branch wins, no gradient.
    coef_BxT = jnp.where(clipped, 0.0, future_BxT * w_BxT) * weights_BxT / norm
    long_term = policy_gradient.policy_gradient_loss(ctx, student_h, student_w,
                                                     rows['targets'], coef_BxT)
    single = divergence.weighted_loss(ctx, student_h, student_w, teacher_h, teacher_w,
                                      rows['targets'], w_BxT * weights_BxT / norm, ctx.token_fn)
    pg_value = jnp.maximum(-future_BxT * w_BxT,
                           -future_BxT * jnp.clip(w_BxT, 1 - eps, 1 + eps))
    metrics = {
        'loss': (single * norm + (pg_value * weights_BxT).sum(), normaliser),
        'single_step': (single * norm, normaliser),
        'long_term': ((pg_value * weights_BxT).sum(), normaliser),
        'importance_weight': ((w_BxT * mask_BxT).sum(), mask_BxT.sum()),
        'reward': (((log_p_BxT - log_q_BxT) * mask_BxT).sum(), mask_BxT.sum()),
        'sample_length': scored.sample_length,
        'tokens': (mask_BxT.sum(), jnp.float32(1.0)),
    }
    return single + long_term, metrics


def future_rewards(rewards_BxT, mask_BxT, length_norm: bool):
  """R_{t+1}: the sum (or, length-normalised, the mean) of rewards at masked positions after t."""
  r_BxT = jnp.where(mask_BxT > 0, rewards_BxT, 0.0)
  m_BxT = (mask_BxT > 0).astype(jnp.float32)
  after = lambda x: jnp.flip(jnp.cumsum(jnp.flip(x, 1), axis=1), 1) - x   # Σ over t' > t
  total_BxT = after(r_BxT)
  if not length_norm:
    return total_BxT
  count_BxT = after(m_BxT)
  return jnp.where(count_BxT > 0, total_BxT / jnp.maximum(count_BxT, 1.0), 0.0)

