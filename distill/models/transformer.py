"""Decoder-only transformer (Llama / Qwen / Mistral / Gemma 2-3 / Phi-3 families), with stacked
layers and a functional KV cache.

Weights of all layers are stacked along a leading layer axis and the forward pass is one
`jax.lax.scan` over a pure layer function of plain arrays (distill.models.layers), so deep models
compile once per layer body and a Hugging Face weight mapping is a transpose per tensor.

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
  layers/bo   [L, D]              ('layers', 'embed')          only with o_bias
  layers/q_norm, k_norm
              [L, Dh]             ('layers', 'head_dim')       only with qk_norm
  layers/attn_post_norm, mlp_post_norm
              [L, D]              ('layers', 'embed')          only with post_norms
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
tables [S, R/2] (R = rotary dim) of positions 0..S-1 (a row's positions never exceed its slots),
made once with the cache so that decode steps look the rotary angles up instead of recomputing
them; 'rope_local' the same for sliding layers, only for models whose sliding layers have a
RoPE base of their own (Gemma 3). Sliding-window layers keep all S slots and mask the keys
outside their window (no rolling buffer).
"""
import math

import jax
import jax.numpy as jnp
from flax import nnx

from distill.models import layers as layers_lib
from distill.models import rope as rope_lib
from distill.models.config import ModelConfig
from distill.parallel import activations

CACHE_AXES = {
    'k': ('batch', 'kv_heads', 'cache_seq', 'head_dim'),    # of each layer's buffer
    'v': ('batch', 'kv_heads', 'cache_seq', 'head_dim'),
    'key_mask': ('batch', 'cache_seq'),
    'index': (),
    'pos': ('batch',),
    'rope': ('cache_seq', 'head_dim'),   # each (cos, sin) table; its last axis is R/2
    'rope_local': ('cache_seq', 'head_dim'),
}


