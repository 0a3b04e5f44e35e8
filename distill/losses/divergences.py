"""Divergences between teacher and student next-token distributions.

Every divergence is a pure function
    fn(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT) -> per_token_BxT
obtained by name from `get(name, **hparams)` (any leading shape works, not only [B, T]).

Conventions (the same for every loss, so that variants compare fairly):
  * p is the teacher, q the student. forward KL = KL(p‖q), reverse KL = KL(q‖p).
  * Computed in fp32 in log space from `log_softmax`; 0·log 0 = 0.
  * `mask` nonzero marks tokens that count; elsewhere the result is exactly 0, the logits
    there are replaced by zeros first (the fused JSD selects them out of its value and
    gradient instead), so garbage (NaN, all −inf) at masked positions never reaches a value or
    a gradient. A *counted* token whose logits hold +inf or are all −inf has no distribution:
    its value is not meaningful (NaN in the fused JSD).
  * A −inf logit means probability exactly 0 (e.g. a vocabulary padded to a multiple of 128,
    masked in both models). Terms that are genuinely infinite — an id that one model rules
    out (−inf) while the other gives it mass, weighted by the latter — are dropped from the
    sum, as DistiLLM's and ABKD's reference code do with their `inf_mask`; everything else is
    exact. Mask padded ids in *both* models and nothing is ever dropped.
  * JSD with 0 < β < 1 (GKD's loss) is one `custom_vjp` function with its gradient in closed
    form (`_jsd_fused`), same conventions, fewer passes over the vocabulary than autodiff; it
    supports reverse-mode differentiation (and vmap), not forward mode (jvp, hessian).
  * `temperature` τ (every divergence takes it) divides both models' logits. `get` never
    multiplies by τ²; use `objective.token_objective(..., temperature_squared_scale=True)`
    or `objective.hinton` for Hinton's τ² scaling.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

Divergence = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
NEG_INF = -jnp.inf


# ----------------------------------------------------------------------------- helpers


def _check_shapes(student_logits, teacher_logits, mask):
  """Raises ValueError unless both logits have one shape and mask is that without V."""
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(f'student and teacher logits differ in shape: {student_logits.shape} vs '
                     f'{teacher_logits.shape} (equal vocabularies are required)')
  if mask.shape != student_logits.shape[:-1]:
    raise ValueError(f'mask shape {mask.shape} does not match logits {student_logits.shape} '
                     f'without the vocabulary axis')


def _log_probs(student_logits, teacher_logits, mask, temperature):
  """fp32 log-probabilities of (student, teacher) and the boolean mask."""
  _check_shapes(student_logits, teacher_logits, mask)
  valid = mask != 0
  def prep(logits):
    logits = logits.astype(jnp.float32) / temperature
    return jax.nn.log_softmax(jnp.where(valid[..., None], logits, 0.0), axis=-1)
  return prep(student_logits), prep(teacher_logits), valid


def _weighted_log_ratio(weight, log_a, log_b):
  """Elementwise weight·(log_a − log_b), 0 where either side is −inf (see module doc).

  Both inputs are replaced before the subtraction so that no inf−inf reaches a gradient.
  """
  ok = (log_a > NEG_INF) & (log_b > NEG_INF)
  diff = jnp.where(ok, log_a, 0.0) - jnp.where(ok, log_b, 0.0)
  return jnp.where(ok, weight * diff, 0.0)


def kl_from_logprobs(log_a, log_b):
  """KL(a‖b) over the last axis from log-probabilities (conventions of the module doc)."""
  return jnp.sum(_weighted_log_ratio(jnp.exp(log_a), log_a, log_b), axis=-1)


def _sorted_pair(log_a, log_b):
  """(larger, smaller, a_is_larger, both_zero) with −inf replaced where both are −inf."""
  a_larger = log_a >= log_b
  hi = jnp.where(a_larger, log_a, log_b)
  lo = jnp.where(a_larger, log_b, log_a)
  both_zero = hi == NEG_INF
  return jnp.where(both_zero, 0.0, hi), jnp.where(both_zero, 0.0, lo), a_larger, both_zero


def _log_mix(log_a, log_b, weight_a: float):
  """log(w·a + (1−w)·b), exactly log_a when a == b (so divergences of equal inputs are 0).

  Written around the larger term: hi + log1p(w_lo·expm1(lo − hi)) with lo − hi ≤ 0.
  """
  if weight_a == 0.0:
    return log_b
  if weight_a == 1.0:
    return log_a
  hi, lo, a_larger, both_zero = _sorted_pair(log_a, log_b)
  w_lo = jnp.where(a_larger, 1.0 - weight_a, weight_a)
  mixed = hi + jnp.log1p(w_lo * jnp.expm1(lo - hi))
  return jnp.where(both_zero, NEG_INF, mixed)


# ----------------------------------------------------------------------------- formulas


def _forward_kl(lq, lp):
  return kl_from_logprobs(lp, lq)


def _reverse_kl(lq, lp):
  return kl_from_logprobs(lq, lp)


def _jsd(lq, lp, *, beta, endpoints):
  """Generalized JSD(β) at β ∈ {0, 1}; for 0 < β < 1 `get` returns `_jsd_from_logits`.

  endpoints='kl': exactly forward (β=0) / reverse (β=1) KL. endpoints='jsd': the plain
  formula, 0 at both ends (M equals the distribution whose KL(·‖M) carries the weight).
  """
  assert beta in (0.0, 1.0), beta
  if endpoints == 'jsd':
    return jnp.zeros(lq.shape[:-1], lq.dtype)
  return kl_from_logprobs(lp, lq) if beta == 0.0 else kl_from_logprobs(lq, lp)


# Finite stand-in for log 0 in `_jsd_fused`: exp of it is exactly 0, and differences of two
# such values are 0 instead of inf − inf.
_LOG_ZERO = -1e30


def _jsd_log_probs(x, stats, beta):
  """log q, log p, log M [..., V] from temperature-scaled logits x = (student, teacher) and
  their row statistics (max, log Σ exp(x − max)). log 0 is `_LOG_ZERO`; log M is written
  around the larger side as in `_log_mix`: one of the two expm1 terms is exactly 0, and
  log M is exactly log q when q == p."""
  lq, lp = (jnp.maximum(xi - m - log_sum, _LOG_ZERO) for xi, (m, log_sum) in zip(x, stats))
  hi = jnp.maximum(lq, lp)
  lm = hi + jnp.log1p(beta * jnp.expm1(lp - hi) + (1.0 - beta) * jnp.expm1(lq - hi))
  return lq, lp, lm


def _row_stats(x):
  """(max, log Σ exp(x − max)) over the last axis, keepdims; a non-finite max counts as 0, as
  in jax.nn.logsumexp."""
  m = jnp.max(x, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  return m, jnp.log(jnp.sum(jnp.exp(x - m), axis=-1, keepdims=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _jsd_fused(student_logits, teacher_logits, mask, beta, temperature):
  """Generalized JSD(β), 0 < β < 1, from logits, with its gradient in closed form.

  Same value as the log-prob formulas (M > 0 wherever p or q is, so no term is dropped), in
  fewer passes over the vocabulary: XLA:CPU writes out every [.., V] intermediate that reaches
  a reduction through a `where`, and the −inf guards of the log-prob form wrote seven in its
  forward alone (experiments/bench/perf_notes.md §8). Gradients (the softmax Jacobian applied
  to ∂/∂q = (1−β)·log(q/M) and ∂/∂p = β·log(p/M)):
    ∂/∂student = (1−β)/τ · q ⊙ (log q − log M − KL(q‖M))
    ∂/∂teacher =     β/τ · p ⊙ (log p − log M − KL(p‖M))
  Masked tokens are 0 in value and gradient whatever their logits hold.
  """
  return _jsd_fused_fwd(student_logits, teacher_logits, mask, beta, temperature)[0]


def _jsd_fused_fwd(student_logits, teacher_logits, mask, beta, temperature):
  x = tuple(l.astype(jnp.float32) / temperature for l in (student_logits, teacher_logits))
  stats = tuple(_row_stats(xi) for xi in x)
  lq, lp, lm = _jsd_log_probs(x, stats, beta)
  kl_qm = jnp.sum(jnp.exp(lq) * (lq - lm), axis=-1)
  kl_pm = jnp.sum(jnp.exp(lp) * (lp - lm), axis=-1)
  valid = mask != 0
  value = jnp.where(valid, beta * kl_pm + (1.0 - beta) * kl_qm, 0.0)
  return value, (student_logits, teacher_logits, valid, stats, (kl_qm, kl_pm))


def _jsd_fused_bwd(beta, temperature, residuals, cotangent):
  student_logits, teacher_logits, valid, stats, (kl_qm, kl_pm) = residuals
  x = tuple(l.astype(jnp.float32) / temperature for l in (student_logits, teacher_logits))
  lq, lp, lm = _jsd_log_probs(x, stats, beta)
  scale = cotangent[..., None] / temperature
  keep = valid[..., None]   # a select, so NaN logits at masked tokens never reach a gradient
  d_student = jnp.where(keep, (1.0 - beta) * scale * jnp.exp(lq) * (lq - lm - kl_qm[..., None]),
                        0.0)
  d_teacher = jnp.where(keep, beta * scale * jnp.exp(lp) * (lp - lm - kl_pm[..., None]), 0.0)
  return d_student.astype(student_logits.dtype), d_teacher.astype(teacher_logits.dtype), None


_jsd_fused.defvjp(_jsd_fused_fwd, _jsd_fused_bwd)


def _jsd_from_logits(student_logits, teacher_logits, mask, *, beta, temperature):
  """The divergence `get('jsd', beta=0 < β < 1)` returns: shape checks, then `_jsd_fused`."""
  _check_shapes(student_logits, teacher_logits, mask)
  return _jsd_fused(student_logits, teacher_logits, mask, beta, temperature)


def _tvd(lq, lp):
  return 0.5 * jnp.sum(jnp.abs(jnp.exp(lp) - jnp.exp(lq)), axis=-1)


def _skew_forward_kl(lq, lp, *, alpha):
  """DistiLLM skew KL: KL(p ‖ α·p + (1−α)·q)."""
  return kl_from_logprobs(lp, _log_mix(lp, lq, alpha))


def _skew_reverse_kl(lq, lp, *, alpha):
  """DistiLLM skew reverse KL: KL(q ‖ α·q + (1−α)·p)."""
  return kl_from_logprobs(lq, _log_mix(lq, lp, alpha))


def _ab(lq, lp, *, alpha, beta):
  """ABKD α-β divergence D_AB(p‖q) (Cichocki, Cruces & Amari 2011), summed over the vocab.

    α,β > 0:   1/(αβ)·Σ [α/(α+β)·p^(α+β) + β/(α+β)·q^(α+β) − p^α·q^β]
    β = 0:     1/α²·Σ [p^α·log(p^α/q^α) − p^α + q^α]          (α=1: KL(p‖q))
    α = 0:     1/β²·Σ [q^β·log(q^β/p^β) − q^β + p^β]          (β=1: KL(q‖p))
    α = β = 0: ½·Σ (log p − log q)²
  The limits are the continuous ones of the general formula (1/α², 1/β²). ABKD's released
  code divides its β=0 / α=0 branches by α / β instead; both agree at (1,0) and (0,1).
  """
  if alpha > 0 and beta > 0:
    # Each summand is a weighted AM−GM gap of a = p^s, b = q^s (s = α+β). Around the larger
    # one, with u = s·(log smaller − log larger) ≤ 0 and w the smaller one's weight:
    #   larger · (w·expm1(u) − expm1(w·u)),  exactly 0 when p == q and finite at u = −inf.
    s = alpha + beta
    hi, lo, p_larger, both_zero = _sorted_pair(lp, lq)
    w_lo = jnp.where(p_larger, beta / s, alpha / s)
    u = s * (lo - hi)
    gap = jnp.exp(s * hi) * (w_lo * jnp.expm1(u) - jnp.expm1(w_lo * u))
    return jnp.sum(jnp.where(both_zero, 0.0, gap), axis=-1) / (alpha * beta)
  if alpha > 0:  # beta == 0
    a, b = jnp.exp(alpha * lp), jnp.exp(alpha * lq)
    terms = alpha * _weighted_log_ratio(a, lp, lq) + (b - a)
    return jnp.sum(terms, axis=-1) / alpha**2
  if beta > 0:  # alpha == 0
    a, b = jnp.exp(beta * lp), jnp.exp(beta * lq)
    terms = beta * _weighted_log_ratio(b, lq, lp) + (a - b)
    return jnp.sum(terms, axis=-1) / beta**2
  ok = (lp > NEG_INF) & (lq > NEG_INF)
  diff = jnp.where(ok, lp, 0.0) - jnp.where(ok, lq, 0.0)
  return 0.5 * jnp.sum(diff * diff, axis=-1)


# ----------------------------------------------------------------------------- registry


def _check_number(name: str, value) -> float:
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise ValueError(f'{name} must be a number, got {value!r}') from None
  if not math.isfinite(value):
    raise ValueError(f'{name} must be finite, got {value}')
  return value


def _in_unit_interval(name: str, value) -> float:
  value = _check_number(name, value)
  if not 0.0 <= value <= 1.0:
    raise ValueError(f'{name} must be in [0, 1], got {value}')
  return value


def _non_negative(name: str, value) -> float:
  value = _check_number(name, value)
  if value < 0.0:
    raise ValueError(f'{name} must be >= 0, got {value}')
  return value


def _jsd_endpoints(name: str, value) -> str:
  if value not in ('kl', 'jsd'):
    raise ValueError(f"{name} must be 'kl' (β=0/1 are exactly forward/reverse KL, as in GKD "
                     f"and TRL) or 'jsd' (the plain generalized JSD), got {value!r}")
  return value


# name -> (formula(lq, lp, **hparams), {hparam: (default, validator)})
_REGISTRY = {
    'forward_kl': (_forward_kl, {}),
    'reverse_kl': (_reverse_kl, {}),
    'jsd': (_jsd, {'beta': (0.5, _in_unit_interval), 'endpoints': ('kl', _jsd_endpoints)}),
    'tvd': (_tvd, {}),
    'skew_forward_kl': (_skew_forward_kl, {'alpha': (0.1, _in_unit_interval)}),
    'skew_reverse_kl': (_skew_reverse_kl, {'alpha': (0.1, _in_unit_interval)}),
    'ab': (_ab, {'alpha': (0.5, _non_negative), 'beta': (0.5, _non_negative)}),
}
_BUILT_IN = frozenset(_REGISTRY)
NAMES = tuple(_REGISTRY)   # the built-in names; `names()` includes registered ones


def names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def register(name: str, formula: Callable, *, hparams: dict | None = None) -> None:
  """Adds divergence `name`: get(name), config.loss.divergence and every objective accept it.

  formula(student_logprobs, teacher_logprobs, **hparams) -> per-token values: both inputs are
  fp32 log-probabilities over the last (vocabulary) axis, already divided by the temperature
  and normalised, and it reduces that axis (e.g. `jnp.sum(..., axis=-1)`) — exactly what
  the built-in entries are. Masking, temperature, the chunked form and validation of the
  name come with it. hparams: {name: default} or {name: (default, check)} with
  check(name, value) -> value raising ValueError; a plain default is checked as a finite
  number. A name already taken is refused.
  """
  if not isinstance(name, str) or not name.isidentifier():
    raise ValueError(f'a divergence name must be an identifier, got {name!r}')
  if name in _REGISTRY:
    kind = 'built-in' if name in _BUILT_IN else 'registered'
    raise ValueError(f'divergence {name!r} is already a {kind} divergence; choose another name')
  if not callable(formula):
    raise ValueError(f'register({name!r}): formula must be callable, got {formula!r}')
  spec = {}
  for key, value in (hparams or {}).items():
    if key == 'temperature':
      raise ValueError(f'register({name!r}): every divergence takes temperature already')
    spec[key] = value if isinstance(value, tuple) else (value, _check_number)
  _REGISTRY[name] = (formula, spec)


def _divergence(student_logits, teacher_logits, mask, *, formula, temperature, hparams):
  lq, lp, valid = _log_probs(student_logits, teacher_logits, mask, temperature)
  return jnp.where(valid, formula(lq, lp, **hparams), 0.0)


def get(name: str, **hparams) -> Divergence:
  """The divergence `name` as fn(student_logits, teacher_logits, mask) -> per-token values.

  Hyper-parameters (validated here, before anything is traced or compiled):
    every name:       temperature τ > 0 (default 1; no τ² factor is applied)
    jsd:              beta ∈ [0, 1] (default 0.5), endpoints 'kl' (default) | 'jsd'.
                      With endpoints='kl' β=0 is exactly forward KL and β=1 exactly reverse
                      KL, as in GKD and TRL's `generalized_jsd_loss` (which branches on
                      β == 0 / β == 1); in between it is the plain generalized JSD.
                      endpoints='jsd' keeps the plain formula everywhere (0 at both ends;
                      JSD(β)/β → forward KL as β → 0).
    skew_forward_kl:  alpha ∈ [0, 1] (default 0.1): KL(p ‖ αp + (1−α)q); α=0 is forward KL.
    skew_reverse_kl:  alpha ∈ [0, 1] (default 0.1): KL(q ‖ αq + (1−α)p); α=0 is reverse KL.
    ab:               alpha ≥ 0, beta ≥ 0 (default 0.5, 0.5): (1,0) is forward KL, (0,1)
                      reverse KL. Negative α or β (defined by Cichocki et al. but not used
                      by ABKD) are rejected: they raise near-zero probabilities to negative
                      powers.
  """
  if name not in _REGISTRY:
    raise ValueError(f'unknown divergence {name!r}; valid names: {", ".join(names())}')
  formula, spec = _REGISTRY[name]
  temperature = _check_number('temperature', hparams.pop('temperature', 1.0))
  if temperature <= 0.0:
    raise ValueError(f'temperature must be > 0, got {temperature}')
  unknown = set(hparams) - set(spec)
  if unknown:
    raise ValueError(f'divergence {name!r} does not take {sorted(unknown)}; it takes '
                     f'{sorted(spec) + ["temperature"]}')
  checked = {key: check(key, hparams.get(key, default)) for key, (default, check) in spec.items()}
  if name == 'jsd' and 0.0 < checked['beta'] < 1.0:
    return functools.partial(_jsd_from_logits, beta=checked['beta'], temperature=temperature)
  return functools.partial(_divergence, formula=formula, temperature=temperature, hparams=checked)


def split_hparams(name: str, hparams: dict) -> tuple[dict, list[str]]:
  """(the hparams divergence `name` takes, the names that only other divergences take).

  Lets one config's hparams serve a sweep over divergences: beta, set for jsd, is unused by
  forward_kl. A name no divergence takes stays in the first dict, so that `get` rejects it.
  """
  if name not in _REGISTRY:
    return dict(hparams), []
  own = set(_REGISTRY[name][1]) | {'temperature'}
  others = {key for _, spec in _REGISTRY.values() for key in spec}
  unused = sorted(key for key in hparams if key not in own and key in others)
  return {k: v for k, v in hparams.items() if k not in unused}, unused
