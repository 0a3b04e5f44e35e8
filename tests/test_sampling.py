"""Sampling: greedy = argmax of the full forward, exact sampling distributions and their
frequencies, EOS, no recompilation, input validation, joint student-teacher decoding, and the
training-batch layout."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

from distill import sampling
from distill.sampling import (SamplingConfig, make_generate_fn, sample_from_logits, sampling_logits,
                              training_batch, validate_sampling)
from test_model import TINY, jitted, make_model

V, P, N = TINY['vocab_size'], 6, 5
PAD = 0
PROMPT_A, PROMPT_B = [11, 3, 25], [1, 2, 3, 30, 8]

_compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, *_, **__: _compiles.append(event)
    if event == '/jax/core/compile/backend_compile_duration' else None)


def left_pad(rows):
  """Left-pads lists of token ids to P; returns (tokens, mask) int32 arrays."""
  tokens, mask = np.full((len(rows), P), PAD, np.int32), np.zeros((len(rows), P), np.int32)
  for r, row in enumerate(rows):
    if row:
      tokens[r, P - len(row):], mask[r, P - len(row):] = row, 1
  return jnp.asarray(tokens), jnp.asarray(mask)


def reference_probs(logits_V, temperature, top_k=0, top_p=1.0):
  """Sampling distribution in float64: softmax(logits / T), top-k, then nucleus, renormalised."""
  z = np.asarray(logits_V, np.float64) / temperature
  probs = np.exp(z - z.max())
  probs /= probs.sum()
  if top_k:
    probs[np.argsort(-probs)[top_k:]] = 0
    probs /= probs.sum()
  if top_p < 1:
    order = np.argsort(-probs)
    n_keep = np.searchsorted(np.cumsum(probs[order]), top_p) + 1  # shortest prefix reaching top_p
    probs[order[n_keep:]] = 0
    probs /= probs.sum()
  return probs


def full_forward_logits(model, prompt, prompt_mask, out):
  """Logits [B, N, V] that predict each generated token, from one full forward pass."""
  tokens = jnp.concatenate([prompt, out['tokens_BxN']], 1)
  mask = jnp.concatenate([prompt_mask, out['mask_BxN']], 1)
  return np.asarray(jitted(model)(tokens, mask))[:, P - 1:-1]


def token_logprobs(logp_BxNxV, tokens_BxN):
  return np.take_along_axis(logp_BxNxV, tokens_BxN[..., None], -1)[..., 0]


def chi_square_p_value(samples, probs):
  """p-value of `samples` (ids) against `probs`; bins expected below 5 are pooled."""
  expected = probs * len(samples)
  counts = np.bincount(samples, minlength=len(probs))
  assert counts[expected == 0].sum() == 0, 'sampled a token of probability 0'
  big = expected >= 5
  f_obs = np.append(counts[big], counts[~big].sum())
  f_exp = np.append(expected[big], expected[~big].sum())
  return scipy.stats.chisquare(f_obs[f_exp > 0], f_exp[f_exp > 0]).pvalue


@pytest.fixture(scope='module')
def model():
  return make_model(seed=3)


@pytest.fixture(scope='module')
def greedy(model):
  """Reference greedy continuations, by step-by-step argmax of the full forward pass, of a
  batch whose row 3 is all padding; and an EOS id that row 0 emits first at a step >= 1."""
  prompt, mask = left_pad([PROMPT_A, PROMPT_B, [7, 7], []])
  tokens = np.zeros((4, N), np.int32)
  for i in range(N):   # right-padded to a fixed shape: one compilation for all steps
    out = {'tokens_BxN': jnp.asarray(tokens),
           'mask_BxN': jnp.asarray(np.arange(N)[None].repeat(4, 0) < i, jnp.int32)}
    tokens[:, i] = full_forward_logits(model, prompt, mask, out)[:, i].argmax(-1)
  first_at = {}
  for i, tok in enumerate(tokens[0]):
    first_at.setdefault(int(tok), i)
  eos = max(first_at, key=first_at.get)
  assert first_at[eos] >= 1, 'the random model repeats one token; pick another seed'
  graphdef, _ = nnx.split(model)
  fn = make_generate_fn(graphdef, SamplingConfig(N, temperature=0.0, eos_id=eos, pad_id=PAD))
  return fn, prompt, mask, tokens, eos


def test_greedy_equals_argmax_of_full_forward_and_eos_stops_rows(model, greedy):
  fn, prompt, mask, reference, eos = greedy
  _, params = nnx.split(model)
  out = jax.tree.map(np.asarray, fn(params, prompt, mask, jax.random.key(0)))
  assert out['tokens_BxN'].shape == (4, N) and out['tokens_BxN'].dtype == np.int32
  for r in range(3):
    hits = np.flatnonzero(reference[r] == eos)
    stop = hits[0] + 1 if len(hits) else N   # tokens up to and including EOS
    np.testing.assert_array_equal(out['tokens_BxN'][r, :stop], reference[r, :stop])
    np.testing.assert_array_equal(out['tokens_BxN'][r, stop:], PAD)
    np.testing.assert_array_equal(out['mask_BxN'][r], np.arange(N) < stop)
    np.testing.assert_array_equal(out['model_logprobs_BxN'][r, stop:], 0.0)
  assert 1 < out['mask_BxN'][0].sum() < N
  np.testing.assert_array_equal(out['mask_BxN'][3], 0)   # an all-padding prompt generates nothing
  np.testing.assert_array_equal(out['tokens_BxN'][3], PAD)
  np.testing.assert_array_equal(out['logprobs_BxN'], 0.0)   # greedy is deterministic
  logits = full_forward_logits(model, prompt, mask, out)
  valid = out['mask_BxN'] > 0
  np.testing.assert_allclose(
      out['model_logprobs_BxN'][valid],
      token_logprobs(jax.nn.log_softmax(logits), out['tokens_BxN'])[valid], atol=1e-5)


def test_every_row_stops_early(model, greedy):
  """All rows emit EOS before max_new_tokens, so the loop ends early; shapes stay fixed."""
  fn, _, _, reference, eos = greedy
  _, params = nnx.split(model)
  prompt, mask = left_pad([PROMPT_A] * 4)
  stop = np.flatnonzero(reference[0] == eos)[0] + 1
  out = jax.tree.map(np.asarray, fn(params, prompt, mask, jax.random.key(0)))
  np.testing.assert_array_equal(out['mask_BxN'], np.broadcast_to(np.arange(N) < stop, (4, N)))
  np.testing.assert_array_equal(out['tokens_BxN'][:, :stop], reference[[0] * 4, :stop])
  np.testing.assert_array_equal(out['tokens_BxN'][:, stop:], PAD)


def test_no_recompilation_across_calls(model, greedy):
  fn, prompt, mask, _, _ = greedy
  _, params = nnx.split(model)
  fn(params, prompt, mask, jax.random.key(0))   # compiled here at the latest
  new_params = jax.tree.map(lambda x: x * 1.5, params)
  new_prompt, new_mask = left_pad([PROMPT_B, PROMPT_A, [], [9]])
  rng1, rng2 = jax.random.key(1), jax.random.key(2)
  del _compiles[:]
  out1 = fn(new_params, new_prompt, new_mask, rng1)
  out2 = fn(params, prompt, mask, rng2)
  assert _compiles == []
  assert not np.array_equal(out1['tokens_BxN'], out2['tokens_BxN'])


# (top-k and top-p alone are checked exactly, without sampling, in the sampling_logits test.)
@pytest.mark.parametrize('temperature, top_k, top_p', [(0.8, 0, 1.0), (1.1, 6, 0.7)])
def test_sample_from_logits_frequencies(temperature, top_k, top_p):
  """Many draws from one row of logits follow the reference distribution (chi-square), and the
  reported log-probs are exact."""
  n = 20_000
  logits_V = np.asarray(jax.random.normal(jax.random.key(7), (V,))) * 1.5
  cfg = SamplingConfig(1, temperature=temperature, top_k=top_k, top_p=top_p)
  tokens, logp, model_logp = map(np.asarray, jax.jit(
      lambda rng, logits: sample_from_logits(rng, logits, cfg))(
          jax.random.key(8), jnp.broadcast_to(logits_V, (n, V))))
  probs = reference_probs(logits_V, temperature, top_k, top_p)
  assert chi_square_p_value(tokens, probs) > 1e-3
  np.testing.assert_allclose(logp, np.log(probs[tokens]), atol=1e-5)
  np.testing.assert_allclose(model_logp, jax.nn.log_softmax(logits_V)[tokens], atol=1e-5)


def test_generate_samples_the_configured_distribution(model):
  """Through the whole decode loop: log-probs at every step equal the reference distribution of
  the full forward pass, and first-token frequencies over many rows follow it."""
  temperature, top_k, top_p = 1.3, 12, 0.8
  cfg = SamplingConfig(N, temperature=temperature, top_k=top_k, top_p=top_p)
  graphdef, params = nnx.split(model)
  n_per_prompt = 2000
  prompt, mask = left_pad([PROMPT_A, PROMPT_B] * n_per_prompt)
  out = make_generate_fn(graphdef, cfg)(params, prompt, mask, jax.random.key(4))
  out = jax.tree.map(np.asarray, out)
  np.testing.assert_array_equal(out['mask_BxN'], 1)

  k = 32
  logits = full_forward_logits(model, prompt[:k], mask[:k], jax.tree.map(lambda x: x[:k], out))
  ref = np.stack([[reference_probs(logits[b, i], temperature, top_k, top_p) for i in range(N)]
                  for b in range(k)])
  tokens = out['tokens_BxN'][:k]
  assert (token_logprobs(ref, tokens) > 0).all(), 'sampled a token outside the kept set'
  np.testing.assert_allclose(out['logprobs_BxN'][:k], np.log(token_logprobs(ref, tokens)),
                             atol=1e-4)
  np.testing.assert_allclose(out['model_logprobs_BxN'][:k],
                             token_logprobs(jax.nn.log_softmax(logits), tokens), atol=1e-5)
  for row in (0, 1):
    assert chi_square_p_value(out['tokens_BxN'][row::2, 0], ref[row, 0]) > 1e-3


@pytest.mark.parametrize('top_k, top_p', [(5, 1.0), (0, 0.5), (4, 0.9), (0, 1e-6), (V + 3, 1.0)])
def test_sampling_logits_match_reference(top_k, top_p):
  logits = jax.random.normal(jax.random.key(top_k), (3, V)) * 2
  cfg = SamplingConfig(1, temperature=0.7, top_k=top_k, top_p=top_p)
  got = np.exp(jax.nn.log_softmax(sampling_logits(logits, cfg)))
  want = np.stack([reference_probs(row, 0.7, top_k, top_p) for row in logits])
  np.testing.assert_allclose(got, want, atol=1e-6)
  if top_p == 1e-6:   # a vanishing nucleus keeps just the most likely token
    np.testing.assert_array_equal((got > 0).sum(-1), 1)
    np.testing.assert_array_equal(got.argmax(-1), logits.argmax(-1))


def test_top_p_drops_a_token_whose_predecessors_reach_it_exactly():
  """A token is kept while its predecessors' mass is still short of top_p, strictly: with
  top_p equal to the mass before the second token (as float32 computes it), only the first
  token is kept."""
  logits = jnp.array([[2.0, 0.5, -1.0]])
  probs = jax.nn.softmax(logits, axis=-1)    # already sorted; temperature 1
  top_p = float((jnp.cumsum(probs, axis=-1) - probs)[0, 1])
  kept = np.isfinite(sampling_logits(logits, SamplingConfig(1, top_p=top_p)))
  np.testing.assert_array_equal(kept, [[True, False, False]])

def test_every_id_of_a_vocabulary_of_several_blocks_is_drawn_where_it_is():
  """The draw picks a block of ids, then an id inside it; the tiny model's V = 37 is a single
  block. V = 50 is 5 blocks of 10: with one finite logit per row, row i must draw id i."""
  assert sampling._blocks(50) == (5, 10)
  logits_VxV = jnp.where(jnp.eye(50, dtype=bool), 0.0, -jnp.inf)
  tokens, logp, model_logp = jax.jit(lambda rng: sample_from_logits(
      rng, logits_VxV, SamplingConfig(1)))(jax.random.key(3))
  np.testing.assert_array_equal(tokens, np.arange(50))
  np.testing.assert_array_equal(logp, 0.0)
  np.testing.assert_array_equal(model_logp, 0.0)


BAD = [
    (dict(max_new_tokens=0), 'max_new_tokens'),
    (dict(max_new_tokens=TINY['max_seq_len']), 'max_seq_len'),
    (dict(temperature=-0.5), 'temperature'),
    (dict(temperature=float('nan')), 'temperature'),
    (dict(top_k=-1), 'top_k'),
    (dict(top_k=2.5), 'top_k'),
    (dict(top_p=0.0), 'top_p'),
    (dict(top_p=1.5), 'top_p'),
    (dict(eos_id=V), 'eos_id'),
    (dict(eos_id=-1), 'eos_id'),
    (dict(pad_id=V + 1), 'pad_id'),
]


@pytest.mark.parametrize('overrides, field', BAD)
def test_bad_sampling_params_raise_before_compilation(model, overrides, field):
  cfg = dataclasses.replace(SamplingConfig(N), **overrides)
  with pytest.raises(ValueError, match=field):
    validate_sampling(cfg, model.config, P)
  graphdef, params = nnx.split(model)
  prompt, mask = left_pad([PROMPT_A])
  rng = jax.random.key(0)
  del _compiles[:]
  with pytest.raises(ValueError, match=field):
    make_generate_fn(graphdef, cfg)(params, prompt, mask, rng)
  assert _compiles == []


@pytest.mark.parametrize('follow', ['student', 'teacher'])
def test_joint_generate_with_one_models_draw_is_generate(model, follow):
  """A rule that takes one model's sample, from the noise generate would draw, reproduces
  generate of that model bit for bit: both caches consume the chosen tokens, step i's noise
  comes from step i's key, EOS stops rows the same way."""
  cfg = SamplingConfig(N, temperature=1.3, top_k=20, eos_id=4, pad_id=PAD)
  student_graph, student_params = nnx.split(model)
  teacher_graph, teacher_params = nnx.split(make_model(seed=5, n_layers=1))
  followed = 0 if follow == 'student' else 1

  def noise(key, B, V):
    return sampling.gumbel_noise(key, (B,), V)

  def choose(noise_BxG, student_logits_BxV, teacher_logits_BxV):
    logits_BxV = (student_logits_BxV, teacher_logits_BxV)[followed]
    token_B, logp_B, _ = sampling.sample_with_noise(noise_BxG, logits_BxV, cfg)
    return token_B, logp_B, jnp.full(token_B.shape, followed, jnp.float32)

  prompt, mask = left_pad([PROMPT_A, PROMPT_B, [], [7, 7]] * 4)

  @jax.jit
  def both(student_params, teacher_params, rng):
    joint = sampling.joint_generate(student_graph, student_params, teacher_graph,
                                    teacher_params, prompt, mask, rng, cfg,
                                    sampling.JointRule(noise, choose))
    graph, params = ((student_graph, student_params), (teacher_graph, teacher_params))[followed]
    return joint, sampling.generate(graph, params, prompt, mask, rng, cfg)

  joint, alone = jax.tree.map(np.asarray, both(student_params, teacher_params,
                                               jax.random.key(3)))
  for key in ('tokens_BxN', 'mask_BxN', 'logprobs_BxN'):
    np.testing.assert_array_equal(joint[key], alone[key])
  np.testing.assert_array_equal(joint['flags_BxN'], followed * alone['mask_BxN'])
  np.testing.assert_array_equal(alone['mask_BxN'][2::4], 0)   # the padding rows
  assert 0 < alone['mask_BxN'].sum() < alone['mask_BxN'].size   # some rows stopped at EOS


