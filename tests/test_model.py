"""Transformer: exactness against a NumPy Llama reference, masking, KV cache, presets, errors."""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import distill  # noqa: F401  (sets flax config)
from distill.models import PRESETS, ModelConfig, Transformer, count_params, get_preset
from distill.models import presets, sharded
from distill.models import rope as rope_lib

TINY = dict(vocab_size=37, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
            max_seq_len=64, rope_theta=500.0)
VARIANTS = {
    'gqa': {},
    'qwen3_mha': dict(qk_norm=True, head_dim=12, n_kv_heads=4),
    # remat and unroll change the schedule, never the numbers.
    'qwen2_tied': dict(qkv_bias=True, tie_embeddings=True, n_kv_heads=1, remat=True,
                       scan_unroll=2),
    # Every Gemma 2/3 option at once (caps near the random model's scores and logits, ~3 and
    # ~50), with sliding and global layers interleaved, the global
    # ones with linear rope scaling and the sliding ones with a base of their own.
    'gemma': dict(norm_plus_one=True, post_norms=True, embed_scale=True, mlp_activation='gelu_tanh',
                  qk_norm=True, qkv_bias=False, o_bias=False, query_pre_attn_scalar=10.0,
                  attn_softcap=3.0, final_softcap=60.0, sliding_window=3, rope_local_theta=50.0,
                  layer_types=('sliding_attention', 'full_attention'),
                  rope_scaling={'rope_type': 'linear', 'factor': 4.0}),
    # Phi-3 style partial rotary with a window in every layer, YaRN, biases on q/k/v and o.
    'phi3_yarn_bias': dict(partial_rotary_factor=0.5, sliding_window=4, qkv_bias=True,
                           o_bias=True, rope_scaling={'rope_type': 'yarn', 'factor': 4.0,
                                                      'original_max_position_embeddings': 8}),
}


def make_model(seed=0, **overrides):
  """A tiny model whose every parameter (norm weights and biases too) is random.

  Built abstractly and filled from NumPy: eager jax.random init would compile one tiny
  program per parameter shape, which dominates the runtime of these tests.
  """
  cfg = ModelConfig(**{**TINY, **overrides})
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  state = jax.tree.map(
      lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape) + (x.ndim <= 2), x.dtype),
      nnx.state(model, nnx.Param))
  nnx.update(model, state)
  return model


@functools.partial(jax.jit, static_argnames=('graphdef', 'method', 'kwargs'))
def _call(graphdef, state, *args, method, kwargs):
  return getattr(nnx.merge(graphdef, state), method)(*args, **dict(kwargs))


def jitted(model, method='__call__', **static_kwargs):
  """model.method under jax.jit; equal configs share one compilation (graphdef is the key)."""
  graphdef, state = nnx.split(model)
  kwargs = tuple(sorted(static_kwargs.items()))
  return lambda *args: _call(graphdef, state, *args, method=method, kwargs=kwargs)


