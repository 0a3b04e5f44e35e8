"""Divergences, reductions, objectives, TAID, top-k and hidden-state losses against float64
NumPy references of the published formulas."""
import functools

import numpy as np
import pytest
import jax

import distill.losses as L

# (name, hparams) covering every divergence and the ABKD limit branches.
CASES = [
    ('forward_kl', {}), ('reverse_kl', {}),
    ('jsd', {'beta': 0.5}), ('jsd', {'beta': 0.1}), ('jsd', {'beta': 0.9, 'endpoints': 'jsd'}),
    ('tvd', {}),
    ('skew_forward_kl', {'alpha': 0.1}), ('skew_reverse_kl', {'alpha': 0.3}),
    ('ab', {'alpha': 0.5, 'beta': 0.5}), ('ab', {'alpha': 0.3, 'beta': 1.2}),
    ('ab', {'alpha': 0.7, 'beta': 0.0}), ('ab', {'alpha': 0.0, 'beta': 0.4}),
    ('ab', {'alpha': 0.0, 'beta': 0.0}),
]
IDS = [f'{n}-{"-".join(f"{k}{v}" for k, v in h.items())}' for n, h in CASES]


# ---------------------------------------------------------------- float64 references


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_kl(a, b):
  return np.sum(a * (np.log(a) - np.log(b)), -1)


def reference(name, student, teacher, temperature=1.0, **hp):
  """Textbook formulas on finite logits, in float64."""
  q = np.exp(np_log_softmax(np.asarray(student, np.float64) / temperature))
  p = np.exp(np_log_softmax(np.asarray(teacher, np.float64) / temperature))
  if name == 'forward_kl':
    return np_kl(p, q)
  if name == 'reverse_kl':
    return np_kl(q, p)
  if name == 'jsd':
    beta = hp.get('beta', 0.5)
    if hp.get('endpoints', 'kl') == 'kl' and beta in (0.0, 1.0):
      return np_kl(p, q) if beta == 0.0 else np_kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * np_kl(p, m) + (1 - beta) * np_kl(q, m)
  if name == 'tvd':
    return 0.5 * np.abs(p - q).sum(-1)
  if name == 'skew_forward_kl':
    a = hp.get('alpha', 0.1)
    return np_kl(p, a * p + (1 - a) * q)
  if name == 'skew_reverse_kl':
    a = hp.get('alpha', 0.1)
    return np_kl(q, a * q + (1 - a) * p)
  if name == 'ab':  # Cichocki, Cruces & Amari (2011), eq. for D_AB and its limits
    a, b = hp.get('alpha', 0.5), hp.get('beta', 0.5)
    if a and b:
      s = a + b
      return -np.sum(p**a * q**b - a / s * p**s - b / s * q**s, -1) / (a * b)
    if a:
      return np.sum(p**a * np.log(p**a / q**a) - p**a + q**a, -1) / a**2
    if b:
      return np.sum(q**b * np.log(q**b / p**b) - q**b + p**b, -1) / b**2
    return 0.5 * np.sum((np.log(p) - np.log(q))**2, -1)
  raise ValueError(name)


