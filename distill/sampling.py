"""Batched generation for any Transformer: one prefill, then a compiled decode loop.

`generate` samples from one model; `joint_generate` decodes a student and a teacher side by
side, a `JointRule` picking each token from both models' logits (teacher-mixed sampling,
speculative KD). Both run the same loop (`_decode`).

Shapes are fixed: the KV cache holds P + max_new_tokens slots and outputs are [B, N] with
N = max_new_tokens. The loop is a `lax.while_loop` that also ends once every row has emitted
EOS, so short completions cost only their length; the result does not depend on when it ends
(step i always draws with the i-th of `jax.random.split(rng, N)`; all steps' noise is drawn
before the loop).

Sampling distribution at each step (Hugging Face's order): logits / temperature, then keep the
top_k largest, then keep the smallest set of most likely tokens whose probability reaches top_p
(renormalised after top-k). Ties at a cut-off are all kept. temperature == 0 is greedy argmax.
"""
import dataclasses
import functools
import math
import numbers
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from distill.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int
  temperature: float = 1.0     # 0 = greedy
  top_k: int = 0               # 0 = no top-k cut
  top_p: float = 1.0           # 1 = no nucleus cut
  eos_id: int | None = None    # None = never stop early
  pad_id: int = 0              # emitted by a row after its EOS


def validate_sampling(cfg: SamplingConfig, model_config: ModelConfig, prompt_len: int) -> None:
  """Raises ValueError naming the bad field; call before tracing (generate does)."""
  def is_int(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)

  def is_real(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)

  n = cfg.max_new_tokens
  if not is_int(n) or n <= 0:
    raise ValueError(f'SamplingConfig.max_new_tokens must be a positive int, got {n!r}')
  if prompt_len + n > model_config.max_seq_len:
    raise ValueError(f'prompt_len {prompt_len} + max_new_tokens {n} exceeds the model\'s '
                     f'max_seq_len {model_config.max_seq_len}')
  t = cfg.temperature
  if not is_real(t) or not 0 <= t < math.inf:
    raise ValueError(f'SamplingConfig.temperature must be a finite number >= 0, got {t!r}')
  if not is_int(cfg.top_k) or cfg.top_k < 0:
    raise ValueError(f'SamplingConfig.top_k must be an int >= 0 (0 = off), got {cfg.top_k!r}')
  if not is_real(cfg.top_p) or not 0 < cfg.top_p <= 1:
    raise ValueError(f'SamplingConfig.top_p must be in (0, 1], got {cfg.top_p!r}')
  vocab = model_config.vocab_size
  for name in ('eos_id', 'pad_id'):
    value = getattr(cfg, name)
    if value is None and name == 'eos_id':
      continue
    if not is_int(value) or not 0 <= value < vocab:
      raise ValueError(f'SamplingConfig.{name}={value!r} is not a token id of a vocabulary '
                       f'of {vocab}')


def sampling_logits(logits_BxV, cfg: SamplingConfig):
  """Unnormalised fp32 log-probabilities of the sampling distribution (-inf = excluded).

  Requires temperature > 0 (greedy has no distribution to adjust).
  """
  x = logits_BxV.astype(jnp.float32) / cfg.temperature
  V = x.shape[-1]
  if 0 < cfg.top_k < V:
    kth_Bx1 = jax.lax.top_k(x, cfg.top_k)[0][:, -1:]
    x = jnp.where(x < kth_Bx1, -jnp.inf, x)
  if cfg.top_p < 1:
    sorted_BxV = -jnp.sort(-x, axis=-1)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    # Kept: tokens whose predecessors' mass is still short of top_p (the top one always is).
    n_keep_Bx1 = jnp.sum(mass_before_BxV < cfg.top_p, axis=-1, keepdims=True)
    threshold_Bx1 = jnp.take_along_axis(sorted_BxV, n_keep_Bx1 - 1, axis=-1)
    x = jnp.where(x < threshold_Bx1, -jnp.inf, x)
  return x