class LayerStack(nnx.Module):
  """Holds the stacked per-layer parameters as attributes named as in `layers.layer_specs`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.names = tuple(layers_lib.layer_specs(cfg))
    for name, (shape, axes, init) in layers_lib.layer_specs(cfg).items():
      setattr(self, name, nnx.Param(init(rngs.params(), shape, cfg.param_dtype),
                                    out_sharding=axes))

  def arrays(self) -> dict:
    return {name: getattr(self, name)[...] for name in self.names}


class Transformer(nnx.Module):
  """Decoder-only LM. All methods are pure given the module (usable under jax.jit)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    config.validate()
    self.config = config
    V, D = config.vocab_size, config.d_model
    normal = jax.nn.initializers.normal(0.02)
    self.embed = nnx.Param(normal(rngs.params(), (V, D), config.param_dtype),
                           out_sharding=('vocab', 'embed'))
    self.layers = LayerStack(config, rngs=rngs)
    self.final_norm = nnx.Param(layers_lib.norm_init(config)(None, (D,), config.param_dtype),
                                out_sharding=('embed',))
    if not config.tie_embeddings:
      self.unembed = nnx.Param(normal(rngs.params(), (D, V), config.param_dtype),
                               out_sharding=('embed', 'vocab'))

  # ---- full forward pass -------------------------------------------------------------------

  def __call__(self, tokens_BxT, input_mask_BxT=None):
    """Next-token logits [B, T, V] in fp32."""
    return self.logits(self.hidden_states(tokens_BxT, input_mask_BxT))

  def output_projection(self):
    """The unembedding W [D, V] (the embedding transposed when tied), in param dtype.
    Logits are h @ W, then soft-capped when config.final_softcap > 0 (Gemma 2)."""
    if self.config.tie_embeddings:
      return self.embed[...].T
    return self.unembed[...]

  def logits(self, h_BxTxD):
    """fp32 logits from final-normed hidden states."""
    logits = jnp.einsum('...d,dv->...v', h_BxTxD.astype(jnp.float32),
                        self.output_projection().astype(jnp.float32))
    return self._cap_logits(_constrain_logits(logits))

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
    pos_BxT = layers_lib.positions(mask_BxT)
    allowed_BxTxT = jnp.tril(jnp.ones((T, T), bool))[None] & (mask_BxT[:, None, :] > 0)
    full, sliding = self._layer_kinds(
        lambda local: rope_lib.at(rope_lib.table(cfg, T, local), pos_BxT),
        allowed_BxTxT, lambda: layers_lib.within_window(cfg, pos_BxT, pos_BxT))
    mixed = cfg.any_sliding and not cfg.all_sliding

    def body(x, xs):
      p, is_sliding = xs
      rope, allowed = sliding if cfg.all_sliding else full
      if mixed:   # a per-layer flag picks this layer's rotary rows and mask
        rope = tuple(jnp.where(is_sliding, a, b) for a, b in zip(sliding[0], rope))
        allowed = jnp.where(is_sliding, sliding[1], allowed)
      x, _, _ = layers_lib.layer(cfg, p, x, rope, allowed)
      x = _constrain_residual(x, B)
      return x, (x if return_layers else None)

    # What a layer keeps for the backward pass: the active layout's remat policy, else 'full'
    # with model.remat (only the layer's input), else what SAVED_FOR_BACKWARD names. Only
    # 'full' needs CSE barriers (to stay rematerialised when unrolled): the other policies
    # recompute cheap elementwise ops that XLA may as well share with the forward pass.
    remat = activations.active().remat or ('full' if cfg.remat else 'named')
    body = jax.checkpoint(body, policy=layers_lib.REMAT_POLICIES[remat],
                          prevent_cse=remat == 'full')
    sliding_L = jnp.asarray(cfg.sliding_layers) if mixed else None
    x = _constrain_residual(self._embed(tokens_BxT).reshape(B * T, -1), B)
    x, layers = jax.lax.scan(body, x, (self.layers.arrays(), sliding_L), unroll=cfg.scan_unroll)
    h = activations.constrain(self._final_norm(x).reshape(B, T, -1), activations.RESIDUAL)
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
    cache = {
        'k': tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)),
        'v': tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)),
        'key_mask': jnp.zeros((batch_size, max_len), jnp.int32),
        'index': jnp.zeros((), jnp.int32),
        'pos': jnp.zeros((batch_size,), jnp.int32),
        'rope': rope_lib.table(cfg, max_len),
    }
    if rope_lib.has_local_table(cfg):
      cache['rope_local'] = rope_lib.table(cfg, max_len, local=True)
    return cache

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
    pos_BxP = cache['pos'][:, None] + layers_lib.positions(mask_BxP)
    # The new token at slot index + t sees every real slot up to its own (slots never written
    # have key_mask 0).
    key_mask_BxS = jax.lax.dynamic_update_slice(cache['key_mask'], mask_BxP, (0, index))
    visible_PxS = jnp.arange(S)[None, :] <= index + jnp.arange(P)[:, None]
    allowed_BxPxS = visible_PxS[None] & (key_mask_BxS[:, None, :] > 0)
    full, sliding = self._layer_kinds(
        lambda local: rope_lib.at(cache['rope_local' if local else 'rope'], pos_BxP),
        allowed_BxPxS,
        lambda: layers_lib.within_window(cfg, pos_BxP, layers_lib.positions(key_mask_BxS)))

    # A Python loop, not a scan, over layers: each layer reads and updates its own cache buffer
    # in place. A scan sliced the stacked weights and cache, and re-stacked the cache, at every
    # decode step.
    weights = weights or self.decoding_weights()
    x = _constrain_residual(self._embed(tokens_BxP).reshape(B * P, -1), B)
    k_caches, v_caches = [], []
    for i, p in enumerate(weights['layers']):
      rope, allowed = sliding if cfg.sliding_layers[i] else full
      x, k, v = layers_lib.layer(cfg, p, x, rope, allowed,
                                 (cache['k'][i], cache['v'][i], index))
      x = _constrain_residual(x, B)
      k_caches.append(activations.constrain(k, CACHE_AXES['k']))
      v_caches.append(activations.constrain(v, CACHE_AXES['v']))
    new_cache = {
        **cache,
        'k': tuple(k_caches),
        'v': tuple(v_caches),
        'key_mask': key_mask_BxS,
        'index': index + P,
        'pos': cache['pos'] + mask_BxP.sum(axis=1),
    }
    x = x.reshape(B, P, -1)
    if last_only:
      x = x[:, -1]
    h = self._final_norm(x).astype(cfg.dtype)
    logits = jnp.einsum('...d,dv->...v', h, weights['output'], preferred_element_type=jnp.float32)
    return self._cap_logits(_constrain_logits(logits)), new_cache

  def decode_step(self, tokens_Bx1, cache, *, weights=None):
    """Appends one real token per row; returns (logits [B, V], cache). weights: as in
    prefill."""
    tokens_Bx1 = self._check_tokens(tokens_Bx1)
    if tokens_Bx1.shape[1] != 1:
      raise ValueError(f'decode_step takes tokens of shape [B, 1], got {tokens_Bx1.shape}')
    return self.prefill(tokens_Bx1, None, cache, last_only=True, weights=weights)

  # ---- helpers -----------------------------------------------------------------------------

  def _layer_kinds(self, rope_of, allowed, window):
    """(rope, allowed) of full-attention layers, and of sliding ones (None when no layer
    slides). rope_of(local) gives the rotary rows of the global or the local table; window()
    the [B, T, S] sliding-window condition."""
    cfg = self.config
    full = (rope_of(False), allowed)
    if not cfg.any_sliding:
      return full, None
    rope = rope_of(True) if rope_lib.has_local_table(cfg) else full[0]
    return full, (rope, allowed & window())

  def _embed(self, tokens_BxT):
    x = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(self.config.dtype)
    if self.config.embed_scale:
      x = x * jnp.asarray(math.sqrt(self.config.d_model), x.dtype)
    return x

  def _final_norm(self, x):
    cfg = self.config
    return layers_lib.rms_norm(x, self.final_norm[...], cfg.norm_eps, cfg.norm_plus_one)

  def _cap_logits(self, logits):
    if self.config.final_softcap:
      return layers_lib.softcap(logits, self.config.final_softcap)
    return logits

  def _check_tokens(self, tokens_BxT):
    tokens_BxT = jnp.asarray(tokens_BxT)
    if tokens_BxT.ndim != 2 or not jnp.issubdtype(tokens_BxT.dtype, jnp.integer):
      raise ValueError(f'tokens must be an integer array [B, T], got {tokens_BxT.dtype} '
                       f'{tokens_BxT.shape}')
    if tokens_BxT.shape[1] > self.config.max_seq_len:
      raise ValueError(f'sequence length {tokens_BxT.shape[1]} exceeds config.max_seq_len='
                       f'{self.config.max_seq_len}')
    return tokens_BxT


def _constrain_residual(x_NxD, batch: int):
  """The residual stream [B·T, D] at a layer boundary, laid out as ('batch', 'length',
  'embed') under the active rules (distill.parallel.activations); unchanged outside a step."""
  if activations.active().mesh is None:
    return x_NxD
  x_BxTxD = x_NxD.reshape(batch, -1, x_NxD.shape[-1])
  return activations.constrain(x_BxTxD, activations.RESIDUAL).reshape(x_NxD.shape)


def _constrain_logits(logits):
  """Logits [B, T, V] (or a sampler's [B, V]) laid out by the active rules."""
  logical = activations.LOGITS if logits.ndim == 3 else ('batch', 'vocab')
  return activations.constrain(logits, logical) if logits.ndim in (2, 3) else logits


def count_params(model_or_state) -> int:
  """Number of parameters of a Transformer (or any nnx Module), an nnx.State, or a pytree of
  arrays / ShapeDtypeStructs (abstract models from nnx.eval_shape count too)."""
  if isinstance(model_or_state, nnx.Module):
    model_or_state = nnx.state(model_or_state, nnx.Param)
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(model_or_state))
