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

KV cache (a plain dict, passed in and returned): 'k', 'v' [L, B, S, Hkv, Dh] with logical axes
CACHE_AXES['k']; 'key_mask' [B, S] int32 (1 = slot holds a real token); 'index' int32 scalar, the
next slot to write (shared by all rows); 'pos' [B] int32, each row's next position id.
"""
import math

import jax
import jax.numpy as jnp
from flax import nnx

from distill.models.config import ModelConfig

# Large finite negative for masked attention scores: a fully masked row gives a uniform
# softmax instead of NaN.
_MASKED = -1e30

CACHE_AXES = {
    'k': ('layers', 'batch', 'cache_seq', 'kv_heads', 'head_dim'),
    'v': ('layers', 'batch', 'cache_seq', 'kv_heads', 'head_dim'),
    'key_mask': ('batch', 'cache_seq'),
    'index': (),
    'pos': ('batch',),
}


def _rms_norm(x, w, eps):
  """HF RMSNorm computed in fp32: x * rsqrt(mean(x^2) + eps) * w. Returns fp32."""
  x = x.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
  return x * w.astype(jnp.float32)


def _rope(x_BxTxHxDh, pos_BxT, theta):
  """Rotary embedding, HF 'rotate_half' convention (pairs i and i + Dh/2), computed in fp32."""
  half = x_BxTxHxDh.shape[-1] // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(0, 2 * half, 2, dtype=jnp.float32) / (2 * half)))
  angle_BxTx1xK = (pos_BxT.astype(jnp.float32)[..., None] * inv_freq)[:, :, None, :]
  cos, sin = jnp.cos(angle_BxTx1xK), jnp.sin(angle_BxTx1xK)
  x = x_BxTxHxDh.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxDh.dtype)


def _attend(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, allowed_BxTxS):
  """Grouped-query softmax attention with fp32 scores and probabilities."""
  B, T, H, Dh = q_BxTxHxDh.shape
  K = k_BxSxKxDh.shape[2]
  q = q_BxTxHxDh.reshape(B, T, K, H // K, Dh)
  scores = jnp.einsum('btkgd,bskd->bkgts', q, k_BxSxKxDh, preferred_element_type=jnp.float32)
  scores = jnp.where(allowed_BxTxS[:, None, None], scores * Dh ** -0.5, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum('bkgts,bskd->btkgd', probs.astype(v_BxSxKxDh.dtype), v_BxSxKxDh,
                   preferred_element_type=jnp.float32)
  return out.reshape(B, T, H * Dh).astype(q_BxTxHxDh.dtype)


def _qkv(cfg, p, x_BxTxD, pos_BxT):
  """Pre-norm, q/k/v projections (+bias, +qk-norm) and RoPE for one layer."""
  B, T, _ = x_BxTxD.shape
  dt, Dh = x_BxTxD.dtype, cfg.resolved_head_dim
  h = _rms_norm(x_BxTxD, p['attn_norm'], cfg.norm_eps).astype(dt)

  def project(name, n_heads):
    y = h @ p['w' + name].astype(dt)
    if cfg.qkv_bias:
      y = y + p['b' + name].astype(dt)
    return y.reshape(B, T, n_heads, Dh)

  q, k, v = project('q', cfg.n_heads), project('k', cfg.n_kv_heads), project('v', cfg.n_kv_heads)
  if cfg.qk_norm:
    q = _rms_norm(q, p['q_norm'], cfg.norm_eps).astype(dt)
    k = _rms_norm(k, p['k_norm'], cfg.norm_eps).astype(dt)
  return _rope(q, pos_BxT, cfg.rope_theta), _rope(k, pos_BxT, cfg.rope_theta), v


def _finish(cfg, p, x_BxTxD, attn_BxTxHDh):
  """Attention output projection, residual, and the SwiGLU MLP block."""
  dt = x_BxTxD.dtype
  x = x_BxTxD + attn_BxTxHDh @ p['wo'].astype(dt)
  h = _rms_norm(x, p['mlp_norm'], cfg.norm_eps).astype(dt)
  mlp = jax.nn.silu(h @ p['w_gate'].astype(dt)) * (h @ p['w_up'].astype(dt))
  return x + mlp @ p['w_down'].astype(dt)


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
    mask_BxT = jnp.ones((B, T), jnp.int32) if input_mask_BxT is None else input_mask_BxT
    pos_BxT = _positions(mask_BxT)
    causal_TxT = jnp.tril(jnp.ones((T, T), bool))
    allowed_BxTxT = causal_TxT[None] & (mask_BxT[:, None, :] > 0)
    cfg = self.config

    def body(x, p):
      q, k, v = _qkv(cfg, p, x, pos_BxT)
      x = _finish(cfg, p, x, _attend(q, k, v, allowed_BxTxT))
      return x, (x if return_layers else None)

    if cfg.remat:
      body = jax.checkpoint(body)
    x, layers = jax.lax.scan(body, self._embed(tokens_BxT), self.layers.arrays(),
                             unroll=cfg.scan_unroll)
    h = _rms_norm(x, self.final_norm[...], cfg.norm_eps)
    return (h, layers) if return_layers else h

  # ---- KV cache ----------------------------------------------------------------------------

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> dict:
    """Empty cache for `batch_size` rows and `max_len` token slots (dtype: compute dtype)."""
    cfg = self.config
    if batch_size <= 0 or max_len <= 0:
      raise ValueError(f'init_cache needs positive batch_size and max_len, got '
                       f'{batch_size}, {max_len}')
    if max_len > cfg.max_seq_len:
      raise ValueError(f'init_cache max_len={max_len} exceeds config.max_seq_len={cfg.max_seq_len}')
    shape = (cfg.n_layers, batch_size, max_len, cfg.n_kv_heads, cfg.resolved_head_dim)
    dtype = dtype or cfg.dtype
    return {
        'k': jnp.zeros(shape, dtype),
        'v': jnp.zeros(shape, dtype),
        'key_mask': jnp.zeros((batch_size, max_len), jnp.int32),
        'index': jnp.zeros((), jnp.int32),
        'pos': jnp.zeros((batch_size,), jnp.int32),
    }

  def prefill(self, tokens_BxP, input_mask_BxP, cache):
    """Appends P tokens (left-padded prompts allowed) to the cache; returns (logits [B,P,V], cache).

    Writes slots [index, index + P); the caller must keep index + P <= cache size (a traced
    index cannot be checked here).
    """
    tokens_BxP = self._check_tokens(tokens_BxP)
    B, P = tokens_BxP.shape
    S = cache['k'].shape[2]
    if cache['k'].shape[1] != B:
      raise ValueError(f'cache has batch {cache["k"].shape[1]} but tokens have batch {B}')
    if P > S:
      raise ValueError(f'{P} tokens do not fit a cache of {S} slots')
    mask_BxP = jnp.ones((B, P), jnp.int32) if input_mask_BxP is None else input_mask_BxP
    mask_BxP = mask_BxP.astype(jnp.int32)
    index = cache['index']
    pos_BxP = cache['pos'][:, None] + _positions(mask_BxP)
    key_mask_BxS = jax.lax.dynamic_update_slice(cache['key_mask'], mask_BxP, (0, index))
    # Slot order is time order: query i (in slot index + i) sees slots <= its own.
    slot_S = jnp.arange(S)
    allowed_BxPxS = ((slot_S[None, :] <= index + jnp.arange(P)[:, None])[None]
                     & (key_mask_BxS[:, None, :] > 0))
    cfg = self.config

    def body(carry, xs):
      x, k_cache, v_cache = carry
      p, layer = xs
      q, k, v = _qkv(cfg, p, x, pos_BxP)
      start = (layer, 0, index, 0, 0)
      k_cache = jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), start)
      v_cache = jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), start)
      attn = _attend(q, k_cache[layer].astype(x.dtype), v_cache[layer].astype(x.dtype),
                     allowed_BxPxS)
      return (_finish(cfg, p, x, attn), k_cache, v_cache), None

    xs = (self.layers.arrays(), jnp.arange(cfg.n_layers))
    (x, k_cache, v_cache), _ = jax.lax.scan(
        body, (self._embed(tokens_BxP), cache['k'], cache['v']), xs, unroll=cfg.scan_unroll)
    logits = self.logits(_rms_norm(x, self.final_norm[...], cfg.norm_eps))
    new_cache = {'k': k_cache, 'v': v_cache, 'key_mask': key_mask_BxS,
                 'index': index + P, 'pos': cache['pos'] + mask_BxP.sum(axis=1)}
    return logits, new_cache

  def decode_step(self, tokens_Bx1, cache):
    """Appends one real token per row; returns (logits [B, V], cache)."""
    tokens_Bx1 = self._check_tokens(tokens_Bx1)
    if tokens_Bx1.shape[1] != 1:
      raise ValueError(f'decode_step takes tokens of shape [B, 1], got {tokens_Bx1.shape}')
    logits, cache = self.prefill(tokens_Bx1, None, cache)
    return logits[:, 0], cache

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
