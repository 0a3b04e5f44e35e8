"""The on-policy objectives' expected gradients, checked against the exact answer.

A problem small enough to enumerate: vocabulary 4, one prompt token, completions of exactly 3
tokens (no EOS: every one of the 4³ = 64 completions is scored), a tiny random student q and
teacher p. For each method the expected gradient E_{y~s}[∇ loss(y)] is an exact sum over the
64 completions weighted by the probability s(y) with which the method's rows hook draws them,
each term computed by the method's own objective hook on that one row (reduction 'sum').
It is compared with the exact gradients of
  sequence-level reverse KL   KL(q‖p) = Σ_y q(y) log q(y)/p(y), all of θ differentiated, and
  per-token reverse KL        Σ_t E_{y<t~q}[KL(q(·|y<t) ‖ p(·|y<t))] with the prefixes'
                              distribution held fixed (no gradient through the sampling).
The two differ by the long-term term E[Σ_t ∇log q(y_t) Σ_{t'>t} log q/p(y_t')].

Findings pinned here (see each test; relative errors ‖g − g*‖/‖g*‖ on this problem):
- GKD λ=1 with reverse KL and on-policy reverse KL (ReverseKLPerToken, per-token reward)
  follow the per-token gradient exactly: unbiased for it, biased for the sequence-level KL
  by the whole long-term term (0.198);
- ReverseKLPerToken with reward_to_go=True follows the sequence-level gradient exactly;
- MiniLLM with no teacher mix and no length normalisation follows the sequence-level gradient
  exactly; its defaults are biased for it (teacher mix 0.2: 0.109, length normalisation:
  0.064, both: 0.128; cosine ≥ 0.99, so still a descent direction).
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distill.algorithms import divergence, hooks, minillm, policy_gradient
from distill.models import get_preset
from distill.models import sharded
from distill.train import config as config_lib
from distill.train import step as step_lib
from tests.test_teacher_cache import random_params

V, N, PROMPT = 4, 3, 1   # vocabulary, completion length, prompt token
PAD = 0
# One small layer: enough for position-dependent conditionals, quick to compile.
MODEL = dict(vocab_size=V, n_layers=1, d_model=16, n_heads=2, n_kv_heads=2, d_ff=32,
             max_seq_len=8)


@pytest.fixture(scope='module')
def problem():
  model_config = get_preset('tiny', **MODEL)
  graphdef = sharded.abstract_model(model_config)[0]
  student = random_params(model_config, seed=0, scale=0.5)
  teacher = random_params(model_config, seed=1, scale=0.5)
  completions = np.array(np.meshgrid(*[np.arange(V)] * N, indexing='ij')).reshape(N, -1).T
  tokens = np.concatenate([np.full((len(completions), 1), PROMPT), completions], axis=1)
  rows = {'tokens': jnp.asarray(tokens, jnp.int32),
          'targets': jnp.asarray(np.concatenate([tokens[:, 1:], np.full((len(tokens), 1), PAD)],
                                                axis=1), jnp.int32),
          'input_mask': jnp.ones(tokens.shape, jnp.int32),
          'loss_mask': jnp.asarray([[1.0] * N + [0.0]] * len(tokens), jnp.float32)}
  return graphdef, student, teacher, rows


def token_logprobs(graphdef, params, rows):
  """log q(y_t | y<t) of each completion token [B, N]."""
  logits = nnx.merge(graphdef, params)(rows['tokens'], rows['input_mask'])[:, PROMPT - 1:-1]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  return jnp.take_along_axis(logp, rows['tokens'][:, PROMPT:, None], -1)[..., 0]


def next_token_logprobs(graphdef, params, rows):
  """log q(· | y<t) over the vocabulary at each completion position [B, N, V]."""
  logits = nnx.merge(graphdef, params)(rows['tokens'], rows['input_mask'])[:, PROMPT - 1:-1]
  return jax.nn.log_softmax(logits.astype(jnp.float32), -1)


def sequence_kl(params, graphdef, teacher, rows):
  log_q = token_logprobs(graphdef, params, rows).sum(1)
  log_p = token_logprobs(graphdef, teacher, rows).sum(1)
  return jnp.sum(jnp.exp(log_q) * (log_q - log_p))


def per_token_kl(params, graphdef, teacher, rows):
  prefix = jax.lax.stop_gradient(jnp.exp(token_logprobs(graphdef, params, rows)))
  # Weight of position t: probability of its prefix y<t (the tokens before t), held fixed.
  weight_BxN = jnp.concatenate([jnp.ones((prefix.shape[0], 1)), jnp.cumprod(prefix, 1)[:, :-1]], 1)
  # Every prefix appears once per continuation: divide by the continuations' count.
  repeats = V ** (N - jnp.arange(N))
  log_q = next_token_logprobs(graphdef, params, rows)
  log_p = next_token_logprobs(graphdef, teacher, rows)
  kl_BxN = jnp.sum(jnp.exp(log_q) * (log_q - log_p), -1)
  return jnp.sum(weight_BxN * kl_BxN / repeats)


def _flat(tree):
  return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def expected_gradient(objective, ctx, graphdef, student, teacher, rows, log_sample_BxN):
  """Σ_y s(y) ∇loss(row y): the objective hook on each row alone, weighted by s(y)."""

  def one_row(row, log_sample_N):
    row = {k: v[None] for k, v in row.items()}
    sample = {'logprobs_BxN': log_sample_N[None], 'mask_BxN': jnp.ones((1, N), jnp.int32)}
    drawn = hooks.Drawn(row, {}, {}, sample)
    prepared = objective.prepare(ctx, teacher, drawn, {})
    return jax.grad(lambda p: objective.loss(ctx, p, None, prepared, drawn, {})[0])(student)

  grads = jax.jit(jax.vmap(one_row))(rows, log_sample_BxN)
  weights = jnp.exp(log_sample_BxN.sum(1))
  assert float(weights.sum()) == pytest.approx(1.0, abs=1e-5)
  return _flat(jax.tree.map(lambda g: jnp.tensordot(weights, g, 1), grads))


def make_objective(cls, divergence_name, options, problem):
  graphdef, _, _, _ = problem
  config = config_lib.base_config()
  config.loss.divergence, config.loss.kd_weight, config.loss.ce_weight = divergence_name, 1.0, 0.0
  config.loss.chunk_size, config.loss.reduction = 0, 'sum'
  model_config = get_preset('tiny', **MODEL)
  # What the step's context reads of a run: the teacher, the same architecture as the student.
  run = types.SimpleNamespace(teacher_graphdef=graphdef, teacher_params={},
                              model_config=model_config, teacher_config=model_config)
  ctx = step_lib.make_context(config, run, graphdef, optimizer=None)
  return cls(config, run, {**cls.DEFAULTS, **options}), ctx


@pytest.fixture(scope='module')
def exact(problem):
  graphdef, student, teacher, rows = problem
  exact_grad = lambda f: _flat(jax.jit(jax.grad(f), static_argnums=1)(student, graphdef, teacher,
                                                                       rows))
  sequence, per_token = exact_grad(sequence_kl), exact_grad(per_token_kl)
  log_q = token_logprobs(graphdef, student, rows)
  return {'sequence': sequence, 'per_token': per_token, 'log_q': log_q,
          'log_p': token_logprobs(graphdef, teacher, rows)}


def relative_error(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_the_exact_gradients_differ_by_a_long_term_term_large_enough_to_see(exact):
  # Otherwise the tests below could not tell the two targets apart.
  assert relative_error(exact['per_token'], exact['sequence']) > 0.1


@pytest.mark.parametrize('name', ['gkd_lambda1_reverse_kl', 'onpolicy_rkl'])
def test_student_sample_methods_follow_the_per_token_gradient(problem, exact, name):
  """GKD λ=1 (reverse KL on the student's samples, no gradient through the sampling) and
  ReverseKLPerToken (reward −log q/p of each token alone) have the per-token gradient as their
  expectation, not the sequence-level KL's: biased for KL(q‖p) over sequences by the whole
  long-term term (the future tokens' rewards); on-policy RKL's reward_to_go=True removes it
  (next test)."""
  graphdef, student, teacher, rows = problem
  if name == 'onpolicy_rkl':
    objective, ctx = make_objective(policy_gradient.ReverseKLPerToken, 'reverse_kl', {}, problem)
  else:
    objective, ctx = make_objective(divergence.Divergence, 'reverse_kl', {}, problem)
  grad = expected_gradient(objective, ctx, graphdef, student, teacher, rows, exact['log_q'])
  assert relative_error(grad, exact['per_token']) < 1e-4
  assert relative_error(grad, exact['sequence']) > 0.1


def test_onpolicy_rkl_with_reward_to_go_follows_the_sequence_gradient(problem, exact):
  """reward_to_go=True: A_t = Σ_{t'≥t} (log p − log q)(y_t'), the unbiased estimate."""
  graphdef, student, teacher, rows = problem
  objective, ctx = make_objective(policy_gradient.ReverseKLPerToken, 'reverse_kl',
                                  {'reward_to_go': True}, problem)
  grad = expected_gradient(objective, ctx, graphdef, student, teacher, rows, exact['log_q'])
  assert relative_error(grad, exact['sequence']) < 1e-4


def _minillm(problem, exact, teacher_mix, length_norm):
  graphdef, student, teacher, rows = problem
  objective, ctx = make_objective(minillm.MiniLLMObjective, 'reverse_kl',
                                  {'length_norm': length_norm}, problem)
  # The rows hook draws each token from α·p + (1−α)·q (temperature 1, no top-k/p).
  log_q, log_p = exact['log_q'], exact['log_p']
  log_mix = (jnp.logaddexp(jnp.log1p(-teacher_mix) + log_q, jnp.log(teacher_mix) + log_p)
             if teacher_mix else log_q)
  return expected_gradient(objective, ctx, graphdef, student, teacher, rows, log_mix)


def test_minillm_without_mix_or_length_norm_follows_the_sequence_gradient(problem, exact):
  """Single-step term (exact per-position KL) + REINFORCE with the future rewards' sum:
  unbiased for the sequence-level reverse KL (the clip never binds: w = 1)."""
  grad = _minillm(problem, exact, teacher_mix=0.0, length_norm=False)
  assert relative_error(grad, exact['sequence']) < 1e-4


@pytest.mark.parametrize('teacher_mix, length_norm', [(0.2, False), (0.0, True), (0.2, True)])
def test_minillm_defaults_are_biased_for_the_sequence_gradient(problem, exact, teacher_mix,
                                                               length_norm):
  """Teacher-mixed sampling with per-token weights w_t = q/p̃ (prefixes stay drawn from the
  mix: an unbiased weight would be Π_{s≤t} w_s) and length-normalised future rewards (the
  mean instead of the sum) each bias the estimate away from ∇KL(q‖p) over sequences; it still
  points downhill (positive cosine). The paper makes the same approximations."""
  grad = _minillm(problem, exact, teacher_mix, length_norm)
  error = relative_error(grad, exact['sequence'])
  exact_grad = exact['sequence']
  cosine = float(grad @ exact_grad / jnp.linalg.norm(grad) / jnp.linalg.norm(exact_grad))
  assert error > 1e-3 and cosine > 0.5, (error, cosine)


def test_minillm_clip_leaves_no_long_term_gradient_where_it_binds(problem, exact):
  """PPO's clip: where the future reward R ≥ 0 and w > 1 + ε, or R < 0 and w < 1 − ε, the
  long-term term gives no gradient. Sample log-probs putting w = e on the tokens with R ≥ 0
  and 1/e on the others make it bind on every token: the gradient is the single-step term's
  alone (with w = 1 it is not). w is q/p̃ (the importance_weight metric's mean)."""
  graphdef, student, teacher, rows = problem
  objective, ctx = make_objective(minillm.MiniLLMObjective, 'reverse_kl', {}, problem)
  row = {k: v[5:6] for k, v in rows.items()}
  log_q, log_p = exact['log_q'][5:6], exact['log_p'][5:6]
  future = minillm.future_rewards(log_p - log_q, jnp.ones((1, N)), True)

  @jax.jit
  def total_and_single_step_gradients(log_sample_1xN):
    sample = {'logprobs_BxN': log_sample_1xN, 'mask_BxN': jnp.ones((1, N), jnp.int32)}
    drawn = hooks.Drawn(row, {}, {}, sample)
    prepared = objective.prepare(ctx, teacher, drawn, {})
    loss = lambda p: objective.loss(ctx, p, None, prepared, drawn, {})
    total = jax.grad(lambda p: loss(p)[0])(student)
    single = jax.grad(lambda p: loss(p)[1]['single_step'][0] / prepared.norm)(student)
    weight_sum, count = loss(student)[1]['importance_weight']
    return _flat(total), _flat(single), weight_sum / count

  w_1xN = jnp.exp(jnp.where(future >= 0, 1.0, -1.0))
  total, single, mean_w = total_and_single_step_gradients(log_q - jnp.log(w_1xN))
  np.testing.assert_allclose(total, single, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(mean_w, w_1xN.mean(), rtol=1e-5)
  total, single, _ = total_and_single_step_gradients(log_q)
  assert relative_error(total, single) > 1e-2
