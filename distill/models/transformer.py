"""Decoder-only transformer of the Llama family, with stacked layers and a functional KV cache.

Weights of all layers are stacked along a leading layer axis and the forward pass is one
`jax.lax.scan` over a pure layer function of plain arrays, so deep models compile once per
layer body and a Hugging Face weight mapping is a transpose per tensor.

Parameters and their logical axes (heads and head_dim are flattened into one axis, in HF order,
so e.g. `wq[l] == q_proj.weight.T`):

  embed       [V, D]              ('vocab', 'embed')
  layers/attn_norm, mlp_norm
              [L, D]              ('layers', 'embed')
  layers/wq   [L, D, H*Dh]        ('layers', 'embed', 'heads')
  layers/wk, wv
              [L, D, Hkv*Dh]      ('layers', 'embed', 'kv_heads')
  layers/wo   [L, H*Dh, D]        ('layers', 'heads', 'embed')
  layers/bq   [L, H*Dh]           ('layers', 'heads')          only with qkv_bias
  layers/bk, bv
              [L, Hkv*Dh]         ('layers', 'kv_heads')       only with qkv_bias
  layers/q_norm, k_norm
              [L, Dh]             ('layers', 'head_dim')       only with qk_norm
  layers/w_gate, w_up
              [L, D, F]           ('layers', 'embed', 'mlp')
  layers/w_down
              [L, F, D]           ('layers', 'mlp', 'embed')
  final_norm  [D]                 ('embed',)
  unembed     [D, V]              ('embed', 'vocab')           only when not tied

KV cache (a plain dict, passed in and returned): 'k', 'v' tuples of L arrays [B, Hkv, S, Dh]
(one buffer per layer, heads-major: a decode step writes its token into each layer's buffer in
place and attends over it without slicing or transposing anything; logical axes in CACHE_AXES);
'key_mask' [B, S] int32 (1 = slot holds a real token); 'index' int32 scalar, the next slot to
write (shared by all rows); 'pos' [B] int32, each row's next position id; 'rope' the (cos, sin)
tables [S, Dh/2] of positions 0..S-1 (a row's positions never exceed its slots), made once
with the cache so that decode steps look the rotary angles up instead of recomputing them.
"""
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from distill.models.config import ModelConfig

# Large finite negative for masked attention scores: a fully masked row gives a uniform
# softmax instead of NaN.
_MASKED = -1e30

CACHE_AXES = {
    'k': ('batch', 'kv_heads', 'cache_seq', 'head_dim'),    # of each layer's buffer
    'v': ('batch', 'kv_heads', 'cache_seq', 'head_dim'),
    'key_mask': ('batch', 'cache_seq'),
    'index': (),
    'pos': ('batch',),
    'rope': ('cache_seq', 'head_dim'),   # each (cos, sin) table; its last axis is Dh/2
}

# What a layer keeps for its backward pass (when not fully rematerialised): the matmul outputs
# the weight and input gradients read (named with checkpoint_name below) plus the layer input;
# norms, RoPE, transposes and the SwiGLU product are recomputed. Without this policy autodiff
# keeps ~2.4x more per layer (every elementwise intermediate, some twice in two layouts), and
# XLA:CPU zero-fills and copies each into a per-layer stack: a third of the backward's time.
_SAVED_FOR_BACKWARD = jax.checkpoint_policies.save_only_these_names(
    'q', 'k', 'v', 'probs', 'attn', 'x_mid', 'gate', 'up')


def _rms_norm(x, w, eps):
  """HF RMSNorm computed in fp32: x * rsqrt(mean(x^2) + eps) * w. Returns fp32."""
  x = x.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
  return x * w.astype(jnp.float32)