def reference_logits(model, tokens_T):
  """Straightforward float64 NumPy forward of one unpadded sequence (HF conventions), with every
  architecture option written out; only the rotary frequencies come from distill.models.rope."""
  cfg = model.config
  p = {k: np.asarray(v, np.float64)
       for k, v in nnx.to_pure_dict(nnx.state(model.layers, nnx.Param)).items()}
  H, K, Dh, T = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, len(tokens_T)
  embed = np.asarray(model.embed[...], np.float64)
  unembed = embed.T if cfg.tie_embeddings else np.asarray(model.unembed[...], np.float64)

  def rms(x, w):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * (
        1 + w if cfg.norm_plus_one else w)

  def cap(x, c):
    return np.tanh(x / c) * c if c else x

  def rotary(local):
    """x -> x rotated on its first R dims (pairs i, i + R/2), the rest passed through."""
    freq, factor = rope_lib.inv_freq(cfg, local)
    angle = np.arange(T)[:, None] * np.asarray(freq, np.float64)[None]
    cos = np.concatenate([np.cos(angle)] * 2, -1)[:, None] * factor
    sin = np.concatenate([np.sin(angle)] * 2, -1)[:, None] * factor
    R = cfg.rotary_dim

    def apply(x):
      rot = np.concatenate([-x[..., R // 2:R], x[..., :R // 2]], -1)
      return np.concatenate([x[..., :R] * cos + rot * sin, x[..., R:]], -1)
    return apply

  scale = (cfg.query_pre_attn_scalar or Dh) ** -0.5
  x = embed[tokens_T] * (np.sqrt(cfg.d_model) if cfg.embed_scale else 1.0)
  for l in range(cfg.n_layers):
    sliding = cfg.sliding_layers[l]
    rotate = rotary(sliding)
    h = rms(x, p['attn_norm'][l])
    q, k, v = h @ p['wq'][l], h @ p['wk'][l], h @ p['wv'][l]
    if cfg.qkv_bias:
      q, k, v = q + p['bq'][l], k + p['bk'][l], v + p['bv'][l]
    q, k, v = q.reshape(T, H, Dh), k.reshape(T, K, Dh), v.reshape(T, K, Dh)
    if cfg.qk_norm:
      q, k = rms(q, p['q_norm'][l]), rms(k, p['k_norm'][l])
    q, k = rotate(q), rotate(k)
    out = np.zeros((T, H, Dh))
    for head in range(H):
      kv = head // (H // K)  # HF repeat_kv: each kv head serves H/K consecutive q heads
      s = cap(q[:, head] @ k[:, kv].T * scale, cfg.attn_softcap)
      s[np.triu_indices(T, 1)] = -np.inf
      if sliding:
        s[np.tril_indices(T, -cfg.sliding_window)] = -np.inf
      w = np.exp(s - s.max(-1, keepdims=True))
      out[:, head] = (w / w.sum(-1, keepdims=True)) @ v[:, kv]
    o = out.reshape(T, H * Dh) @ p['wo'][l] + (p['bo'][l] if cfg.o_bias else 0)
    x = x + (rms(o, p['attn_post_norm'][l]) if cfg.post_norms else o)
    h = rms(x, p['mlp_norm'][l])
    gate = h @ p['w_gate'][l]
    if cfg.mlp_activation == 'silu':
      act = gate / (1 + np.exp(-gate))
    else:
      act = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate ** 3)))
    o = (act * (h @ p['w_up'][l])) @ p['w_down'][l]
    x = x + (rms(o, p['mlp_post_norm'][l]) if cfg.post_norms else o)
  return cap(rms(x, np.asarray(model.final_norm[...], np.float64)) @ unembed, cfg.final_softcap)


@pytest.fixture(scope='module', params=list(VARIANTS))
def model(request):
  return make_model(**VARIANTS[request.param])


B, T = 4, 12  # one shape for all forward passes, so each config compiles once


def random_batch(seed):
  return np.random.default_rng(seed).integers(0, TINY['vocab_size'], (B, T))


def test_matches_numpy_reference(model):
  tokens = random_batch(0)
  logits = jitted(model)(jnp.asarray(tokens), jnp.ones((B, T), jnp.int32))
  assert logits.dtype == jnp.float32 and logits.shape == (B, T, TINY['vocab_size'])
  for b in range(2):
    np.testing.assert_allclose(logits[b], reference_logits(model, tokens[b]), atol=2e-4, rtol=2e-4)


