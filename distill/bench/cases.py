"""The cases of /work/shared/BENCHMARK.md, each built from the framework's own code paths.

The distillation step is `distill.train.step.train_step` jitted exactly as the trainer jits it
(state from `create_train_state`, donated; the trainer's optimiser from the default config);
on-policy sampling is `distill.sampling.generate` + `training_batch` inside that same jit, as an
on-policy algorithm's step runs it; the loss-memory figures come from `distill.losses.bench`.
Every case returns a dict of measured fields; `distill.bench.__main__` adds the shared ones.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from distill import losses, sampling
from distill.bench import flops, timing
from distill.losses import bench as loss_bench
from distill.models import ModelConfig, get_preset
from distill.parallel import mesh as mesh_lib
from distill.train import config as config_lib
from distill.train import optimizer as opt_lib
from distill.train import state as state_lib
from distill.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class Shapes:
  teacher: ModelConfig
  student: ModelConfig
  batch: int
  prompt_len: int
  completion_len: int
  memory: dict            # loss_memory: batch, seq, hidden, vocab, default chunk
  matmul_n: int           # size of the matmul that measures the practical peak

  @property
  def seq_len(self) -> int:
    return self.prompt_len + self.completion_len


def make_shapes(small: bool, dtype: str) -> Shapes:
  """BENCHMARK.md's shapes, or (small) tiny ones of the same structure for the harness test."""
  if not small:
    return Shapes(get_preset('bench-teacher', 32768, dtype=dtype),
                  get_preset('bench-student', 32768, dtype=dtype), batch=8, prompt_len=64,
                  completion_len=192,
                  memory=dict(batch=4, seq=1024, hidden=512, vocab=128256, chunk=256),
                  matmul_n=2048)
  tiny = dict(n_heads=2, n_kv_heads=2, max_seq_len=64, dtype=dtype)
  return Shapes(get_preset('bench-teacher', 256, d_model=64, n_layers=2, d_ff=128, **tiny),
                get_preset('bench-student', 256, d_model=32, n_layers=1, d_ff=64, **tiny),
                batch=4, prompt_len=8, completion_len=24,
                memory=dict(batch=2, seq=64, hidden=32, vocab=1024, chunk=16), matmul_n=256)


def jsd_token_fn():
  return losses.token_objective('jsd', beta=0.5, temperature=1.0)


@dataclasses.dataclass
class Setup:
  """Teacher, student train state and data shared by the step and sampling cases."""
  shapes: Shapes
  ctx: step_lib.StepContext
  state: dict               # replaced by each case that donates it
  shardings: dict
  teacher_params: dict
  teacher_shardings: dict
  batch_sharding: jax.sharding.NamedSharding
  prompt_BxP: jax.Array
  prompt_mask_BxP: jax.Array
  batch: dict               # off-policy rows: prompt + random completion


def make_setup(shapes: Shapes, chunk_size: int, seed: int = 0) -> Setup:
  # One device: BENCHMARK.md's figures are per chip, and its batch is the whole batch.
  mesh = mesh_lib.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1})
  rng_teacher, rng_student, rng_prompt, rng_completion = jax.random.split(
      jax.random.PRNGKey(seed), 4)
  teacher_graphdef, _ = state_lib.abstract_model(shapes.teacher)
  teacher_params = state_lib.init_params(shapes.teacher, rng_teacher, mesh)
  optimizer = opt_lib.make_optimizer(config_lib.base_config())
  state, shardings, graphdef = state_lib.create_train_state(shapes.student, optimizer,
                                                            rng_student, mesh)
  ctx = step_lib.StepContext(student_graphdef=graphdef, teacher_graphdef=teacher_graphdef,
                             optimizer=optimizer, token_fn=jsd_token_fn(), chunk_size=chunk_size)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  B, P, N, V = shapes.batch, shapes.prompt_len, shapes.completion_len, shapes.student.vocab_size
  prompt = jax.random.randint(rng_prompt, (B, P), 0, V, jnp.int32)
  prompt_mask = jnp.ones((B, P), jnp.int32)
  completion = {'tokens_BxN': jax.random.randint(rng_completion, (B, N), 0, V, jnp.int32),
                'mask_BxN': jnp.ones((B, N), jnp.int32)}
  batch = sampling.training_batch(prompt, prompt_mask, completion, pad_id=0)
  put = lambda x: jax.device_put(x, batch_sharding)
  return Setup(shapes, ctx, state, shardings, teacher_params,
               jax.tree.map(lambda x: x.sharding, teacher_params), batch_sharding,
               put(prompt), put(prompt_mask), jax.tree.map(put, batch))


def sampling_config(shapes: Shapes) -> sampling.SamplingConfig:
  # Temperature 1, no early stop: every row generates all completion_len tokens.
  return sampling.SamplingConfig(max_new_tokens=shapes.completion_len, temperature=1.0,
                                 eos_id=None)