def _rope_table(n_positions, head_dim, theta):
  """cos, sin [n_positions, Dh/2] of the rotary angles pos * theta^(-2i/Dh) of positions
  0..n_positions-1, in fp32."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angle_NxK = jnp.arange(n_positions, dtype=jnp.float32)[:, None] * inv_freq
  return jnp.cos(angle_NxK), jnp.sin(angle_NxK)


def _rope_at(table, pos_BxT):
  """The rows of a `_rope_table` at positions pos: cos, sin [B, T, 1, Dh/2].

  A lookup rather than cos/sin of the angles: XLA fuses the tables into each layer's q and k
  fusions, and a decode step then evaluated the trigonometry in all of them.
  """
  return tuple(jnp.take(t, pos_BxT, axis=0)[:, :, None, :] for t in table)


def _rope(x_BxTxHxDh, rope):
  """Rotary embedding, HF 'rotate_half' convention (pairs i and i + Dh/2), computed in fp32."""
  cos, sin = rope
  half = x_BxTxHxDh.shape[-1] // 2
  x = x_BxTxHxDh.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxDh.dtype)


@jax.custom_jvp
def _softmax(x):
  """Softmax over the last axis; its derivative reads only its output, saved as 'probs'."""
  return jax.nn.softmax(x, axis=-1)


@_softmax.defjvp
def _softmax_jvp(primals, tangents):
  (x,), (x_dot,) = primals, tangents
  y = checkpoint_name(_softmax(x), 'probs')
  return y, y * (x_dot - jnp.sum(y * x_dot, axis=-1, keepdims=True))


def _einsum(spec, x, y, fp32_accumulate=False):
  """einsum in x's dtype. With fp32_accumulate (the cached, gradient-free decoding path),
  low-precision operands accumulate in fp32 and round once: on CPUs with AMX/AVX512-BF16
  XLA runs that several times faster than a bf16-result dot. Training keeps plain dots: the
  transpose of an fp32-accumulating dot is an fp32 matmul, slow on accelerators."""
  y = y.astype(x.dtype)
  if fp32_accumulate and x.dtype != jnp.float32:
    return jnp.einsum(spec, x, y, preferred_element_type=jnp.float32).astype(x.dtype)
  return jnp.einsum(spec, x, y)


def _attend(q_BxHxTxDh, k_BxKxSxDh, v_BxKxSxDh, allowed_BxTxS, fp32_accumulate=False):
  """Grouped-query softmax attention (scores and softmax in fp32); returns [B, T, H·Dh].

  All operands are heads-major and each kv head's query group is folded into the row axis, so
  both products are plain batched matmuls [G·T, Dh] x [Dh, S] (and their gradients too);
  token-major einsums made XLA:CPU add transposing copies in the backward pass.
  The two matmuls run in the compute dtype, as in HF.
  """
  B, H, T, Dh = q_BxHxTxDh.shape
  K = k_BxKxSxDh.shape[1]
  G = H // K
  q = q_BxHxTxDh.reshape(B, K, G * T, Dh)
  scores = _einsum('bkqd,bksd->bkqs', q, k_BxKxSxDh, fp32_accumulate).astype(jnp.float32)
  scores = jnp.where(allowed_BxTxS[:, None, None], scores.reshape(B, K, G, T, -1) * Dh ** -0.5,
                     _MASKED).reshape(B, K, G * T, -1)
  probs = _softmax(scores).astype(q.dtype)
  out = _einsum('bkqs,bksd->bkqd', probs, v_BxKxSxDh, fp32_accumulate)
  return out.reshape(B, H, T, Dh).transpose(0, 2, 1, 3).reshape(B, T, H * Dh)


def _qkv(cfg, p, x_NxD, rope, batch, fp32_accumulate=False):
  """Pre-norm, q/k/v projections (+bias, +qk-norm) and RoPE for one layer.

  x_NxD holds the batch's B·T tokens as rows (2-D, so each projection and its weight gradient is
  one canonical matmul). Returns heads-major q [B, H, T, Dh], k, v [B, Hkv, T, Dh].
  fp32_accumulate: as in _einsum.
  """
  N = x_NxD.shape[0]
  dt, Dh = x_NxD.dtype, cfg.resolved_head_dim
  h = _rms_norm(x_NxD, p['attn_norm'], cfg.norm_eps).astype(dt)

  def project(name, n_heads):
    y = _einsum('nd,dh->nh', h, p['w' + name], fp32_accumulate)
    if cfg.qkv_bias:
      y = y + p['b' + name].astype(dt)
    return y.reshape(batch, N // batch, n_heads, Dh)

  q, k, v = project('q', cfg.n_heads), project('k', cfg.n_kv_heads), project('v', cfg.n_kv_heads)
  if cfg.qk_norm:
    q = _rms_norm(q, p['q_norm'], cfg.norm_eps).astype(dt)
    k = _rms_norm(k, p['k_norm'], cfg.norm_eps).astype(dt)
  heads_major = lambda x, name: checkpoint_name(x.transpose(0, 2, 1, 3), name)
  return (heads_major(_rope(q, rope), 'q'), heads_major(_rope(k, rope), 'k'),
          heads_major(v, 'v'))


def _finish(cfg, p, x_NxD, attn_NxHDh, fp32_accumulate=False):
  """Attention output projection, residual, and the SwiGLU MLP block, on [B·T, ...] rows."""
  mm = lambda a, w: _einsum('nd,df->nf', a, w, fp32_accumulate)
  x = checkpoint_name(x_NxD + mm(attn_NxHDh, p['wo']), 'x_mid')
  h = _rms_norm(x, p['mlp_norm'], cfg.norm_eps).astype(x_NxD.dtype)
  gate = checkpoint_name(mm(h, p['w_gate']), 'gate')
  up = checkpoint_name(mm(h, p['w_up']), 'up')
  return x + mm(jax.nn.silu(gate) * up, p['w_down'])


def _layer(cfg, p, x_NxD, rope, allowed_BxTxS, cache=None):
  """One transformer layer over the B·T new tokens x [B·T, D]; returns (x, k, v).

  rope: the (cos, sin) tables of the new tokens' positions, shared by all layers.
  Without a cache the tokens attend to each other (allowed [B, T, T]) and k, v are their keys
  and values. With cache = (k_cache, v_cache, index) of this layer, the new keys and values are
  first written into the buffers at slot `index`, attention runs over all S slots (allowed
  [B, T, S]), and k, v are the updated buffers.
  """
  B, dt = allowed_BxTxS.shape[0], x_NxD.dtype
  decoding = cache is not None   # no gradient flows through the cached path
  q, k, v = _qkv(cfg, p, x_NxD, rope, B, decoding)
  if decoding:
    k_cache, v_cache, index = cache
    k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, 0, index, 0))
    v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, 0, index, 0))
  attn = _attend(q, k.astype(dt), v.astype(dt), allowed_BxTxS, decoding)
  attn = checkpoint_name(attn.reshape(x_NxD.shape[0], -1), 'attn')
  return _finish(cfg, p, x_NxD, attn, decoding), k, v


def _positions(mask_BxT):
  """Position ids of (left- or right-) padded rows: the index among the row's real tokens."""
  return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=1) - 1, 0)


