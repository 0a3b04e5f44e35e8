"""Sparse (top-k) KD from a teacher-logit cache, or from the teacher's top-k computed online.

`cached_teacher`: one pass of the teacher over `num_rows` train examples writes their top-k
ids and log-probs (completion positions) to a cache on disk (distill.data.teacher_cache);
training then reads rows from it and never runs the teacher. The cache is built by the
first run that needs it and reused by every later run whose teacher, tokenizer, task and
settings match (a sweep over student sizes pays for the teacher once); a mismatch is refused
with the field named. `topk_online`: the same loss with the top-k taken from the teacher
inside the step, on dataset batches (the reference the cache must reproduce).

Loss per completion token, from config.loss (divergence must be forward_kl):
    kd_weight·[τ²]·KL_topk(p_τ‖q_τ) + ce_weight·CE(q, target)
with KL_topk = losses.topk_forward_kl (tail 'bucket' or 'ignore', see distill.losses.topk).
config.loss.chunk_size > 0 computes it a chunk of tokens at a time (memory flat in B·T·V).

The trainer still loads the teacher (build_run does so before any algorithm code): its
parameters identify the cache (fingerprint) and held-out evaluation reports teacher–student
KL with it; the training step never runs it in cached mode.

kwargs: k (default 16), tail ('bucket'), num_rows (train examples cached; 4096),
rows_per_shard (1024), logprob_dtype ('float32' or 'float16'), batch_size (rows per teacher
pass; 0: config.data.eval_batch_size), cache_dir ('': WORKDIR/teacher_cache).
Metric: topk_mass, the teacher probability its top-k hold (token mean).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from distill import losses
from distill.algorithms.base import Algorithm
from distill.data import teacher_cache
from distill.losses.topk import TAILS
from distill.parallel import mesh as mesh_lib
from distill.train import step as step_lib

ROW_KEYS = ('tokens', 'targets', 'input_mask', 'loss_mask')


class OptionsAlgorithm(Algorithm):
  """kwargs with defaults (DEFAULTS), unknown names refused, merged into self.options."""
  DEFAULTS: dict = {}

  def kwarg_error(self, name: str, problem: str) -> ValueError:
    return ValueError(f'config.algorithm.kwargs.{name} {problem} (algorithm '
                      f'{self.config.algorithm.name!r})')

  def validate(self) -> None:
    unknown = sorted(set(self.kwargs) - set(self.DEFAULTS))
    if unknown:
      raise ValueError(f'algorithm {self.config.algorithm.name!r} does not take kwargs '
                       f'{unknown}; it takes {sorted(self.DEFAULTS)}')
    self.options = {**self.DEFAULTS, **self.kwargs}
    if self.run.teacher_params is None:
      raise ValueError(f'algorithm {self.config.algorithm.name!r} needs a teacher: set '
                       'config.teacher.checkpoint to the workdir of a finished teacher run')
    self.check_options(self.options)

  def check_options(self, options: dict) -> None:
    """The subclass's own checks (raise self.kwarg_error(...))."""

  def positive_int(self, name: str) -> int:
    value = self.options[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise self.kwarg_error(name, f'must be an int >= 1, got {value!r}')
    return value


class CacheAlgorithm(OptionsAlgorithm):
  """Trains on rows a teacher computed once into a cache (see distill.data.teacher_cache).

  Subclasses set KIND, LABEL, CACHE_SUBDIR and define `identity_settings()` (what the rows
  depend on besides teacher, tokenizer and task), `num_rows()` and the pure
  `compute(teacher_params, batch, first_row) -> {field: [B, ...]}`.
  """
  KIND = LABEL = CACHE_SUBDIR = ''
  CACHE_DEFAULTS = {'rows_per_shard': 1024, 'batch_size': 0, 'cache_dir': ''}

  def check_options(self, options: dict) -> None:
    self.positive_int('rows_per_shard')
    batch_size = options['batch_size'] or self.config.data.eval_batch_size
    data_parallel = mesh_lib.data_parallel_size(self.run.mesh)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size % data_parallel:
      raise self.kwarg_error('batch_size', f'must be an int divisible by the data-parallel size '
                             f'{data_parallel} (0: config.data.eval_batch_size), got {batch_size!r}')
    self.write_batch_size = batch_size
    if not isinstance(options['cache_dir'], str):
      raise self.kwarg_error('cache_dir', f'must be a path, got {options["cache_dir"]!r}')
    self.cache_dir = options['cache_dir'] or os.path.join(self.run.workdir, self.CACHE_SUBDIR)
    available = self.run.task.num_examples('train')
    if self.num_rows() > available:
      raise ValueError(f'{self.LABEL} needs {self.num_rows()} train examples but task '
                       f'{self.run.task.name!r} has {available}')
    self.identity = teacher_cache.run_identity(self.run, self.KIND, **self.identity_settings())
    # A cache made for another run is refused now, before anything compiles.
    teacher_cache.check_existing(self.cache_dir, self.identity, num_rows=self.num_rows(),
                                 rows_per_shard=options['rows_per_shard'])

  def build_cache(self, stop_after_shards: int | None = None) -> dict:
    """Writes (or finishes, or reuses) the cache; returns its manifest."""
    compute = jax.jit(self.compute)   # the teacher is an argument, not a baked-in constant
    produce = teacher_cache.produce_in_batches(
        self.run, lambda batch, first: compute(self.run.teacher_params, batch, first),
        self.write_batch_size)
    return teacher_cache.write(self.cache_dir, self.identity, num_rows=self.num_rows(),
                               rows_per_shard=self.options['rows_per_shard'], produce=produce,
                               label=self.LABEL, stop_after_shards=stop_after_shards)

  def train_batches(self, default):
    del default   # the cache replaces the dataset
    self.build_cache()
    source = teacher_cache.RowSource(self.cache_dir, self.identity)
    return teacher_cache.make_iterator(
        source, batch_size=self.config.data.batch_size // jax.process_count(),
        seed=self.config.seed, shard_index=jax.process_index(), shard_count=jax.process_count())


def teacher_topk(graphdef, params, batch, k: int, temperature: float):
  """(ids [B,T,k] int32, log-probs [B,T,k] fp32) of the teacher; zeros off the loss mask."""
  logits = nnx.merge(graphdef, jax.lax.stop_gradient(params))(batch['tokens'],
                                                              batch['input_mask'])
  ids, logprobs = losses.teacher_topk(logits, k, temperature=temperature)
  keep = (batch['loss_mask'] != 0)[..., None]
  return jnp.where(keep, ids, 0), jnp.where(keep, logprobs, 0.0)


def topk_loss(student_h_BxTxD, student_w_DxV, ids_BxTxK, logprobs_BxTxK, targets_BxT,
              weights_BxT, token_fn, chunk_size: int = 0):
  """Σ weights·token_fn(student logits, ids, logprobs, targets, mask) over tokens.

  chunk_size > 0: a scan over chunks of tokens (those with weight first, all-zero chunks
  skipped) whose body is rematerialised in the backward pass, so at most one chunk's
  [chunk, V] logits exist at a time; same value and gradient as chunk_size = 0.
  """
  D, K = student_h_BxTxD.shape[-1], ids_BxTxK.shape[-1]
  h_NxD = student_h_BxTxD.reshape(-1, D)
  ids_NxK, logprobs_NxK = ids_BxTxK.reshape(-1, K), logprobs_BxTxK.reshape(-1, K)
  targets_N, weights_N = targets_BxT.reshape(-1), weights_BxT.reshape(-1).astype(jnp.float32)

  def weighted_sum(h, ids, logprobs, targets, weights):
    logits = jnp.einsum('nd,dv->nv', h, student_w_DxV, preferred_element_type=jnp.float32)
    per_token = token_fn(logits, ids, logprobs, targets, weights != 0)
    return jnp.sum(jnp.where(weights != 0, weights * per_token, 0.0))

  inputs = (h_NxD, ids_NxK, logprobs_NxK, targets_N, weights_N)
  if not chunk_size:
    return weighted_sum(*inputs)
  n = weights_N.shape[0]
  chunk = min(chunk_size, n)
  n_chunks = -(-n // chunk)
  order = jnp.argsort(weights_N == 0, stable=True)

  def chunks(x):   # [N, ...] -> [n_chunks, chunk, ...], padding with weight 0
    x = jnp.pad(jnp.asarray(x)[order], [(0, n_chunks * chunk - n)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(n_chunks, chunk, *x.shape[1:])

  @jax.checkpoint
  def body(total, xs):
    value = jax.lax.cond(jnp.any(xs[-1] != 0), lambda: weighted_sum(*xs),
                         lambda: jnp.float32(0.0))
    return total + value, None

  return jax.lax.scan(body, jnp.float32(0.0), tuple(chunks(x) for x in inputs))[0]


class CachedTeacher(CacheAlgorithm):
  DEFAULTS = {'k': 16, 'tail': 'bucket', 'num_rows': 4096, 'logprob_dtype': 'float32',
              **CacheAlgorithm.CACHE_DEFAULTS}
  KIND, LABEL, CACHE_SUBDIR = 'teacher_topk', 'teacher cache', 'teacher_cache'
  online = False

  def num_rows(self) -> int:
    return self.positive_int('num_rows')

  def check_options(self, options: dict) -> None:
    loss = self.config.loss
    name = self.config.algorithm.name
    if loss.divergence != 'forward_kl':
      raise ValueError(f'{name} distils with the forward KL over the teacher\'s top-k: set '
                       f'config.loss.divergence=forward_kl (got {loss.divergence!r})')
    if loss.kd_weight == 0:
      raise ValueError(f'config.loss.kd_weight is 0: {name} would not use the teacher; train '
                       'with algorithm supervised instead')
    vocab = self.run.model_config.vocab_size
    if self.positive_int('k') > vocab:
      raise self.kwarg_error('k', f'must be at most the vocabulary size {vocab}, got '
                             f'{options["k"]}')
    if options['tail'] not in TAILS:
      raise self.kwarg_error('tail', f'must be one of {TAILS}, got '
                             f'{options["tail"]!r}')
    self.token_fn = self.make_token_fn()
    if self.online:
      return
    if options['logprob_dtype'] not in ('float32', 'float16'):
      raise self.kwarg_error('logprob_dtype', 'must be float32 or float16, got '
                             f'{options["logprob_dtype"]!r}')
    super().check_options(options)

  def identity_settings(self) -> dict:
    return {'k': self.options['k'], 'temperature': self.config.loss.temperature,
            'logprob_dtype': self.options['logprob_dtype']}

  def compute(self, teacher_params, batch, first_row):
    del first_row
    ids, logprobs = teacher_topk(self.run.teacher_graphdef, teacher_params, batch,
                                 self.options['k'], self.config.loss.temperature)
    return {**{k: batch[k] for k in ROW_KEYS}, 'topk_ids': ids,
            'topk_logprobs': logprobs.astype(self.options['logprob_dtype'])}

  def make_token_fn(self):
    loss = self.config.loss
    tau = loss.temperature
    kd_scale = loss.kd_weight * (tau**2 if loss.temperature_squared_scale else 1.0)
    tail = self.options['tail']

    def token_fn(logits_NxV, ids_NxK, logprobs_NxK, targets_N, mask_N):
      per_token = kd_scale * losses.topk_forward_kl(logits_NxV, ids_NxK, logprobs_NxK, mask_N,
                                                    tail=tail, temperature=tau)
      if loss.ce_weight:
        per_token += loss.ce_weight * losses.cross_entropy(logits_NxV, targets_N, mask_N)
      return per_token

    return token_fn

  def train_batches(self, default):
    return default if self.online else super().train_batches(default)

  def step(self, ctx: step_lib.StepContext, state, teacher_params, batch):
    if self.online:
      ids, logprobs = teacher_topk(ctx.teacher_graphdef, teacher_params, batch,
                                   self.options['k'], self.config.loss.temperature)
    else:
      ids, logprobs = batch['topk_ids'], batch['topk_logprobs']
    weights_BxT, normaliser = losses.token_weights(batch['loss_mask'], ctx.reduction)

    def loss_fn(params):
      h, w = step_lib.model_outputs(ctx.student_graphdef, params, batch)
      total = topk_loss(h, w, ids, logprobs, batch['targets'], weights_BxT, self.token_fn,
                        ctx.chunk_size)
      return total / jnp.maximum(normaliser, 1e-9), total

    grads, total = jax.grad(loss_fn, has_aux=True)(state['params'])
    mask = batch['loss_mask'] != 0
    mass = jnp.where(mask, jnp.exp(logprobs.astype(jnp.float32)).sum(-1), 0.0).sum()
    tokens = mask.sum().astype(jnp.float32)
    metrics = {'loss': (total, normaliser), 'tokens': (tokens, jnp.float32(1.0)),
               'topk_mass': (mass, tokens)}
    return step_lib.apply_gradients(ctx, state, grads, metrics)


class OnlineTopK(CachedTeacher):
  """The same top-k loss with the teacher run inside the step (no cache)."""
  DEFAULTS = {'k': 16, 'tail': 'bucket'}
  online = True