def _blocks(vocab_size: int) -> tuple[int, int]:
  """(n_blocks, block_size) of the two-level categorical draw: about sqrt(V) each, exactly
  dividing V when a divisor is near sqrt(V) (padding the logits costs a full pass per step)."""
  root = math.isqrt(vocab_size)
  for n_blocks in range(root, max(root // 4, 1) - 1, -1):
    if vocab_size % n_blocks == 0:
      return n_blocks, vocab_size // n_blocks
  n_blocks = math.isqrt(vocab_size - 1) + 1
  return n_blocks, -(-vocab_size // n_blocks)


def gumbel_noise(rng, batch_shape: tuple[int, ...], vocab_size: int):
  """The Gumbel noise that one draw per row consumes: [*batch_shape, n_blocks + block_size].

  A decode loop draws all of it before the loop: one random-bits call per step costs more on
  CPU than the rest of the sampling.
  """
  return jax.random.gumbel(rng, (*batch_shape, sum(_blocks(vocab_size))))


def _categorical(noise_BxG, logits_BxV):
  """Exact categorical sample in two levels: a block of ~sqrt(V) ids, then an id inside it.

  Gumbel-max at both levels, so a row needs 2*sqrt(V) noise values instead of V. Returns
  (token [B], logsumexp of the logits [B]).
  """
  B, V = logits_BxV.shape
  n_blocks, size = _blocks(V)
  padded_BxV = jnp.pad(logits_BxV, ((0, 0), (0, n_blocks * size - V)), constant_values=-jnp.inf)
  blocks_BxNxS = padded_BxV.reshape(B, n_blocks, size)
  block_lse_BxN = jax.nn.logsumexp(blocks_BxNxS, axis=-1)
  block_B = jnp.argmax(block_lse_BxN + noise_BxG[:, :n_blocks], axis=-1)
  inner_BxS = jnp.take_along_axis(blocks_BxNxS, block_B[:, None, None], axis=1)[:, 0]
  inner_B = jnp.argmax(inner_BxS + noise_BxG[:, n_blocks:], axis=-1)
  return (block_B * size + inner_B).astype(jnp.int32), jax.nn.logsumexp(block_lse_BxN, axis=-1)


def sample_from_logits(rng, logits_BxV, cfg: SamplingConfig):
  """One token per row of logits, drawn from the distribution cfg describes.

  Returns (token [B] int32, its log-prob under that sampling distribution [B] (0 for greedy),
  its log-prob under softmax(logits) itself [B]).
  """
  B, V = logits_BxV.shape
  noise_BxG = None if cfg.temperature == 0 else gumbel_noise(rng, (B,), V)
  return sample_with_noise(noise_BxG, logits_BxV, cfg)


def sample_with_noise(noise_BxG, logits_BxV, cfg: SamplingConfig):
  """sample_from_logits with the noise drawn by the caller (`gumbel_noise`; None for greedy)."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  untouched = cfg.temperature == 1 and cfg.top_k == 0 and cfg.top_p == 1
  if cfg.temperature == 0:
    token_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logp_B = jnp.zeros(token_B.shape, jnp.float32)  # greedy is deterministic
  else:
    adjusted_BxV = sampling_logits(logits_BxV, cfg)
    token_B, lse_B = _categorical(noise_BxG, adjusted_BxV)
    logp_B = jnp.take_along_axis(adjusted_BxV, token_B[:, None], axis=-1)[:, 0] - lse_B
  if not untouched:
    lse_B = jax.nn.logsumexp(logits_BxV, axis=-1)
  model_logp_B = jnp.take_along_axis(logits_BxV, token_B[:, None], axis=-1)[:, 0] - lse_B
  return token_B, logp_B, model_logp_B


def write_column(out_BxN, i, value_B):
  """out with column i replaced by value (cast to out's dtype): a decode loop's step output."""
  return jax.lax.dynamic_update_slice_in_dim(out_BxN, value_B[:, None].astype(out_BxN.dtype),
                                             i, axis=1)


class JointRule(NamedTuple):
  """How `joint_generate` picks each token from the student's and the teacher's logits.

  noise(key, B, V) -> the random numbers one step's pick consumes (any pytree of arrays, or
      None), derived from that step's key. The loop draws every step's noise before it starts
      (`jax.vmap` over the step keys): random-bit calls inside the loop cost more on CPU than
      the rest of the sampling.
  choose(noise, student_logits_BxV, teacher_logits_BxV) -> (token_B, logprob_B, flag_B):
      the token, its log-probability under the rule's own sampling distribution, and any
      per-token number the rule reports (e.g. 1 where the teacher replaced the student's
      token). Logits are fp32.
  """
  noise: Callable
  choose: Callable


def _decode(models, prompt_BxP, prompt_mask_BxP, rng, cfg: SamplingConfig, noise, choose):
  """The decode loop that `generate` and `joint_generate` share.

  Every model in `models` prefills the prompts into its own KV cache, then consumes each
  chosen token. noise(key, B, V) is one step's noise; choose(noise, *logits_BxV) -> (token_B,
  {name: value_B}) picks the token from all models' next-token logits (in `models` order) and
  names the per-token numbers to report. Returns tokens_BxN, mask_BxN and each name as a
  [B, N] fp32 array, 0 where mask is 0.
  """
  B, P = prompt_BxP.shape
  N = cfg.max_new_tokens
  prompt_mask_BxP = prompt_mask_BxP.astype(jnp.int32)
  weights = [model.decoding_weights() for model in models]   # once, outside the loop
  caches, first_logits = [], []
  for model, model_weights in zip(models, weights):
    # Each step feeds its token back, the last one included, hence P + N slots.
    cache = model.init_cache(B, P + N)
    last_BxV, cache = model.prefill(prompt_BxP, prompt_mask_BxP, cache, last_only=True,
                                    weights=model_weights)
    caches.append(cache)
    first_logits.append(last_BxV)

  # Step i draws with step_keys[i], all before the loop; vmapping the noise over the keys
  # gives the same numbers as drawing from each key inside the loop.
  step_keys = jax.random.split(rng, N)
  step_noise = jax.vmap(lambda key: noise(key, B, first_logits[0].shape[-1]))(step_keys)

  def draw(i, logits_per_model):
    noise_i = jax.tree.map(lambda x: x[jnp.minimum(i, N - 1)], step_noise)
    return choose(noise_i, *logits_per_model)

  # The loop carries step i's draw (token and reported numbers: [B] each), made at the end of
  # step i-1, rather than [B, V] logits, which XLA copied at every step. The last draw is unused.
  def body(state):
    i, (token_B, values), caches, done_B, out = state
    live_B = ~done_B
    token_B = jnp.where(live_B, token_B, cfg.pad_id)
    out = {'tokens_BxN': write_column(out['tokens_BxN'], i, token_B),
           'mask_BxN': write_column(out['mask_BxN'], i, live_B),
           **{name: write_column(out[name], i, jnp.where(live_B, value_B, 0.0))
              for name, value_B in values.items()}}
    if cfg.eos_id is not None:
      done_B = done_B | (token_B == cfg.eos_id)
    logits_per_model, caches = zip(*(model.decode_step(token_B[:, None], cache, weights=model_weights)
                           for model, model_weights, cache in zip(models, weights, caches)))
    return i + 1, draw(i + 1, logits_per_model), caches, done_B, out

  def cond(state):
    i, _, _, done_B, _ = state
    return (i < N) & ~jnp.all(done_B)

  first = draw(0, first_logits)
  out = {'tokens_BxN': jnp.full((B, N), cfg.pad_id, jnp.int32),
         'mask_BxN': jnp.zeros((B, N), jnp.int32),
         **{name: jnp.zeros((B, N), jnp.float32) for name in first[1]}}
  done_B = prompt_mask_BxP.sum(axis=1) == 0
  state = (jnp.zeros((), jnp.int32), first, tuple(caches), done_B, out)
  return jax.lax.while_loop(cond, body, state)[-1]


def generate(graphdef, params, prompt_BxP, prompt_mask_BxP, rng, cfg: SamplingConfig) -> dict:
  """Samples max_new_tokens continuations of left-padded prompts. Pure; jit with cfg static.

  Returns dict of [B, N] arrays:
    tokens_BxN          generated ids (pad_id after a row's EOS)
    mask_BxN            int32, 1 up to and including the row's EOS, 0 after
    logprobs_BxN        log-prob of each token under the sampling distribution (after
                        temperature / top-k / top-p; 0 for greedy), 0 where mask is 0
    model_logprobs_BxN  log-prob of each token under the model itself (temperature 1), 0 where
                        mask is 0
  A row whose prompt mask is all zero (a padding row) generates nothing (mask all 0).
  """
  model = nnx.merge(graphdef, params)
  validate_sampling(cfg, model.config, prompt_BxP.shape[1])

  def noise(key, B, V):
    return None if cfg.temperature == 0 else gumbel_noise(key, (B,), V)

  def choose(noise_BxG, logits_BxV):
    token_B, logp_B, model_logp_B = sample_with_noise(noise_BxG, logits_BxV, cfg)
    return token_B, {'logprobs_BxN': logp_B, 'model_logprobs_BxN': model_logp_B}

  return _decode([model], prompt_BxP, prompt_mask_BxP, rng, cfg, noise, choose)


def joint_generate(student_graphdef, student_params, teacher_graphdef, teacher_params,
                   prompt_BxP, prompt_mask_BxP, rng, cfg: SamplingConfig,
                   rule: JointRule) -> dict:
  """Decodes with the student's and the teacher's KV caches side by side; `rule` picks each
  token from both models' next-token logits and both models then consume it.

  Shapes, stopping and randomness follow `generate` (step i's noise comes from
  split(rng, N)[i]). No gradient reaches either model's params.
  Returns dict of [B, N] arrays: tokens_BxN, mask_BxN (as in generate), logprobs_BxN and
  flags_BxN (the rule's logprob_B and flag_B, fp32, 0 where mask is 0).
  """
  student = nnx.merge(student_graphdef, jax.lax.stop_gradient(student_params))
  teacher = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(teacher_params))
  for model in (student, teacher):
    validate_sampling(cfg, model.config, prompt_BxP.shape[1])

  def choose(noise, student_logits_BxV, teacher_logits_BxV):
    token_B, logp_B, flag_B = rule.choose(noise, student_logits_BxV.astype(jnp.float32),
                                          teacher_logits_BxV.astype(jnp.float32))
    return token_B.astype(jnp.int32), {'logprobs_BxN': logp_B, 'flags_BxN': flag_B}

  return _decode([student, teacher], prompt_BxP, prompt_mask_BxP, rng, cfg, rule.noise, choose)


def make_generate_fn(graphdef, cfg: SamplingConfig):
  """jax.jit of generate for fixed graphdef and cfg: fn(params, prompt_BxP, prompt_mask_BxP, rng).

  Compiles once per prompt shape and is reused across calls with new params/prompts/rngs.
  """
  return jax.jit(functools.partial(generate, graphdef, cfg=cfg))


def training_batch(prompt_BxP, prompt_mask_BxP, sample: dict, pad_id: int) -> dict:
  """The data pipeline's batch layout for prompts and their sampled completions.

  tokens [B, P+N] int32, targets (tokens shifted left, last = pad_id) int32, input_mask int32,
  loss_mask float32: 1 at column t when the target token t+1 is a generated token with mask 1.
  """
  tokens_BxT = jnp.concatenate([prompt_BxP, sample['tokens_BxN']], axis=1).astype(jnp.int32)
  mask_BxN = sample['mask_BxN'].astype(jnp.int32)
  B, P = prompt_BxP.shape
  pad_Bx1 = jnp.full((B, 1), pad_id, jnp.int32)
  return {
      'tokens': tokens_BxT,
      'targets': jnp.concatenate([tokens_BxT[:, 1:], pad_Bx1], axis=1),
      'input_mask': jnp.concatenate([prompt_mask_BxP.astype(jnp.int32), mask_BxN], axis=1),
      'loss_mask': jnp.concatenate([jnp.zeros((B, P - 1), jnp.float32),
                                    mask_BxN.astype(jnp.float32),
                                    jnp.zeros((B, 1), jnp.float32)], axis=1),
  }


# The name distill.eval uses for the same layout.