def _layer_specs(cfg: ModelConfig):
  """name -> (shape, logical axes, init) of every stacked layer parameter."""
  L, D, F, Dh = cfg.n_layers, cfg.d_model, cfg.d_ff, cfg.resolved_head_dim
  HD, KD = cfg.n_heads * Dh, cfg.n_kv_heads * Dh
  normal = jax.nn.initializers.normal(0.02)
  # GPT-2 style: residual-branch outputs start smaller so the stream's scale is depth-independent.
  residual = jax.nn.initializers.normal(0.02 / math.sqrt(2 * L))
  ones, zeros = jax.nn.initializers.ones, jax.nn.initializers.zeros
  specs = {
      'attn_norm': ((L, D), ('layers', 'embed'), ones),
      'wq': ((L, D, HD), ('layers', 'embed', 'heads'), normal),
      'wk': ((L, D, KD), ('layers', 'embed', 'kv_heads'), normal),
      'wv': ((L, D, KD), ('layers', 'embed', 'kv_heads'), normal),
      'wo': ((L, HD, D), ('layers', 'heads', 'embed'), residual),
      'mlp_norm': ((L, D), ('layers', 'embed'), ones),
      'w_gate': ((L, D, F), ('layers', 'embed', 'mlp'), normal),
      'w_up': ((L, D, F), ('layers', 'embed', 'mlp'), normal),
      'w_down': ((L, F, D), ('layers', 'mlp', 'embed'), residual),
  }
  if cfg.qkv_bias:
    specs['bq'] = ((L, HD), ('layers', 'heads'), zeros)
    specs['bk'] = ((L, KD), ('layers', 'kv_heads'), zeros)
    specs['bv'] = ((L, KD), ('layers', 'kv_heads'), zeros)
  if cfg.qk_norm:
    specs['q_norm'] = ((L, Dh), ('layers', 'head_dim'), ones)
    specs['k_norm'] = ((L, Dh), ('layers', 'head_dim'), ones)
  return specs