def logits(seed, shape=(3, 4, 11), scale=3.0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


S, T = logits(0), logits(1)
MASK = np.ones(S.shape[:-1], np.float32)


# ---------------------------------------------------------------- divergences


def value_and_grads(fn):
  """One compilation giving per-token values and d(Σ values)/d(student, teacher logits)."""
  def both(s, t, m):
    return fn(s, t, m), jax.grad(lambda a, b: fn(a, b, m).sum(), argnums=(0, 1))(s, t)
  return jax.jit(both)


@pytest.mark.parametrize('name,hp', CASES, ids=IDS)
def test_divergence(name, hp):
  fn = value_and_grads(L.get(name, **hp))
  value, (grad, _) = fn(S, T, MASK)
  np.testing.assert_allclose(value, reference(name, S, T, **hp), rtol=2e-5, atol=2e-6)

  # Gradient of one token against float64 central differences of the reference.
  eps, fd = 1e-6, np.zeros(S.shape[-1])
  for i in range(fd.size):
    up, down = S[0, 0].astype(np.float64), S[0, 0].astype(np.float64)
    up[i] += eps
    down[i] -= eps
    fd[i] = (reference(name, up, T[0, 0], **hp) - reference(name, down, T[0, 0], **hp)) / (2 * eps)
  np.testing.assert_allclose(grad[0, 0], fd, atol=3e-5, rtol=1e-3)

  # Non-negative, and exactly zero when the distributions are equal.
  sharp_s, sharp_t = logits(2, scale=12.0), logits(3, scale=12.0)
  assert np.all(np.asarray(fn(sharp_s, sharp_t, MASK)[0]) >= -1e-6)
  assert np.all(np.asarray(value) > 0)
  assert np.all(np.asarray(fn(sharp_s, sharp_s, MASK)[0]) == 0.0)

  # Masked positions never matter, whatever garbage they hold.
  mask = MASK.copy()
  mask[0, 1] = mask[2, :] = 0
  garbage_s, garbage_t = S.copy(), T.copy()
  garbage_s[0, 1], garbage_t[0, 1] = np.nan, -np.inf
  garbage_s[2], garbage_t[2] = 1e30, np.inf
  clean, garbage = fn(S, T, mask), fn(garbage_s, garbage_t, mask)
  np.testing.assert_array_equal(clean[0], garbage[0])
  np.testing.assert_array_equal(clean[1][0], garbage[1][0])
  assert np.all(np.asarray(garbage[0])[mask == 0] == 0)
  assert np.all(np.asarray(garbage[1][0])[mask == 0] == 0)

  # Saturated and −inf logits give finite values and gradients.
  s, t = S.copy(), T.copy()
  s[0] = np.sign(s[0]) * 1e4
  t[1] = -np.sign(t[1]) * 1e4
  s[..., -2:] = t[..., -2:] = -np.inf   # padded vocabulary, ruled out by both
  t[2, 0, 0] = -np.inf                  # ruled out by the teacher only
  s[2, 1, 1] = -np.inf                  # ruled out by the student only
  value, grads = fn(s, t, MASK)
  assert np.all(np.isfinite(value))
  assert all(np.all(np.isfinite(g)) for g in grads)
  # Ids ruled out by both models change nothing: equal to the unpadded vocabulary.
  np.testing.assert_allclose(value[2, 2:], reference(name, S[2, 2:, :-2], T[2, 2:, :-2], **hp),
                             rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize('name,hp', [('forward_kl', {}), ('jsd', {'beta': 0.2}),
                                     ('ab', {'alpha': 0.4, 'beta': 0.8})])
def test_temperature_divides_both_logits(name, hp):
  tau = 2.5
  got = jax.jit(L.get(name, temperature=tau, **hp))(S, T, MASK)
  np.testing.assert_allclose(got, reference(name, S, T, temperature=tau, **hp), rtol=2e-5,
                             atol=2e-6)


@pytest.mark.parametrize('beta,tau,dtype', [(0.5, 1.0, np.float32), (0.1, 2.0, np.float32),
                                            (0.9, 0.7, jax.numpy.bfloat16)])
def test_fused_jsd_matches_autodiff_of_log_prob_form(beta, tau, dtype):
  """JSD(0 < β < 1) is a custom_vjp function with a hand-written gradient; it must equal
  autodiff through the log-prob formula (mixture by `_log_mix`) for both models' logits."""
  from distill.losses import divergences as D

  def log_prob_jsd(lq, lp):
    lm = D._log_mix(lp, lq, beta)
    return beta * D.kl_from_logprobs(lp, lm) + (1 - beta) * D.kl_from_logprobs(lq, lm)

  reference_fn = functools.partial(D._divergence, formula=log_prob_jsd, temperature=tau,
                                   hparams={})
  s, t = logits(7, (2, 5, 13)), logits(8, (2, 5, 13))
  s[..., -2:] = t[..., -2:] = -np.inf   # padded ids, ruled out by both
  t[0, 1, 3] = -np.inf                  # ruled out by the teacher only
  s[1, 2, 4] = -np.inf                  # ruled out by the student only
  mask = np.ones(s.shape[:-1], np.float32)
  mask[1, 3] = 0
  s[1, 3], t[1, 3] = np.nan, np.inf     # garbage at a masked token
  s, t = s.astype(dtype), t.astype(dtype)
  weights = np.arange(1, mask.size + 1, dtype=np.float32).reshape(mask.shape)

  def value_and_weighted_grads(fn):
    return jax.jit(lambda a, b: (fn(a, b, mask),
                                 jax.grad(lambda a, b: (fn(a, b, mask) * weights).sum(),
                                          argnums=(0, 1))(a, b)))

  got_value, got_grads = value_and_weighted_grads(L.get('jsd', beta=beta, temperature=tau))(s, t)
  want_value, want_grads = value_and_weighted_grads(reference_fn)(s, t)
  assert got_value.dtype == want_value.dtype == np.float32
  np.testing.assert_allclose(got_value, want_value, rtol=1e-5, atol=1e-7)
  for got, want in zip(got_grads, want_grads):
    assert got.dtype == dtype and np.all(np.isfinite(np.asarray(got, np.float32)))
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=1e-4 if dtype == np.float32 else 2e-2, atol=1e-6)
    assert np.all(np.asarray(got, np.float32)[1, 3] == 0)


def test_limit_cases():
  fkl = L.get('forward_kl')(S, T, MASK)
  rkl = L.get('reverse_kl')(S, T, MASK)
  # GKD / TRL endpoints are exactly the KLs; the plain JSD vanishes there.
  np.testing.assert_array_equal(L.get('jsd', beta=0.0)(S, T, MASK), fkl)
  np.testing.assert_array_equal(L.get('jsd', beta=1.0)(S, T, MASK), rkl)
  for beta in (0.0, 1.0):
    np.testing.assert_allclose(L.get('jsd', beta=beta, endpoints='jsd')(S, T, MASK), 0.0,
                               atol=1e-7)
  # Unscaled JSD(β)/β → KL(p‖q) as β → 0 and JSD(β)/(1−β) → KL(q‖p) as β → 1. The O(β)
  # remainder grows with the ratios p/q, so the limits are checked on milder logits.
  small, s, t = 1e-3, S / 3, T / 3
  np.testing.assert_allclose(L.get('jsd', beta=small, endpoints='jsd')(s, t, MASK) / small,
                             L.get('forward_kl')(s, t, MASK), rtol=1e-2)
  np.testing.assert_allclose(L.get('jsd', beta=1 - small, endpoints='jsd')(s, t, MASK) / small,
                             L.get('reverse_kl')(s, t, MASK), rtol=1e-2)
  # Skew with α = 0 is the plain KL, exactly.
  np.testing.assert_array_equal(L.get('skew_forward_kl', alpha=0.0)(S, T, MASK), fkl)
  np.testing.assert_array_equal(L.get('skew_reverse_kl', alpha=0.0)(S, T, MASK), rkl)
  # ABKD: (1, 0) is forward KL, (0, 1) reverse KL, and the general formula is continuous
  # into its limit branches.
  np.testing.assert_allclose(L.get('ab', alpha=1.0, beta=0.0)(S, T, MASK), fkl, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(L.get('ab', alpha=0.0, beta=1.0)(S, T, MASK), rkl, rtol=1e-5,
                             atol=1e-6)
  for a, b in ((1.0, 0.0), (0.0, 1.0), (0.6, 0.0), (0.0, 0.0)):
    near = L.get('ab', alpha=a or small, beta=b or small)(s, t, MASK)
    np.testing.assert_allclose(near, L.get('ab', alpha=a, beta=b)(s, t, MASK), rtol=1e-2)


def test_bad_names_and_hparams_raise_before_tracing():
  with pytest.raises(ValueError, match='forward_kl.*reverse_kl'):
    L.get('kl')
  bad = [('jsd', {'beta': 1.5}, 'beta'), ('jsd', {'beta': -0.1}, 'beta'),
         ('jsd', {'endpoints': 'both'}, 'endpoints'),
         ('skew_forward_kl', {'alpha': 1.1}, 'alpha'),
         ('skew_reverse_kl', {'alpha': -0.5}, 'alpha'),
         ('ab', {'alpha': -1.0}, 'alpha'), ('ab', {'beta': float('nan')}, 'beta'),
         ('tvd', {'temperature': 0.0}, 'temperature'),
         ('forward_kl', {'temperature': -2.0}, 'temperature'),
         ('forward_kl', {'beta': 0.5}, 'beta')]
  for name, hp, word in bad:
    with pytest.raises(ValueError, match=word):
      L.get(name, **hp)
  assert set(L.NAMES) >= {'forward_kl', 'reverse_kl', 'jsd', 'tvd', 'skew_forward_kl',
                          'skew_reverse_kl', 'ab'}


# ---------------------------------------------------------------- reductions


def test_reductions_and_exact_multi_host_sums():
  rng = np.random.default_rng(6)
  x = rng.random((4, 5)).astype(np.float32)
  mask = (rng.random((4, 5)) > 0.4).astype(np.float32)
  mask[3] = 0
  x[3, 0] = np.nan                                    # masked NaN must not leak
  safe = np.where(mask > 0, x, 0.0)
  rows = mask.sum(1)
  expected = {'token_mean': safe.sum() / mask.sum(),
              'sequence_mean': np.mean([safe[i].sum() / rows[i] for i in range(4) if rows[i]]),
              'sum': safe.sum()}
  for mode, want in expected.items():
    np.testing.assert_allclose(L.reduce(x, mask, mode), want, rtol=1e-6)
    if mode != 'sum':  # two "hosts" holding two rows each recombine exactly
      parts = [L.sum_and_count(x[i:i + 2], mask[i:i + 2], mode) for i in (0, 2)]
      total = sum(p[0] for p in parts) / sum(p[1] for p in parts)
      np.testing.assert_allclose(total, want, rtol=1e-6)
  assert L.reduce(x, np.zeros_like(mask)) == 0.0
  with pytest.raises(ValueError, match='mode'):
    L.reduce(x, mask, 'mean')


# ---------------------------------------------------------------- objective


def test_token_objective_and_hinton():
  s, t = S.reshape(-1, 11), T.reshape(-1, 11)
  targets = np.random.default_rng(7).integers(0, 11, size=s.shape[0])
  ce = -np.take_along_axis(np_log_softmax(s), targets[:, None], -1)[:, 0]
  np.testing.assert_allclose(L.cross_entropy(s, targets), ce, rtol=1e-5)
  fn = L.token_objective('jsd', beta=0.3, kd_weight=0.7, ce_weight=0.2, temperature=2.0)
  want = 0.7 * reference('jsd', s, t, temperature=2.0, beta=0.3) + 0.2 * ce
  np.testing.assert_allclose(fn(s, t, targets), want, rtol=1e-5)
  alpha, tau = 0.6, 3.0
  want = alpha * tau**2 * reference('forward_kl', s, t, temperature=tau) + (1 - alpha) * ce
  np.testing.assert_allclose(L.hinton(alpha, tau)(s, t, targets), want, rtol=1e-5)
  # Pure CE needs no teacher; KD without one is an error; weights are validated.
  np.testing.assert_allclose(L.token_objective(kd_weight=0.0, ce_weight=1.0)(s, None, targets),
                             ce, rtol=1e-5)
  with pytest.raises(ValueError, match='teacher'):
    L.token_objective()(s, None, targets)
  with pytest.raises(ValueError, match='kd_weight'):
    L.token_objective(kd_weight=-1.0)
  with pytest.raises(ValueError, match='both 0'):
    L.token_objective(kd_weight=0.0)
  with pytest.raises(ValueError, match='alpha'):
    L.token_objective('skew_forward_kl', alpha=2.0)


# ---------------------------------------------------------------- TAID


def test_taid_interpolation_and_gradient():
  fkl = L.get('forward_kl')
  np.testing.assert_allclose(L.taid_loss(S, T, MASK, 0.0), 0.0, atol=1e-6)
  np.testing.assert_allclose(L.taid_loss(S, T, MASK, 1.0), fkl(S, T, MASK), rtol=1e-6)
  t = 0.3
  target = 0.7 * S.astype(np.float64) + 0.3 * T
  np.testing.assert_allclose(L.taid_teacher_logits(S, T, t), target, rtol=1e-5)
  np.testing.assert_allclose(L.taid_loss(S, T, MASK, t), reference('forward_kl', S, target),
                             rtol=1e-5, atol=1e-6)
  # The target is a constant: the gradient is that of KL(p_t‖q) with p_t fixed.
  grad = jax.grad(lambda s: L.taid_loss(s, T, MASK, t).sum())(S)
  fixed = jax.grad(lambda s: fkl(s, target.astype(np.float32), MASK).sum())(S)
  np.testing.assert_allclose(grad, fixed, atol=1e-6)
  inf_s, inf_t = S.copy(), T.copy()
  inf_s[..., 0] = inf_t[..., 0] = -np.inf
  for t in (0.0, 0.5, 1.0):
    assert np.all(np.isfinite(L.taid_loss(inf_s, inf_t, MASK, t)))


def test_taid_schedule_follows_the_paper_update():
  t_start, t_end, alpha, beta, total = 0.4, 1.0, 0.05, 0.9, 50
  losses = 3.0 * np.exp(-np.arange(total) / 10) + 0.1 * np.sin(np.arange(total))
  state = L.taid_init(t_start, t_end, alpha, beta)
  update = jax.jit(L.taid_update)
  t, prev, m = t_start, None, 0.0
  ts = []
  for step, loss in enumerate(losses):
    state = update(state, loss, step, total)
    if prev is not None:  # independent float64 re-statement of the update
      m = beta * m + (1 - beta) * (prev - loss) / (prev + 1e-15)
      linear = t_start + (t_end - t_start) * step / total
      t = min(t_end, max(linear, t + alpha / (1 + np.exp(-m)) * (1 - t)))
    prev = loss
    np.testing.assert_allclose(state['t'], t, rtol=1e-5)
    ts.append(float(state['t']))
  assert all(b >= a for a, b in zip(ts, ts[1:])) and ts[-1] <= t_end
  # α = 0: exactly the linear schedule.
  state = L.taid_init(0.2, 0.8, alpha=0.0)
  for step in range(5):
    state = L.taid_update(state, 1.0, step, 10)
  np.testing.assert_allclose(state['t'], 0.2 + 0.6 * 4 / 10, rtol=1e-6)
  for kwargs in ({'t_start': 1.0}, {'t_end': 0.3}, {'alpha': 2.0}, {'beta': 1.0}):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
      L.taid_init(**kwargs)


# ---------------------------------------------------------------- top-k


topk_kl = jax.jit(L.topk_forward_kl, static_argnames=('tail',))
teacher_topk = jax.jit(L.teacher_topk, static_argnums=1)


def test_topk_extraction_and_tails():
  vocab = S.shape[-1]
  full = L.get('forward_kl')(S, T, MASK)
  ids, logprobs = teacher_topk(T, vocab)
  for tail in ('bucket', 'ignore'):  # k = V: exactly the full forward KL
    np.testing.assert_allclose(topk_kl(S, ids, logprobs, MASK, tail=tail), full, rtol=1e-5,
                               atol=1e-6)
  # At a temperature (the teacher's top k extracted at it too): the full forward KL at it.
  ids_tau, logprobs_tau = L.teacher_topk(T, vocab, temperature=2.0)
  np.testing.assert_allclose(L.topk_forward_kl(S, ids_tau, logprobs_tau, MASK, temperature=2.0),
                             L.get('forward_kl', temperature=2.0)(S, T, MASK), rtol=1e-5,
                             atol=1e-6)
  k = 3
  ids, logprobs = teacher_topk(T, k)
  lp_all, lq_all = np_log_softmax(T), np_log_softmax(S)
  np.testing.assert_array_equal(ids, np.argsort(-T, -1)[..., :k])
  np.testing.assert_allclose(logprobs, np.take_along_axis(lp_all, ids, -1), atol=1e-6)
  p, q = np.exp(np.take_along_axis(lp_all, ids, -1)), np.exp(np.take_along_axis(lq_all, ids, -1))
  p_tail, q_tail = 1 - p.sum(-1), 1 - q.sum(-1)
  bucket = np.sum(p * np.log(p / q), -1) + p_tail * np.log(p_tail / q_tail)
  p_hat = p / p.sum(-1, keepdims=True)
  ignore = np.sum(p_hat * np.log(p_hat / q), -1)
  np.testing.assert_allclose(topk_kl(S, ids, logprobs, MASK), bucket, rtol=1e-4)
  np.testing.assert_allclose(topk_kl(S, ids, logprobs, MASK, tail='ignore'), ignore, rtol=1e-5)
  with pytest.raises(ValueError, match='k'):
    L.teacher_topk(T, vocab + 1)
  with pytest.raises(ValueError, match='k'):
    L.topk_forward_kl(S[..., :2], ids, logprobs, MASK)
  with pytest.raises(ValueError, match='tail'):
    L.topk_forward_kl(S, ids, logprobs, MASK, tail='drop')


def test_topk_with_padded_vocabulary_is_exact_and_finite():
  s, t = S.copy(), T.copy()
  s[..., -2:] = t[..., -2:] = -np.inf
  ids, logprobs = teacher_topk(t, s.shape[-1])   # includes the two −inf ids
  value, grad = jax.jit(jax.value_and_grad(
      lambda x: topk_kl(x, ids, logprobs, MASK).sum()))(s)
  np.testing.assert_allclose(value, L.get('forward_kl')(s, t, MASK).sum(), rtol=1e-5)
  assert np.all(np.isfinite(grad))


# ---------------------------------------------------------------- hidden states


def test_hidden_state_losses():
  rng = np.random.default_rng(8)
  student = [rng.normal(size=(2, 3, 4)).astype(np.float32) for _ in range(2)]
  teacher = [rng.normal(size=(2, 3, 6)).astype(np.float32) for _ in range(4)]
  mask = np.array([[1, 1, 0], [1, 0, 1]], np.float32)
  layer_map = {0: 1, 1: 3}
  proj = L.init_hidden_projections(jax.random.key(0), layer_map, 4, 6)
  assert set(proj) == {'0', '1'} and proj['0'].shape == (4, 6)
  assert L.init_hidden_projections(jax.random.key(0), layer_map, 6, 6) == {}

  def np_loss(kind):
    per = []
    for s, t in layer_map.items():
      a, b = student[s].astype(np.float64) @ np.asarray(proj[str(s)]), teacher[t]
      if kind == 'mse':
        per.append(np.mean((a - b)**2, -1))
      else:
        per.append(1 - np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1))
    return np.mean(per, 0) * mask

  for kind in ('cosine', 'mse'):
    loss = jax.jit(lambda p, kind=kind: L.hidden_state_loss(student, np.stack(teacher), mask,
                                                            layer_map, p, kind=kind))
    np.testing.assert_allclose(loss(proj), np_loss(kind), rtol=1e-5, atol=1e-6)
    grads = jax.jit(jax.grad(lambda p: loss(p).sum()))(proj)
    assert all(np.all(np.isfinite(g)) and np.abs(g).sum() > 0 for g in grads.values())
  with pytest.raises(ValueError, match='widths differ'):
    L.hidden_state_loss(student, teacher, mask, layer_map)
  with pytest.raises(ValueError, match='out of range'):
    L.hidden_state_loss(student, teacher, mask, {0: 7}, proj)
  with pytest.raises(ValueError, match='kind'):
    L.hidden_state_loss(student, teacher, mask, layer_map, proj, kind='l1')


def test_config_hparams_of_other_divergences_are_set_aside():
  """One config's hparams serve a sweep over divergences; a typo is still an error."""
  from distill.losses import divergences
  assert divergences.split_hparams('forward_kl', {'beta': 0.5}) == ({}, ['beta'])
  assert divergences.split_hparams('jsd', {'beta': 0.5, 'temperature': 2.0}) == (
      {'beta': 0.5, 'temperature': 2.0}, [])
  kept, unused = divergences.split_hparams('forward_kl', {'betta': 0.5, 'alpha': 0.1})
  assert unused == ['alpha']
  with pytest.raises(ValueError, match=r"does not take \['betta'\]"):
    L.get('forward_kl', **kept)


def test_gkd_config_switched_to_forward_kl_builds():
  import jax.numpy as jnp
  from distill.algorithms import divergence
  from tests.helpers import small_config
  config = small_config('arithmetic_gkd')
  config.loss.divergence = 'forward_kl'        # the config also sets loss.hparams.beta
  token_fn = divergence.make_token_fn(config, has_teacher=True)
  logits = jnp.log(jnp.array([[0.7, 0.2, 0.1]]))
  value = token_fn(logits, logits, jnp.array([0]), jnp.ones((1,)))
  np.testing.assert_allclose(value, 0.0, atol=1e-6)   # KL of equal distributions
