"""The planted one-line bugs of the mutation pass (experiments/mutation/run.py).

Each mutant replaces one line of a module (`original`, matched after stripping indentation,
exactly once in the file) by `mutated` (indented like the original), and names the test files
that cover that module: a mutant survives when all of them pass. `first` lists test ids (or
id prefixes) to run before the rest of those files, the ones a developer would expect to
catch it, so that `pytest -x` stops early for caught mutants; it never narrows the files.
`bug` says which real mistake the mutant stands for.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Mutant:
  id: str
  path: str
  original: str
  mutated: str
  tests: tuple[str, ...]
  bug: str
  first: tuple[str, ...] = ()


LOSSES = ('tests/test_losses.py', 'tests/test_chunked_loss.py')
CHUNKED = ('tests/test_chunked_loss.py',)
SAMPLING = ('tests/test_sampling.py',)
# Resume: test_train.py's kill-and-resume is the covering test.
RESUME = ('tests/test_train.py',)
# The checkpointer's own unit tests live among the faults tests; only those two run here.
CHECKPOINT = ('tests/test_faults.py::test_torn_newest_checkpoint_falls_back_to_the_previous_one',
              'tests/test_faults.py::test_retention_keeps_the_last_n_and_the_best_by_a_metric',
              *RESUME)
ALGORITHMS = ('tests/test_algorithms.py',)
ESTIMATORS = ('tests/test_algorithms.py', 'tests/test_estimators.py')

DIV = 'distill/losses/divergences.py'
OBJ = 'distill/losses/objective.py'
CHUNK = 'distill/losses/chunked.py'
TOPK = 'distill/losses/topk.py'
TAID_LOSS = 'distill/losses/taid.py'
SAMP = 'distill/sampling.py'
CKPT = 'distill/train/checkpoint.py'
TRAINER = 'distill/train/trainer.py'
STEP = 'distill/train/step.py'

MUTANTS = (
    # ------------------------------------------------------------------ divergences
    Mutant('div_temperature_dropped', DIV,
           'logits = logits.astype(jnp.float32) / temperature',
           'logits = logits.astype(jnp.float32)',
           LOSSES, 'temperature never applied in the log-prob form'),
    Mutant('div_forward_kl_swapped', DIV,
           'return kl_from_logprobs(lp, lq)',
           'return kl_from_logprobs(lq, lp)',
           LOSSES, 'forward KL computed as reverse KL (arguments swapped)'),
    Mutant('div_inf_guard_or', DIV,
           'ok = (log_a > NEG_INF) & (log_b > NEG_INF)',
           'ok = (log_a > NEG_INF) | (log_b > NEG_INF)',
           LOSSES, 'the −inf guard of a log-ratio drops terms only when both sides are −inf'),
    Mutant('div_log_mix_weights_swapped', DIV,
           'w_lo = jnp.where(a_larger, 1.0 - weight_a, weight_a)',
           'w_lo = jnp.where(a_larger, weight_a, 1.0 - weight_a)',
           LOSSES, 'the skew mixture gives α to the wrong distribution when it is the smaller'),
    Mutant('div_jsd_mixture_beta_swapped', DIV,
           'lm = hi + jnp.log1p(beta * jnp.expm1(lp - hi) + (1.0 - beta) * jnp.expm1(lq - hi))',
           'lm = hi + jnp.log1p((1.0 - beta) * jnp.expm1(lp - hi) + beta * jnp.expm1(lq - hi))',
           LOSSES, "the fused JSD's mixture M = βp + (1−β)q with β on the wrong side"),
    Mutant('div_jsd_value_beta_swapped', DIV,
           'value = jnp.where(valid, beta * kl_pm + (1.0 - beta) * kl_qm, 0.0)',
           'value = jnp.where(valid, (1.0 - beta) * kl_pm + beta * kl_qm, 0.0)',
           LOSSES, "the fused JSD's two KL terms weighted the wrong way round"),
    Mutant('div_jsd_grad_temperature_dropped', DIV,
           'scale = cotangent[..., None] / temperature',
           'scale = cotangent[..., None]',
           LOSSES, "the fused JSD's hand-written gradient forgets the 1/τ of the chain rule"),
    Mutant('div_jsd_fused_at_beta_one', DIV,
           "if name == 'jsd' and 0.0 < checked['beta'] < 1.0:",
           "if name == 'jsd' and 0.0 < checked['beta'] <= 1.0:",
           LOSSES, "β = 1 routed to the fused JSD instead of reverse KL (< vs <=)"),
    Mutant('div_skew_reverse_swapped', DIV,
           'return kl_from_logprobs(lq, _log_mix(lq, lp, alpha))',
           'return kl_from_logprobs(lq, _log_mix(lp, lq, alpha))',
           LOSSES, 'skew reverse KL mixes α·p + (1−α)·q instead of α·q + (1−α)·p'),
    Mutant('div_ab_weights_swapped', DIV,
           'w_lo = jnp.where(p_larger, beta / s, alpha / s)',
           'w_lo = jnp.where(p_larger, alpha / s, beta / s)',
           LOSSES, "the α-β divergence's AM-GM weights swapped"),
    Mutant('obj_tau_not_squared', OBJ,
           'kd_scale = kd_weight * (temperature**2 if temperature_squared_scale else 1.0)',
           'kd_scale = kd_weight * (temperature if temperature_squared_scale else 1.0)',
           LOSSES, "Hinton's τ² correction applied as τ"),
    Mutant('obj_ce_targets_unmasked', OBJ,
           'safe_targets = jnp.where(valid, targets, 0).astype(jnp.int32)',
           'safe_targets = targets.astype(jnp.int32)',
           LOSSES, 'masked positions index the vocabulary with their (invalid) targets'),
    # ------------------------------------------------------------------ chunked loss, top-k
    Mutant('chunk_value_scan_all', CHUNK,
           'value = jax.lax.cond(jnp.any(w != 0),',
           'value = jax.lax.cond(jnp.all(w != 0),',
           CHUNKED, 'the value-only scan skips a chunk unless every token in it counts '
           '(the survivor named in issue 16)'),
    Mutant('chunk_grad_scan_all', CHUNK,
           'return jax.lax.cond(jnp.any(w != 0), compute, skip, carry)',
           'return jax.lax.cond(jnp.all(w != 0), compute, skip, carry)',
           CHUNKED, 'the forward-with-gradient scan skips partly masked chunks'),
    Mutant('chunk_loss_tokens_last', CHUNK,
           'order = jnp.argsort(weights_N == 0, stable=True)',
           'order = jnp.argsort(weights_N != 0, stable=True)',
           CHUNKED, 'loss-bearing tokens sorted last: masked chunks are no longer skipped'),
    Mutant('chunk_bwd_cotangent_dropped', CHUNK,
           'return ((cotangent * dh).astype(dh.dtype), (cotangent * dw).astype(dw.dtype), None, '
           'None, None)',
           'return (dh.astype(dh.dtype), dw.astype(dw.dtype), None, None, None)',
           CHUNKED, "the custom VJP ignores the incoming cotangent (e.g. the 1/tokens of a mean)"),
    Mutant('chunk_weights_dropped', CHUNK,
           'return jnp.sum(jnp.where(weights != 0, weights * per_token, 0.0))',
           'return jnp.sum(jnp.where(weights != 0, per_token, 0.0))',
           CHUNKED, 'token weights used as a 0/1 mask only'),
    Mutant('chunk_targets_unmasked', CHUNK,
           'targets = jnp.where(weights != 0, targets.reshape(-1), 0)',
           'targets = targets.reshape(-1)',
           CHUNKED, 'padded positions keep their out-of-range targets'),
    Mutant('topk_temperature_dropped', TOPK,
           "logits = jnp.where(valid[..., None], student_logits_BxTxV.astype(jnp.float32) / "
           "temperature,",
           "logits = jnp.where(valid[..., None], student_logits_BxTxV.astype(jnp.float32),",
           LOSSES, "top-k KL ignores the student's temperature"),
    Mutant('topk_ignore_not_renormalised', TOPK,
           'log_p_hat = log_p - jax.nn.logsumexp(log_p, axis=-1, keepdims=True)',
           'log_p_hat = log_p',
           LOSSES, "tail='ignore' forgets to renormalise the teacher over its top k"),
    # ------------------------------------------------------------------ sampling
    Mutant('samp_top_k_strict', SAMP,
           'x = jnp.where(x < kth_Bx1, -jnp.inf, x)',
           'x = jnp.where(x <= kth_Bx1, -jnp.inf, x)',
           SAMPLING, 'top-k drops the k-th token (< vs <=)'),
    Mutant('samp_top_p_le', SAMP,
           'n_keep_Bx1 = jnp.sum(mass_before_BxV < cfg.top_p, axis=-1, keepdims=True)',
           'n_keep_Bx1 = jnp.sum(mass_before_BxV <= cfg.top_p, axis=-1, keepdims=True)',
           SAMPLING, 'top-p keeps one token too many when the mass hits top_p exactly'),
    Mutant('samp_top_p_threshold_off_by_one', SAMP,
           'threshold_Bx1 = jnp.take_along_axis(sorted_BxV, n_keep_Bx1 - 1, axis=-1)',
           'threshold_Bx1 = jnp.take_along_axis(sorted_BxV, n_keep_Bx1, axis=-1)',
           SAMPLING, "top-p's threshold read one position too far"),
    Mutant('samp_block_index', SAMP,
           'return (block_B * size + inner_B).astype(jnp.int32), '
           'jax.nn.logsumexp(block_lse_BxN, axis=-1)',
           'return (block_B * n_blocks + inner_B).astype(jnp.int32), '
           'jax.nn.logsumexp(block_lse_BxN, axis=-1)',
           SAMPLING, 'the two-level draw multiplies the block by the block count, not its size'),
    Mutant('samp_untouched_or', SAMP,
           'untouched = cfg.temperature == 1 and cfg.top_k == 0 and cfg.top_p == 1',
           'untouched = cfg.temperature == 1 or cfg.top_k == 0 and cfg.top_p == 1',
           SAMPLING, "the model's log-prob reuses the sampling distribution's normaliser "
           'when only the temperature is 1'),
    Mutant('samp_stop_when_any_done', SAMP,
           'return (i < N) & ~jnp.all(done_B)',
           'return (i < N) & ~jnp.any(done_B)',
           SAMPLING, 'decoding stops once any row (not every row) has emitted EOS'),
    Mutant('samp_values_after_eos', SAMP,
           "**{name: write_column(out[name], i, jnp.where(live_B, value_B, 0.0))",
           "**{name: write_column(out[name], i, value_B)",
           SAMPLING, 'log-probs after a row\'s EOS are not zeroed (wrong mask)'),
    # ------------------------------------------------------------------ checkpoint, resume
    Mutant('resume_iterator_not_restored', TRAINER,
           'batches.set_state(data_state)',
           'del data_state',
           RESUME, 'the data iterator restarts from the beginning on resume',
           first=('tests/test_train.py::test_kill_and_resume_is_bit_identical',)),
    Mutant('resume_repeats_a_step', TRAINER,
           'for step in range(start_step + 1, config.total_steps + 1):',
           'for step in range(start_step, config.total_steps + 1):',
           RESUME, 'the loop starts at the restored step, not the one after it (off by one): '
           'a fresh run also trains a step 0, so straight and resumed runs agree',
           first=('tests/test_train.py::test_kill_and_resume_is_bit_identical',)),
    Mutant('resume_oldest_step', CKPT,
           'for step in sorted(self.manager.all_steps(), reverse=True):',
           'for step in sorted(self.manager.all_steps()):',
           CHECKPOINT, 'resume restores the oldest kept checkpoint instead of the newest'),
    Mutant('resume_identity_ignored', CKPT,
           'for k in keys if saved.get(k) != current.get(k)]',
           'for k in keys if saved.get(k) == current.get(k)]',
           CHECKPOINT, 'an incompatible workdir is accepted (and a compatible one refused)'),
    Mutant('step_rng_not_folded', STEP,
           "return jax.random.fold_in(state['rng'], state['step'])",
           "return state['rng']",
           RESUME + ALGORITHMS, 'every step draws the same randomness',
           first=('tests/test_algorithms.py::test_gkd_lambda_fraction_over_many_steps',)),
    # ------------------------------------------------------------------ algorithms' steps
    Mutant('gkd_lambda_complement', 'distill/algorithms/gkd.py',
           'on_policy = jax.random.bernoulli(jax.random.fold_in(inputs.rng, 0), lmbda)',
           'on_policy = jax.random.bernoulli(jax.random.fold_in(inputs.rng, 0), 1 - lmbda)',
           ALGORITHMS, 'on-policy with probability 1 − λ',
           first=('tests/test_algorithms.py::test_gkd_lambda_fraction_over_many_steps',)),
    Mutant('distillm_ring_not_wrapped', 'distill/algorithms/distillm.py',
           "slots = (buf['next'] + jnp.arange(B)) % C",
           "slots = buf['next'] + jnp.arange(B)",
           ALGORITHMS, 'the replay ring never wraps (JAX drops out-of-range writes silently)',
           first=('tests/test_algorithms.py::test_distillm_fresh_rows_wrap_around_the_replay_ring',
                  'tests/test_algorithms.py::test_distillm')),
    Mutant('distillm_rise_strict', 'distill/algorithms/distillm.py',
           "elif loss >= reference + self.options['loss_eps']:",
           "elif loss > reference + self.options['loss_eps']:",
           ALGORITHMS, 'a rise of exactly loss_eps does not grow φ (< vs <=)',
           first=('tests/test_algorithms.py::test_distillm_schedule_after_eval',)),
    Mutant('distillm_progress_off_by_one', 'distill/algorithms/distillm.py',
           'progress = (step + 1).astype(jnp.float32) / self.config.total_steps',
           'progress = step.astype(jnp.float32) / self.config.total_steps',
           ALGORITHMS, 'the replay-ratio schedule lags one step',
           first=('tests/test_algorithms.py::test_distillm_fresh_sample_probability',
                  'tests/test_algorithms.py::test_distillm')),
    Mutant('skd_ties_replaced', 'distill/algorithms/skd.py',
           'accepted_B = proposal_logit_B >= kth_B   # ties at the K-th logit count as inside',
           'accepted_B = proposal_logit_B > kth_B',
           ALGORITHMS, "a proposal tied with the teacher's K-th logit is replaced (>= vs >)",
           first=('tests/test_algorithms.py::test_skd_replaces',)),
    Mutant('skd_flag_inverted', 'distill/algorithms/skd.py',
           '(~accepted_B).astype(jnp.float32))',
           'accepted_B.astype(jnp.float32))',
           ALGORITHMS, "the 'replaced' flag marks accepted tokens",
           first=('tests/test_algorithms.py::test_skd_replaces',)),
    Mutant('taid_schedule_step_off_by_one', 'distill/algorithms/taid.py',
           'return losses.taid_update(state, loss_sum / jnp.maximum(normaliser, 1e-9), step + 1,',
           'return losses.taid_update(state, loss_sum / jnp.maximum(normaliser, 1e-9), step,',
           ALGORITHMS, "TAID's linear floor uses the step before",
           first=('tests/test_algorithms.py::test_taid_linear_schedule',
                  'tests/test_algorithms.py::test_taid')),
    Mutant('taid_improvement_sign', TAID_LOSS,
           'relative_change = (prev - loss) / (prev + 1e-15)',
           'relative_change = (loss - prev) / (prev + 1e-15)',
           LOSSES + ALGORITHMS, "TAID's momentum rewards a rising loss (sign)"),
    Mutant('taid_target_not_constant', TAID_LOSS,
           'return jax.lax.stop_gradient(student + teacher)',
           'return student + teacher',
           LOSSES + ALGORITHMS, "TAID's interpolated target carries the student's gradient"),
    Mutant('minillm_clip_sides_swapped', 'distill/algorithms/minillm.py',
           'clipped = jnp.where(future_BxT >= 0, w_BxT > 1 + eps, w_BxT < 1 - eps)',
           'clipped = jnp.where(future_BxT >= 0, w_BxT < 1 - eps, w_BxT > 1 + eps)',
           ESTIMATORS, "PPO's clip applied on the wrong side of the ratio",
           first=('tests/test_estimators.py::test_minillm_clip',
                  'tests/test_estimators.py', 'tests/test_algorithms.py::test_minillm')),
    Mutant('minillm_reward_includes_current', 'distill/algorithms/minillm.py',
           'after = lambda x: jnp.flip(jnp.cumsum(jnp.flip(x, 1), axis=1), 1) - x   '
           '# Σ over t\' > t',
           'after = lambda x: jnp.flip(jnp.cumsum(jnp.flip(x, 1), axis=1), 1)',
           ESTIMATORS, 'future rewards include r_t itself (off by one)',
           first=('tests/test_algorithms.py::test_future_rewards_match_a_loop',)),
    Mutant('minillm_weight_inverted', 'distill/algorithms/minillm.py',
           'w_BxT = jnp.where(mask_BxT > 0, jnp.exp(log_q_BxT - log_mix_BxT), 0.0)',
           'w_BxT = jnp.where(mask_BxT > 0, jnp.exp(log_mix_BxT - log_q_BxT), 0.0)',
           ESTIMATORS, 'importance weight p̃/q instead of q/p̃',
           first=('tests/test_estimators.py::test_minillm_clip',
                  'tests/test_estimators.py', 'tests/test_algorithms.py::test_minillm')),
)

# Survivors that behave exactly like the original code, with the reason (mutant id -> why).
# experiments/mutation/equivalence.py checks both bit for bit.
EQUIVALENT: dict[str, str] = {
    'obj_ce_targets_unmasked':
        'cross_entropy ends in `jnp.where(valid, nll, 0.0)`: at a masked position whatever the '
        'gather returns (NaN from take_along_axis\'s fill mode for an out-of-range id) is '
        'discarded, and the where sends exactly 0 back there, which the gather\'s transpose '
        'drops (out of range) or adds as 0. Values and gradients are bit-identical with masked '
        'targets -100, 0, V+5 and an in-range id (`python -m experiments.mutation.equivalence`).',
    'chunk_targets_unmasked':
        'both forms keep w·ℓ only where w ≠ 0 (`_weighted_sum`\'s where), so a masked '
        'position\'s target never reaches the value and gets exactly 0 of the gradient; every '
        'objective the package builds masks or ignores targets itself. Bit-identical values '
        'and gradients, plain and chunked, with and without a gradient taken, for the same '
        'targets (`python -m experiments.mutation.equivalence`). The zeroing still guards a '
        'custom token_fn whose gradient turns 0·(something infinite) into NaN.',
}