def test_causal_and_padding_invariant(model):
  rng = np.random.default_rng(1)
  base = random_batch(1)[0]
  # Row 0: base; row 1: base with tokens after t=5 changed; row 2: base left-padded by 3 with
  # garbage in the padding (and its last 3 tokens cut); row 3: base right-padded from t=8.
  changed = base.copy()
  changed[6:] = (base[6:] + 1 + rng.integers(0, 5, (T - 6,))) % TINY['vocab_size']
  left = np.concatenate([rng.integers(0, TINY['vocab_size'], (3,)), base[:T - 3]])
  tokens = jnp.asarray(np.stack([base, changed, left, base]))
  mask = np.ones((B, T), np.int32)
  mask[2, :3] = 0
  mask[3, 8:] = 0
  logits = jitted(model)(tokens, jnp.asarray(mask))
  np.testing.assert_allclose(logits[1, :6], logits[0, :6], atol=1e-5)
  assert not np.allclose(logits[1, 6:], logits[0, 6:], atol=1e-3)
  np.testing.assert_allclose(logits[2, 3:], logits[0, :T - 3], atol=1e-5)
  np.testing.assert_allclose(logits[3, :8], logits[0, :8], atol=1e-5)
  assert np.isfinite(np.asarray(logits)).all()


def test_prefill_decode_equals_full_forward(model):
  """Left-padded prompts, prefill, then decode steps: same logits as one full forward pass."""
  P = 8
  tokens = jnp.asarray(random_batch(2))
  mask = np.ones((B, T), np.int32)
  mask[1, :2] = 0   # left padding of the prompts
  mask[2, :7] = 0
  full = jitted(model)(tokens, jnp.asarray(mask))

  def cached(m, tokens, prompt_mask):
    cache = m.init_cache(B, T)
    prompt_logits, cache = m.prefill(tokens[:, :P], prompt_mask, cache)
    cache, step_logits = jax.lax.scan(lambda c, tok: m.decode_step(tok[:, None], c)[::-1],
                                      cache, tokens[:, P:].T)
    return prompt_logits, step_logits.transpose(1, 0, 2), cache

  graphdef, state = nnx.split(model)
  prompt_logits, step_logits, cache = jax.jit(
      lambda s, *a: cached(nnx.merge(graphdef, s), *a))(state, tokens, jnp.asarray(mask[:, :P]))
  real = mask[:, :P] > 0
  # rtol: the gemma variant's logits are ~50, where fp32 rounding alone exceeds 1e-5.
  np.testing.assert_allclose(np.asarray(prompt_logits)[real], np.asarray(full)[:, :P][real],
                             atol=1e-5, rtol=2e-6)
  np.testing.assert_allclose(step_logits, full[:, P:], atol=1e-5, rtol=2e-6)
  assert int(cache['index']) == T
  np.testing.assert_array_equal(cache['pos'], mask.sum(1))
  np.testing.assert_array_equal(cache['key_mask'], mask)


def test_hidden_states_and_output_projection(model):
  tokens, mask = jnp.asarray(random_batch(3)), jnp.ones((B, T), jnp.int32)
  h, layers = jitted(model, 'hidden_states', return_layers=True)(tokens, mask)
  cfg = model.config
  assert h.shape == (B, T, cfg.d_model) and h.dtype == jnp.float32
  assert layers.shape == (cfg.n_layers, B, T, cfg.d_model)
  w = model.output_projection()
  assert w.shape == (cfg.d_model, cfg.vocab_size)
  if cfg.tie_embeddings:
    np.testing.assert_array_equal(w, model.embed[...].T)
  logits = h @ w
  if cfg.final_softcap:   # Gemma 2: the logits are h @ w soft-capped
    logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
  np.testing.assert_allclose(logits, jitted(model)(tokens, mask), atol=1e-5)
  # The last layer output, final-normed, is h.
  last = layers[-1]
  normed = last / jnp.sqrt(jnp.mean(last ** 2, -1, keepdims=True) + cfg.norm_eps)
  w_norm = model.final_norm[...] + (1 if cfg.norm_plus_one else 0)
  np.testing.assert_allclose(normed * w_norm, h, atol=1e-5)