class LayerStack(nnx.Module):
  """Holds the stacked per-layer parameters as attributes named as in `_layer_specs`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.names = tuple(_layer_specs(cfg))
    for name, (shape, axes, init) in _layer_specs(cfg).items():
      setattr(self, name, nnx.Param(init(rngs.params(), shape, cfg.param_dtype),
                                    out_sharding=axes))

  def arrays(self) -> dict:
    return {name: getattr(self, name)[...] for name in self.names}


class Transformer(nnx.Module):
  """Llama-family decoder. All methods are pure given the module (usable under jax.jit)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    config.validate()
    self.config = config
    V, D = config.vocab_size, config.d_model
    normal = jax.nn.initializers.normal(0.02)
    self.embed = nnx.Param(normal(rngs.params(), (V, D), config.param_dtype),
                           out_sharding=('vocab', 'embed'))
    self.layers = LayerStack(config, rngs=rngs)
    self.final_norm = nnx.Param(jnp.ones((D,), config.param_dtype), out_sharding=('embed',))
    if not config.tie_embeddings:
      self.unembed = nnx.Param(normal(rngs.params(), (D, V), config.param_dtype),
                               out_sharding=('embed', 'vocab'))

  # ---- full forward pass -------------------------------------------------------------------

  def __call__(self, tokens_BxT, input_mask_BxT=None):
    """Next-token logits [B, T, V] in fp32."""
    return self.logits(self.hidden_states(tokens_BxT, input_mask_BxT))

  def output_projection(self):
    """The unembedding W [D, V] (the embedding transposed when tied), in param dtype."""
    if self.config.tie_embeddings:
      return self.embed[...].T
    return self.unembed[...]

  def logits(self, h_BxTxD):
    """fp32 logits from final-normed hidden states."""
    return jnp.einsum('...d,dv->...v', h_BxTxD.astype(jnp.float32),
                      self.output_projection().astype(jnp.float32))

  def hidden_states(self, tokens_BxT, input_mask_BxT=None, *, return_layers=False):
    """Final-normed hidden states h [B, T, D] (fp32); with return_layers also [L, B, T, D],
    the output of each layer before the final norm, in compute dtype.

    input_mask_BxT: 1 = real token, 0 = padding (left or right). Positions count real tokens
    only, and no query attends to a padded key.
    """
    tokens_BxT = self._check_tokens(tokens_BxT)
    B, T = tokens_BxT.shape
    cfg = self.config
    mask_BxT = jnp.ones((B, T), jnp.int32) if input_mask_BxT is None else input_mask_BxT
    rope = _rope_at(_rope_table(T, cfg.resolved_head_dim, cfg.rope_theta), _positions(mask_BxT))
    allowed_BxTxT = jnp.tril(jnp.ones((T, T), bool))[None] & (mask_BxT[:, None, :] > 0)

    def body(x, p):
      x, _, _ = _layer(cfg, p, x, rope, allowed_BxTxT)
      return x, (x if return_layers else None)

    # remat keeps only each layer's input, otherwise a layer keeps what _SAVED_FOR_BACKWARD
    # names. Only remat needs CSE barriers (to stay rematerialised when unrolled): the policy
    # recomputes cheap elementwise ops that XLA may as well share with the forward pass.
    body = jax.checkpoint(body, policy=None if cfg.remat else _SAVED_FOR_BACKWARD,
                          prevent_cse=cfg.remat)
    x, layers = jax.lax.scan(body, self._embed(tokens_BxT).reshape(B * T, -1),
                             self.layers.arrays(), unroll=cfg.scan_unroll)
    h = _rms_norm(x, self.final_norm[...], cfg.norm_eps).reshape(B, T, -1)
    return (h, layers.reshape(cfg.n_layers, B, T, -1)) if return_layers else h

  # ---- KV cache ----------------------------------------------------------------------------

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> dict:
    """Empty cache for `batch_size` rows and `max_len` token slots (dtype: compute dtype)."""
    cfg = self.config
    if batch_size <= 0 or max_len <= 0:
      raise ValueError(f'init_cache needs positive batch_size and max_len, got '
                       f'{batch_size}, {max_len}')
    if max_len > cfg.max_seq_len:
      raise ValueError(f'init_cache max_len={max_len} exceeds config.max_seq_len={cfg.max_seq_len}')
    shape = (batch_size, cfg.n_kv_heads, max_len, cfg.resolved_head_dim)
    dtype = dtype or cfg.dtype
    return {
        'k': tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)),
        'v': tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)),
        'key_mask': jnp.zeros((batch_size, max_len), jnp.int32),
        'index': jnp.zeros((), jnp.int32),
        'pos': jnp.zeros((batch_size,), jnp.int32),
        'rope': _rope_table(max_len, cfg.resolved_head_dim, cfg.rope_theta),
    }

  def decoding_weights(self) -> dict:
    """The weights of the cached path, laid out for it: {'layers': one dict per layer,
    'output': the output projection [D, V]}, matmul weights in the compute dtype.

    A decode loop should take them once, outside the loop, and pass them to prefill /
    decode_step: slicing the stacked weights (or casting them) inside the loop body redoes
    it at every step (XLA:CPU does not hoist it).
    """
    dt = self.config.dtype
    stacked = self.layers.arrays()
    cast = lambda name, w: w.astype(dt) if name.startswith('w') else w
    return {'layers': tuple({name: cast(name, w[i]) for name, w in stacked.items()}
                            for i in range(self.config.n_layers)),
            'output': self.output_projection().astype(dt)}

  def prefill(self, tokens_BxP, input_mask_BxP, cache, *, last_only=False, weights=None):
    """Appends P tokens (left-padded prompts allowed) to the cache; returns (logits, cache).

    logits are [B, P, V], or with last_only the last column's [B, V] (all a sampler needs; the
    other P-1 columns are never projected onto the vocabulary). Writes slots [index, index + P);
    the caller must keep index + P <= cache size (a traced index cannot be checked here;
    past it the rotary table lookup gives NaN).
    weights: `decoding_weights()`, when taken outside a decode loop (default: made here).
    In bf16 the matmuls accumulate in fp32 (`_einsum`) and the logits come from the bf16
    output projection, so they differ from `__call__`'s fp32 logits by bf16 rounding.
    """
    tokens_BxP = self._check_tokens(tokens_BxP)
    B, P = tokens_BxP.shape
    B_cache, _, S, _ = cache['k'][0].shape
    if B_cache != B:
      raise ValueError(f'cache has batch {B_cache} but tokens have batch {B}')
    if P > S:
      raise ValueError(f'{P} tokens do not fit a cache of {S} slots')
    mask_BxP = jnp.ones((B, P), jnp.int32) if input_mask_BxP is None else input_mask_BxP
    mask_BxP = mask_BxP.astype(jnp.int32)
    index = cache['index']
    cfg = self.config
    rope = _rope_at(cache['rope'], cache['pos'][:, None] + _positions(mask_BxP))
    # The new token at slot index + t sees every real slot up to its own (slots never written
    # have key_mask 0).
    key_mask_BxS = jax.lax.dynamic_update_slice(cache['key_mask'], mask_BxP, (0, index))
    visible_PxS = jnp.arange(S)[None, :] <= index + jnp.arange(P)[:, None]
    allowed_BxPxS = visible_PxS[None] & (key_mask_BxS[:, None, :] > 0)

    # A Python loop, not a scan, over layers: each layer reads and updates its own cache buffer
    # in place. A scan sliced the stacked weights and cache, and re-stacked the cache, at every
    # decode step.
    weights = weights or self.decoding_weights()
    x = self._embed(tokens_BxP).reshape(B * P, -1)
    k_caches, v_caches = [], []
    for i, p in enumerate(weights['layers']):
      x, k, v = _layer(cfg, p, x, rope, allowed_BxPxS, (cache['k'][i], cache['v'][i], index))
      k_caches.append(k)
      v_caches.append(v)
    new_cache = {
        'k': tuple(k_caches),
        'v': tuple(v_caches),
        'key_mask': key_mask_BxS,
        'index': index + P,
        'pos': cache['pos'] + mask_BxP.sum(axis=1),
        'rope': cache['rope'],
    }
    x = x.reshape(B, P, -1)
    if last_only:
      x = x[:, -1]
    h = _rms_norm(x, self.final_norm[...], cfg.norm_eps).astype(cfg.dtype)
    logits = jnp.einsum('...d,dv->...v', h, weights['output'], preferred_element_type=jnp.float32)
    return logits, new_cache

  def decode_step(self, tokens_Bx1, cache, *, weights=None):
    """Appends one real token per row; returns (logits [B, V], cache). weights: as in
    prefill."""
    tokens_Bx1 = self._check_tokens(tokens_Bx1)
    if tokens_Bx1.shape[1] != 1:
      raise ValueError(f'decode_step takes tokens of shape [B, 1], got {tokens_Bx1.shape}')
    return self.prefill(tokens_Bx1, None, cache, last_only=True, weights=weights)

  # ---- helpers -----------------------------------------------------------------------------

  def _embed(self, tokens_BxT):
    return jnp.take(self.embed[...], tokens_BxT, axis=0).astype(self.config.dtype)

  def _check_tokens(self, tokens_BxT):
    tokens_BxT = jnp.asarray(tokens_BxT)
    if tokens_BxT.ndim != 2 or not jnp.issubdtype(tokens_BxT.dtype, jnp.integer):
      raise ValueError(f'tokens must be an integer array [B, T], got {tokens_BxT.dtype} '
                       f'{tokens_BxT.shape}')
    if tokens_BxT.shape[1] > self.config.max_seq_len:
      raise ValueError(f'sequence length {tokens_BxT.shape[1]} exceeds config.max_seq_len='
                       f'{self.config.max_seq_len}')
    return tokens_BxT


def count_params(model_or_state) -> int:
  """Number of parameters of a Transformer (or any nnx Module), an nnx.State, or a pytree of
  arrays / ShapeDtypeStructs (abstract models from nnx.eval_shape count too)."""
  if isinstance(model_or_state, nnx.Module):
    model_or_state = nnx.state(model_or_state, nnx.Param)
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(model_or_state))
