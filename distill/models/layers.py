"""The pure layer function of the transformer (plain arrays in, plain arrays out) and its
stacked parameter specs. Every architecture option is a static ModelConfig flag tested in
Python, so a model without it traces the Llama computation unchanged."""
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from distill.models import rope as rope_lib
from distill.models.config import ModelConfig

# Large finite negative for masked attention scores: a fully masked row gives a uniform
# softmax instead of NaN.
_MASKED = -1e30

# What a layer keeps for its backward pass (when not fully rematerialised): the matmul outputs
# the weight and input gradients read (named with checkpoint_name below) plus the layer input;
# norms, RoPE, transposes and the SwiGLU product are recomputed. Without this policy autodiff
# keeps ~2.4x more per layer (every elementwise intermediate, some twice in two layouts), and
# XLA:CPU zero-fills and copies each into a per-layer stack: a third of the backward's time.
SAVED_FOR_BACKWARD = jax.checkpoint_policies.save_only_these_names(
    'q', 'k', 'v', 'probs', 'attn', 'x_mid', 'gate', 'up')

# config.model.remat_policy: what each layer keeps for the backward pass, the rest recomputed
# from the layer's input (jax.checkpoint policies). Results are the same under every policy;
# memory and time are not. 'named' is the default (above); 'full' (model.remat=True) keeps
# only the layer input; 'dots' every matmul output; 'dots_with_no_batch_dims' those of the
# projections but not attention's batched score and value products; 'none' everything.
REMAT_POLICIES = {
    'none': jax.checkpoint_policies.everything_saveable,
    'named': SAVED_FOR_BACKWARD,
    'dots': jax.checkpoint_policies.dots_saveable,
    'dots_with_no_batch_dims': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'full': jax.checkpoint_policies.nothing_saveable,
}


def rms_norm(x, w, eps, plus_one=False):
  """HF RMSNorm computed in fp32: x * rsqrt(mean(x^2) + eps) * w, or * (1 + w) (Gemma, whose
  weights are offsets from 1). Returns fp32."""
  x = x.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
  w = w.astype(jnp.float32)
  return x * (1.0 + w if plus_one else w)


def softcap(x, cap):
  """cap * tanh(x / cap): Gemma 2's smooth bound on attention scores and logits."""
  return jnp.tanh(x / cap) * cap


def positions(mask_BxT):
  """Position ids of (left- or right-) padded rows: the index among the row's real tokens."""
  return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=1) - 1, 0)


def within_window(cfg: ModelConfig, q_pos_BxT, k_pos_BxS):
  """[B, T, S]: key no more than sliding_window - 1 positions before the query (HF's window
  counts the query itself). Positions, not slots, so padding never takes a window's place."""
  return q_pos_BxT[:, :, None] - k_pos_BxS[:, None, :] < cfg.sliding_window


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


def _attend(cfg, q_BxHxTxDh, k_BxKxSxDh, v_BxKxSxDh, allowed_BxTxS, fp32_accumulate=False):
  """Grouped-query softmax attention (scores and softmax in fp32); returns [B, T, H·Dh].

  All operands are heads-major and each kv head's query group is folded into the row axis, so
  both products are plain batched matmuls [G·T, Dh] x [Dh, S] (and their gradients too);
  token-major einsums made XLA:CPU add transposing copies in the backward pass.
  The two matmuls run in the compute dtype, as in HF.
  """
  B, H, T, Dh = q_BxHxTxDh.shape
  K = k_BxKxSxDh.shape[1]
  G = H // K
  scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else Dh ** -0.5
  q = q_BxHxTxDh.reshape(B, K, G * T, Dh)
  scores = _einsum('bkqd,bksd->bkqs', q, k_BxKxSxDh, fp32_accumulate).astype(jnp.float32)
  scores = scores.reshape(B, K, G, T, -1) * scale
  if cfg.attn_softcap:
    scores = softcap(scores, cfg.attn_softcap)
  scores = jnp.where(allowed_BxTxS[:, None, None], scores, _MASKED).reshape(B, K, G * T, -1)
  probs = _softmax(scores).astype(q.dtype)
  out = _einsum('bkqs,bksd->bkqd', probs, v_BxKxSxDh, fp32_accumulate)
  return out.reshape(B, H, T, Dh).transpose(0, 2, 1, 3).reshape(B, T, H * Dh)


def _norm(cfg, x, w):
  """RMSNorm of x, back in x's dtype."""
  return rms_norm(x, w, cfg.norm_eps, cfg.norm_plus_one).astype(x.dtype)