def test_gradient_matches_finite_difference():
  """The gradient (through remat, the unrolled scan and tied embeddings) is the derivative of the
  forward pass: <grad, d> equals a central difference along a random direction d."""
  model = make_model(**VARIANTS['qwen2_tied'])
  tokens, mask = jnp.asarray(random_batch(4)), jnp.ones((B, T), jnp.int32)
  graphdef, state = nnx.split(model)
  loss = lambda s: jnp.mean(jnp.sin(nnx.merge(graphdef, s)(tokens, mask)))
  grads = jax.jit(jax.grad(loss))(state)
  rng = np.random.default_rng(0)
  direction = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), state)
  eps = 1e-3
  shifted = lambda sign: jax.tree.map(lambda x, d: x + sign * eps * d, state, direction)
  # The forward pass of this config and shape is already compiled by the tests above.
  loss_at = lambda s: float(jnp.mean(jnp.sin(
      _call(graphdef, s, tokens, mask, method='__call__', kwargs=()))))
  numeric = (loss_at(shifted(1)) - loss_at(shifted(-1))) / (2 * eps)
  analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads),
                                                        jax.tree.leaves(direction)))
  np.testing.assert_allclose(analytic, numeric, rtol=2e-2)


def test_bf16_compute_close_to_fp32():
  tokens, mask = jnp.asarray(random_batch(5)), jnp.ones((B, T), jnp.int32)
  ref = jitted(make_model())(tokens, mask)
  model = make_model(dtype='bfloat16')
  cache = model.init_cache(B, T)
  assert len(cache['k']) == len(cache['v']) == 2     # one buffer per layer
  assert all(k.dtype == jnp.bfloat16 and k.shape == (B, 2, T, 8) for k in cache['k'])
  logits, _ = jitted(model, 'prefill')(tokens, mask, cache)
  assert logits.dtype == jnp.float32
  # Random O(1) weights amplify rounding; a wrong cast or dropped term would be O(100%) off.
  err = np.abs(logits - ref)
  assert err.max() < 0.1 * np.abs(ref).max() and err.mean() < 0.05 * np.abs(ref).mean()


def expected_params(cfg: ModelConfig) -> int:
  D, F, Dh, V = cfg.d_model, cfg.d_ff, cfg.resolved_head_dim, cfg.vocab_size
  q, kv = cfg.n_heads * Dh, cfg.n_kv_heads * Dh
  per_layer = 2 * D + 2 * D * q + 2 * D * kv + 3 * D * F
  per_layer += (q + 2 * kv) * cfg.qkv_bias + 2 * Dh * cfg.qk_norm + D * cfg.o_bias
  per_layer += 2 * D * cfg.post_norms
  return V * D * (1 if cfg.tie_embeddings else 2) + D + cfg.n_layers * per_layer


@pytest.mark.parametrize('name', list(PRESETS))
def test_preset_param_counts(name):
  cfg = get_preset(name, 64)
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  assert count_params(abstract) == expected_params(cfg)
  if name.startswith(('student-', 'teacher-')):
    size = name.split('-')[1]
    nominal = float(size[:-1]) * {'k': 1e3, 'm': 1e6}[size[-1]]
    assert 0.6 < count_params(abstract) / nominal < 1.5


# Parameter counts as published (model cards, Gemma 3 report Table 1): the total, or the
# non-embedding count where only that is given to more than one significant figure.
PUBLISHED_PARAMS = {
    'llama-3.2-1b': (1.23e9, 'total'), 'llama-3.2-3b': (3.21e9, 'total'),
    'gemma-2-2b': (2_614_341_888, 'total'), 'gemma-3-1b': (698e6, 'non_embedding'),
    'gemma-3-4b': (3209e6, 'non_embedding'), 'qwen3-0.6b': (0.44e9, 'non_embedding'),
    'qwen3-1.7b': (1.4e9, 'non_embedding'), 'qwen3-4b': (3.6e9, 'non_embedding'),
    'smollm2-135m': (135e6, 'total'), 'smollm2-360m': (360e6, 'total'),
    'phi-3-mini': (3.8e9, 'total'), 'phi-4-mini': (3.8e9, 'total'),
}