def onpolicy_train_step(ctx, sampling_cfg, state, teacher_params, prompt_BxP, prompt_mask_BxP):
  """The student samples completions of the prompts, then the distillation step trains on them."""
  sample = sampling.generate(ctx.student_graphdef, state['params'], prompt_BxP, prompt_mask_BxP,
                             step_lib.step_rng(state), sampling_cfg)
  batch = sampling.training_batch(prompt_BxP, prompt_mask_BxP, sample, sampling_cfg.pad_id)
  return step_lib.train_step(ctx, state, teacher_params, batch)


def _time_train(setup: Setup, step_fn, inputs: tuple, steps: int, warmup: int) -> dict:
  """Times a donated-state step; records its loss and compiled memory footprint."""
  def call(carry):
    return step_fn(carry[0], setup.teacher_params, *inputs)

  t, (setup.state, metrics) = timing.time_steps(call, (setup.state, None), steps, warmup)
  loss_sum, count = metrics['loss']
  # After a call with these shapes, lowering again reuses the jit's compiled executable.
  compiled = step_fn.lower(setup.state, setup.teacher_params, *inputs).compile()
  return {'timing': t, 'loss': float(loss_sum / count),
          'compiled_bytes': timing.compiled_footprint(compiled)}


def offpolicy_step(setup: Setup, steps: int, warmup: int) -> dict:
  s = setup
  step_fn = jax.jit(lambda st, t, b: step_lib.train_step(s.ctx, st, t, b),
                    in_shardings=(s.shardings, s.teacher_shardings, s.batch_sharding),
                    out_shardings=(s.shardings, None), donate_argnums=(0,))
  out = _time_train(s, step_fn, (s.batch,), steps, warmup)
  shapes = s.shapes
  out['flop'] = flops.distill_step_flops(shapes.teacher, shapes.student, shapes.batch,
                                         shapes.seq_len)
  out['tokens'] = shapes.batch * shapes.seq_len
  return out


def onpolicy_step(setup: Setup, steps: int, warmup: int) -> dict:
  s, shapes = setup, setup.shapes
  fn = functools.partial(onpolicy_train_step, s.ctx, sampling_config(shapes))
  step_fn = jax.jit(fn, in_shardings=(s.shardings, s.teacher_shardings, s.batch_sharding,
                                      s.batch_sharding),
                    out_shardings=(s.shardings, None), donate_argnums=(0,))
  out = _time_train(s, step_fn, (s.prompt_BxP, s.prompt_mask_BxP), steps, warmup)
  out['flop'] = (flops.generate_flops(shapes.student, shapes.batch, shapes.prompt_len,
                                      shapes.completion_len)
                 + flops.distill_step_flops(shapes.teacher, shapes.student, shapes.batch,
                                            shapes.seq_len))
  out['tokens'] = shapes.batch * shapes.seq_len
  return out


def generate(setup: Setup, steps: int, warmup: int) -> dict:
  s, shapes = setup, setup.shapes
  generate_fn = sampling.make_generate_fn(s.ctx.student_graphdef, sampling_config(shapes))
  params = s.state['params']
  # Keys are split up front so that no eager op runs between timed calls.
  keys = iter(list(jax.random.split(jax.random.PRNGKey(1), steps + warmup + 2)))

  def call(_):
    return generate_fn(params, s.prompt_BxP, s.prompt_mask_BxP, next(keys))

  t, sample = timing.time_steps(call, None, steps, warmup)
  generated = int(sample['mask_BxN'].sum())
  if generated != shapes.batch * shapes.completion_len:
    raise RuntimeError(f'generate stopped early: {generated} tokens, expected '
                       f'{shapes.batch * shapes.completion_len} (eos_id must be None)')
  compiled = generate_fn.lower(params, s.prompt_BxP, s.prompt_mask_BxP, next(keys)).compile()
  return {'timing': t, 'tokens': generated, 'compiled_bytes': timing.compiled_footprint(compiled),
          'flop': flops.generate_flops(shapes.student, shapes.batch, shapes.prompt_len,
                                       shapes.completion_len)}


def loss_memory(shapes: Shapes, chunk_size: int, dtype: str) -> dict:
  """XLA's memory analysis of value-and-grad of the JSD loss, plain vs chunked (compile only)."""
  m = shapes.memory
  plain_fn, chunked_fn, abstract_args = loss_bench.make_value_and_grad_fns(
      m['batch'], m['seq'], m['hidden'], m['vocab'], chunk_size, token_fn=jsd_token_fn(),
      dtype=jnp.dtype(dtype))
  plain = loss_bench.compiled_memory(plain_fn, abstract_args)
  chunked = loss_bench.compiled_memory(chunked_fn, abstract_args)
  return {'chunked_peak_bytes': chunked['total'], 'plain_peak_bytes': plain['total'],
          'peak_ratio': chunked['total'] / plain['total'],
          'chunked_temp_bytes': chunked['temp'], 'plain_temp_bytes': plain['temp'],
          'temp_ratio': chunked['temp'] / plain['temp'], 'memory_chunk_size': chunk_size,
          'memory_shape': {k: m[k] for k in ('batch', 'seq', 'hidden', 'vocab')}}