def _qkv(cfg, p, x_NxD, rope, batch, fp32_accumulate=False):
  """Pre-norm, q/k/v projections (+bias, +qk-norm) and RoPE for one layer.

  x_NxD holds the batch's B·T tokens as rows (2-D, so each projection and its weight gradient is
  one canonical matmul). Returns heads-major q [B, H, T, Dh], k, v [B, Hkv, T, Dh].
  fp32_accumulate: as in _einsum.
  """
  N = x_NxD.shape[0]
  dt, Dh = x_NxD.dtype, cfg.resolved_head_dim
  h = _norm(cfg, x_NxD, p['attn_norm'])

  def project(name, n_heads):
    y = _einsum('nd,dh->nh', h, p['w' + name], fp32_accumulate)
    if cfg.qkv_bias:
      y = y + p['b' + name].astype(dt)
    return y.reshape(batch, N // batch, n_heads, Dh)

  q, k, v = project('q', cfg.n_heads), project('k', cfg.n_kv_heads), project('v', cfg.n_kv_heads)
  if cfg.qk_norm:
    q, k = _norm(cfg, q, p['q_norm']), _norm(cfg, k, p['k_norm'])
  heads_major = lambda x, name: checkpoint_name(x.transpose(0, 2, 1, 3), name)
  return (heads_major(rope_lib.rotate(q, rope), 'q'), heads_major(rope_lib.rotate(k, rope), 'k'),
          heads_major(v, 'v'))


def _finish(cfg, p, x_NxD, attn_NxHDh, fp32_accumulate=False):
  """Attention output projection, residual, and the gated MLP block, on [B·T, ...] rows."""
  mm = lambda a, w: _einsum('nd,df->nf', a, w, fp32_accumulate)
  out = mm(attn_NxHDh, p['wo'])
  if cfg.o_bias:
    out = out + p['bo'].astype(out.dtype)
  if cfg.post_norms:
    out = _norm(cfg, out, p['attn_post_norm'])
  x = checkpoint_name(x_NxD + out, 'x_mid')
  h = _norm(cfg, x, p['mlp_norm'])
  gate = checkpoint_name(mm(h, p['w_gate']), 'gate')
  up = checkpoint_name(mm(h, p['w_up']), 'up')
  act = jax.nn.silu(gate) if cfg.mlp_activation == 'silu' else jax.nn.gelu(gate, approximate=True)
  out = mm(act * up, p['w_down'])
  if cfg.post_norms:
    out = _norm(cfg, out, p['mlp_post_norm'])
  return x + out


def layer(cfg, p, x_NxD, rope, allowed_BxTxS, cache=None):
  """One transformer layer over the B·T new tokens x [B·T, D]; returns (x, k, v).

  rope: the (cos, sin) tables of the new tokens' positions (this layer's kind's).
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
  attn = _attend(cfg, q, k.astype(dt), v.astype(dt), allowed_BxTxS, decoding)
  attn = checkpoint_name(attn.reshape(x_NxD.shape[0], -1), 'attn')
  return _finish(cfg, p, x_NxD, attn, decoding), k, v


def layer_specs(cfg: ModelConfig):
  """name -> (shape, logical axes, init) of every stacked layer parameter."""
  L, D, F, Dh = cfg.n_layers, cfg.d_model, cfg.d_ff, cfg.resolved_head_dim
  HD, KD = cfg.n_heads * Dh, cfg.n_kv_heads * Dh
  normal = jax.nn.initializers.normal(0.02)
  # GPT-2 style: residual-branch outputs start smaller so the stream's scale is depth-independent.
  residual = jax.nn.initializers.normal(0.02 / math.sqrt(2 * L))
  zeros = jax.nn.initializers.zeros
  norm = norm_init(cfg)
  specs = {
      'attn_norm': ((L, D), ('layers', 'embed'), norm),
      'wq': ((L, D, HD), ('layers', 'embed', 'heads'), normal),
      'wk': ((L, D, KD), ('layers', 'embed', 'kv_heads'), normal),
      'wv': ((L, D, KD), ('layers', 'embed', 'kv_heads'), normal),
      'wo': ((L, HD, D), ('layers', 'heads', 'embed'), residual),
      'mlp_norm': ((L, D), ('layers', 'embed'), norm),
      'w_gate': ((L, D, F), ('layers', 'embed', 'mlp'), normal),
      'w_up': ((L, D, F), ('layers', 'embed', 'mlp'), normal),
      'w_down': ((L, F, D), ('layers', 'mlp', 'embed'), residual),
  }
  if cfg.qkv_bias:
    specs['bq'] = ((L, HD), ('layers', 'heads'), zeros)
    specs['bk'] = ((L, KD), ('layers', 'kv_heads'), zeros)
    specs['bv'] = ((L, KD), ('layers', 'kv_heads'), zeros)
  if cfg.o_bias:
    specs['bo'] = ((L, D), ('layers', 'embed'), zeros)
  if cfg.qk_norm:
    specs['q_norm'] = ((L, Dh), ('layers', 'head_dim'), norm)
    specs['k_norm'] = ((L, Dh), ('layers', 'head_dim'), norm)
  if cfg.post_norms:
    specs['attn_post_norm'] = ((L, D), ('layers', 'embed'), norm)
    specs['mlp_post_norm'] = ((L, D), ('layers', 'embed'), norm)
  return specs


def norm_init(cfg: ModelConfig):
  """Norm weights start as the identity scale: 1, or 0 where the norm scales by (1 + w)."""
  return jax.nn.initializers.zeros if cfg.norm_plus_one else jax.nn.initializers.ones