@pytest.mark.parametrize('name', sorted(PUBLISHED_PARAMS))
def test_published_model_presets_have_published_sizes(name):
  cfg = get_preset(name, presets.VOCAB_SIZES[name])
  _, abstract = sharded.abstract_model(cfg)
  count = count_params(abstract)
  figure, kind = PUBLISHED_PARAMS[name]
  if kind == 'non_embedding':
    count -= cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
  assert abs(count / figure - 1) < 0.01, (name, count)


def test_count_params_variants():
  for overrides in VARIANTS.values():
    model = make_model(**overrides)
    assert count_params(model) == expected_params(model.config)
    assert count_params(nnx.state(model, nnx.Param)) == count_params(model)


def test_bench_presets_match_benchmark_doc():
  t, s = get_preset('bench-teacher', 32768), get_preset('bench-student', 32768)
  assert (t.d_model, t.n_layers, t.n_heads, t.n_kv_heads, t.d_ff, t.tie_embeddings) == (
      512, 8, 8, 8, 1536, False)
  assert (s.d_model, s.n_layers, s.n_heads, s.n_kv_heads, s.d_ff, s.tie_embeddings) == (
      256, 4, 4, 4, 768, False)


@pytest.mark.parametrize('overrides, field', [
    (dict(d_model=0), 'd_model'),
    (dict(vocab_size=-1), 'vocab_size'),
    (dict(n_kv_heads=3), 'n_kv_heads'),
    (dict(d_model=30), 'd_model'),
    (dict(head_dim=7), 'head_dim'),
    (dict(dtype='float16'), 'dtype'),
    (dict(rope_theta=0.0), 'rope_theta'),
    (dict(scan_unroll=0), 'scan_unroll'),
    (dict(n_layers=2.0), 'n_layers'),
    (dict(rope_scaling={'rope_type': 'longrope'}), 'supported rope types: default, linear'),
    (dict(rope_scaling={'rope_type': 'yarn', 'factor': 2.0}), 'original_max_position_embeddings'),
    (dict(layer_types=('sliding_attention', 'full_attention')), 'sliding_window=0'),
    (dict(sliding_window=2, layer_types=('full_attention',)), 'layer_types'),
    (dict(mlp_activation='relu'), 'mlp_activation'),
    (dict(partial_rotary_factor=0.0), 'partial_rotary_factor'),
    (dict(sliding_window=-1), 'sliding_window'),
])
def test_bad_config_raises(overrides, field):
  with pytest.raises(ValueError, match=field):
    ModelConfig(**{**TINY, **overrides})


def test_config_survives_json():
  """model.json stores the config through JSON, which turns its tuples into lists."""
  cfg = ModelConfig(**{**TINY, **VARIANTS['gemma']})
  again = ModelConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))
  assert again == cfg and hash(again) == hash(cfg)
  assert cfg.rope_scaling_dict == {'rope_type': 'linear', 'factor': 4.0}


def test_get_preset_errors_and_overrides():
  with pytest.raises(ValueError, match='student-2m'):
    get_preset('student-2M', 64)
  with pytest.raises(ValueError, match='d_modell'):
    get_preset('tiny', 64, d_modell=3)
  cfg = get_preset('tiny', 100, tie_embeddings=True)
  assert cfg.vocab_size == 100 and cfg.tie_embeddings
  assert dataclasses.replace(cfg, head_dim=16).resolved_head_dim == 16


def test_bad_inputs_raise():
  model = make_model()
  with pytest.raises(ValueError, match='max_seq_len'):
    model(jnp.zeros((1, TINY['max_seq_len'] + 1), jnp.int32))
  with pytest.raises(ValueError, match='integer'):
    model(jnp.zeros((1, 4)))
  with pytest.raises(ValueError, match='do not fit'):
    model.prefill(jnp.zeros((1, 5), jnp.int32), None, model.init_cache(1, 4))
