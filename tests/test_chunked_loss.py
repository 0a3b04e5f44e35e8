"""The chunked loss and the top-k loss equal their plain (full-logits) forms in value and
gradient, and the chunked loss is flat in memory."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

import distill.losses as L
from distill.losses import bench

B, T, D_S, D_T, V = 2, 7, 4, 6, 13   # 14 tokens
_rng = np.random.default_rng(0)
STUDENT_H = jnp.asarray(_rng.normal(size=(B, T, D_S)), jnp.float32)
STUDENT_W = jnp.asarray(_rng.normal(size=(D_S, V)), jnp.float32)
TEACHER_H = jnp.asarray(_rng.normal(size=(B, T, D_T)), jnp.float32)
TEACHER_W = jnp.asarray(_rng.normal(size=(D_T, V)), jnp.float32)
TARGETS = jnp.asarray(_rng.integers(0, V, size=(B, T)), jnp.int32)
# Weights, not just 0/1 (as reductions.token_weights gives for sequence means). The first
# row's first six tokens carry no loss, so with chunks of 3 two whole chunks are skipped;
# masked targets hold an out-of-range id that must not matter.
WEIGHTS = np.ones((B, T), np.float32)
WEIGHTS[0, :6] = 0.0
WEIGHTS[1, 2] = 0.0
WEIGHTS[1, 5] = 0.25
WEIGHTS = jnp.asarray(WEIGHTS)
TARGETS = jnp.where(WEIGHTS > 0, TARGETS, -100)


def value_and_grads(loss, token_fn, **kwargs):
  fn = lambda h, w, th, tw: loss(h, w, th, tw, TARGETS, WEIGHTS, token_fn, **kwargs)[0]
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))(
      STUDENT_H, STUDENT_W, TEACHER_H, TEACHER_W)


def assert_same(chunked, plain):
  (value, grads), (want_value, want_grads) = chunked, plain
  np.testing.assert_allclose(value, want_value, rtol=2e-6, atol=1e-6)
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize('name', L.NAMES)
def test_every_divergence_matches_plain(name):
  token_fn = L.token_objective(name)
  plain = value_and_grads(L.plain_loss, token_fn)
  assert_same(value_and_grads(L.chunked_loss, token_fn, chunk_size=4), plain)
  # The teacher is a constant in both forms.
  assert all(np.all(np.asarray(g) == 0) for g in plain[1][2:])


def test_ce_mix_matches_plain_at_several_chunk_sizes():
  token_fn = L.hinton(alpha=0.7, temperature=2.0)
  plain = value_and_grads(L.plain_loss, token_fn)
  # The plain form is the weighted sum of the objective over full logits.
  direct = jax.jit(lambda: jnp.sum(WEIGHTS * token_fn(
      STUDENT_H @ STUDENT_W, TEACHER_H @ TEACHER_W, jnp.maximum(TARGETS, 0))))()
  np.testing.assert_allclose(plain[0], direct, rtol=1e-6)
  for chunk_size in (1, 5, 64):   # 5 does not divide the 14 tokens, 64 exceeds them
    assert_same(value_and_grads(L.chunked_loss, token_fn, chunk_size=chunk_size), plain)
  count = L.chunked_loss(STUDENT_H, STUDENT_W, TEACHER_H, TEACHER_W, TARGETS, WEIGHTS,
                         token_fn, chunk_size=3)[1]
  assert float(count) == float(jnp.sum(WEIGHTS))


def test_padded_vocabulary_and_no_teacher():
  token_fn = L.token_objective('jsd', ce_weight=0.5)
  kept = 10
  targets = jnp.minimum(TARGETS, kept - 1)
  narrow = jax.jit(jax.value_and_grad(lambda h, w: L.plain_loss(
      h, w, TEACHER_H, TEACHER_W[:, :kept], targets, WEIGHTS, token_fn)[0], argnums=(0, 1)))(
          STUDENT_H, STUDENT_W[:, :kept])
  for loss, kwargs in ((L.plain_loss, {}), (L.chunked_loss, {'chunk_size': 4})):
    value, (dh, dw) = jax.jit(jax.value_and_grad(
        lambda h, w: loss(h, w, TEACHER_H, TEACHER_W, targets, WEIGHTS, token_fn,
                          vocab_size=kept, **kwargs)[0], argnums=(0, 1)))(STUDENT_H, STUDENT_W)
    np.testing.assert_allclose(value, narrow[0], rtol=1e-6)
    np.testing.assert_allclose(dh, narrow[1][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dw[:, :kept], narrow[1][1], rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(dw[:, kept:]) == 0)
  ce = L.token_objective(kd_weight=0.0, ce_weight=1.0)
  plain = jax.jit(jax.value_and_grad(lambda h: L.plain_loss(
      h, STUDENT_W, None, None, TARGETS, WEIGHTS, ce)[0]))(STUDENT_H)
  chunked = jax.jit(jax.value_and_grad(lambda h: L.chunked_loss(
      h, STUDENT_W, None, None, TARGETS, WEIGHTS, ce, chunk_size=5)[0]))(STUDENT_H)
  np.testing.assert_allclose(chunked[0], plain[0], rtol=1e-6)
  np.testing.assert_allclose(chunked[1], plain[1], rtol=1e-5, atol=1e-6)


def test_traced_closure_and_bfloat16():
  # A token_fn closing over a traced value (TAID's t lives in the train state).
  def loss(h, w, t, chunk_size):
    token_fn = L.taid_token_fn(t)
    if chunk_size is None:
      return L.plain_loss(h, w, TEACHER_H, TEACHER_W, TARGETS, WEIGHTS, token_fn)[0]
    return L.chunked_loss(h, w, TEACHER_H, TEACHER_W, TARGETS, WEIGHTS, token_fn,
                          chunk_size=chunk_size)[0]
  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=3)
  plain, chunked = grad(STUDENT_H, STUDENT_W, 0.6, None), grad(STUDENT_H, STUDENT_W, 0.6, 4)
  assert_same(chunked, plain)
  # bf16 activations and weights: gradients come back in bf16, close to the fp32 ones.
  bf16 = [x.astype(jnp.bfloat16) for x in (STUDENT_H, STUDENT_W, TEACHER_H, TEACHER_W)]
  value, grads = jax.jit(jax.value_and_grad(lambda h, w: L.chunked_loss(
      h, w, bf16[2], bf16[3], TARGETS, WEIGHTS, L.token_objective(), chunk_size=4)[0],
      argnums=(0, 1)))(bf16[0], bf16[1])
  want = value_and_grads(L.plain_loss, L.token_objective())
  assert grads[0].dtype == grads[1].dtype == jnp.bfloat16
  np.testing.assert_allclose(value, want[0], rtol=3e-2)
  for got, ref in zip(grads, want[1]):
    assert np.abs(np.asarray(got, np.float32) - ref).max() < 5e-2 * np.abs(ref).max()


def test_value_without_gradient_and_under_a_scaled_cotangent_match_plain():
  """No gradient taken (evaluation) runs the value-only scan; a loss divided by its token
  count sends the backward pass a cotangent other than 1. Both agree with the plain form.
  Chunks of 4 leave a chunk that is partly padding (7 loss-bearing tokens)."""
  args = (TEACHER_H, TEACHER_W, TARGETS, WEIGHTS, L.token_objective('jsd', ce_weight=0.3))

  def value_and_scaled_grads(loss, **kwargs):
    value = jax.jit(lambda: loss(STUDENT_H, STUDENT_W, *args, **kwargs)[0])()
    grads = jax.jit(jax.grad(lambda h, w: 0.37 * loss(h, w, *args, **kwargs)[0], (0, 1)))(
        STUDENT_H, STUDENT_W)
    return value, grads

  assert_same(value_and_scaled_grads(L.chunked_loss, chunk_size=4),
              value_and_scaled_grads(L.plain_loss))


def test_only_chunks_holding_loss_bearing_tokens_are_computed():
  """A block sum that is 1 per call counts the chunks computed: the 7 loss-bearing tokens of
  14 go first, so 2 chunks of 4 run (not 3: loss-bearing tokens last would straddle three),
  with and without a gradient taken."""
  count = lambda h, w, shared, per_token, weights: jnp.sum(h) * 0.0 + 1.0
  scan = lambda h: L.chunk_scan(count, h, STUDENT_W, None, (), WEIGHTS.reshape(-1), 4)
  h = STUDENT_H.reshape(-1, D_S)
  assert float(jax.jit(scan)(h)) == 2
  assert float(jax.jit(jax.value_and_grad(scan))(h)[0]) == 2


K = 4
_teacher_logprobs = jax.nn.log_softmax(jnp.asarray(_rng.normal(size=(B, T, V)) * 3, jnp.float32))
TOPK_LOGPROBS, TOPK_IDS = jax.lax.top_k(_teacher_logprobs, K)


@pytest.mark.parametrize('tail', ['bucket', 'ignore'])
def test_topk_loss_chunked_equals_plain_and_full_logits(tail):
  def token_fn(logits_NxV, ids_NxK, logprobs_NxK, targets_N, mask_N):
    return (0.7 * L.topk_forward_kl(logits_NxV, ids_NxK, logprobs_NxK, mask_N, tail=tail,
                                    temperature=1.5)
            + 0.3 * L.cross_entropy(logits_NxV, targets_N, mask_N))

  def value_and_grads_topk(chunk_size):
    fn = lambda h, w, logprobs: L.topk_loss(h, w, TOPK_IDS, logprobs, TARGETS, WEIGHTS,
                                            token_fn, chunk_size)
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(STUDENT_H, STUDENT_W,
                                                              TOPK_LOGPROBS)

  plain = value_and_grads_topk(0)
  mask = WEIGHTS != 0
  direct = jax.jit(lambda: jnp.sum(WEIGHTS * token_fn(
      STUDENT_H @ STUDENT_W, TOPK_IDS, TOPK_LOGPROBS, jnp.where(mask, TARGETS, 0), mask)))()
  np.testing.assert_allclose(plain[0], direct, rtol=1e-6)
  for chunk_size in (1, 3, 5, 64):
    assert_same(value_and_grads_topk(chunk_size), plain)
  # The teacher's log-probs are constants in both forms.
  assert np.all(np.asarray(plain[1][2]) == 0)


def test_chunked_temp_memory_is_a_fraction_of_plain():
  # 512 tokens in chunks of 64: the working set should shrink roughly by 512 / 64.
  report = bench.memory_report(batch=2, seq=256, hidden=32, vocab=4096, chunk_size=64)
  assert report['temp_ratio'] < 0.2, report


def test_bad_inputs_raise():
  token_fn = L.token_objective()
  args = (STUDENT_H, STUDENT_W, TEACHER_H, TEACHER_W, TARGETS, WEIGHTS, token_fn)
  for chunk_size in (0, -3, 2.5):
    with pytest.raises(ValueError, match='chunk_size'):
      L.chunked_loss(*args, chunk_size=chunk_size)
  with pytest.raises(ValueError, match='vocab_size'):
    L.chunked_loss(*args, vocab_size=V + 1)
  with pytest.raises(ValueError, match='both'):
    L.plain_loss(STUDENT_H, STUDENT_W, None, TEACHER_W, TARGETS, WEIGHTS, token_fn)
  with pytest.raises(ValueError, match='targets'):
    L.chunked_loss(STUDENT_H, STUDENT_W, TEACHER_H, TEACHER_W, TARGETS[:, :3], WEIGHTS, token_fn)
  with pytest.raises(ValueError, match='teacher'):
    L.chunked_loss(STUDENT_H, STUDENT_W, TEACHER_H, TEACHER_W[:, :5], TARGETS, WEIGHTS, token_fn)