def test_training_batch_layout():
  prompt = jnp.asarray([[0, 0, 5, 6], [7, 8, 9, 10]])
  prompt_mask = jnp.asarray([[0, 0, 1, 1], [1, 1, 1, 1]])
  sample = {'tokens_BxN': jnp.asarray([[21, 22, 2, 0], [23, 24, 25, 26]]),
            'mask_BxN': jnp.asarray([[1, 1, 1, 0], [1, 1, 1, 1]])}
  batch = jax.tree.map(np.asarray, training_batch(prompt, prompt_mask, sample, pad_id=0))
  np.testing.assert_array_equal(batch['tokens'], [[0, 0, 5, 6, 21, 22, 2, 0],
                                                  [7, 8, 9, 10, 23, 24, 25, 26]])
  np.testing.assert_array_equal(batch['targets'], [[0, 5, 6, 21, 22, 2, 0, 0],
                                                   [8, 9, 10, 23, 24, 25, 26, 0]])
  np.testing.assert_array_equal(batch['input_mask'], [[0, 0, 1, 1, 1, 1, 1, 0],
                                                      [1, 1, 1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(batch['loss_mask'], [[0, 0, 0, 1, 1, 1, 0, 0],
                                                     [0, 0, 0, 1, 1, 1, 1, 0]])
  assert batch['tokens'].dtype == batch['targets'].dtype == batch['input_mask'].dtype == np.int32
  assert batch['loss_mask'].dtype == np.float32
