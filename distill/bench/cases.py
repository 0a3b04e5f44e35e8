"""The benchmark's cases (experiments/bench/README.md), each built from the framework's code paths.

The steps are the registered methods' steps, built by the trainer's own step builder
(`distill.train.step.make_step`: state from `create_train_state`, donated):
`offpolicy_step` is 'supervised' (dataset rows × the divergence objective), `onpolicy_step`
is 'gkd' with lmbda=1 (the student samples inside the jitted step, then the same objective).
`generate` is `distill.sampling.make_generate_fn`; the loss-memory figures come from
`distill.losses.bench`. Every case returns a dict of measured fields for `distill.bench.cli`.
"""
from __future__ import annotations

import dataclasses
import types

import jax
import jax.numpy as jnp

from distill import sampling
from distill.algorithms import divergence
from distill.bench import flops, timing
from distill.losses import bench as loss_bench
from distill.models import ModelConfig, get_preset, sharded
from distill.parallel import mesh as mesh_lib
from distill.train import config as config_lib
from distill.train import optimizer as opt_lib
from distill.train import run as run_lib
from distill.train import state as state_lib
from distill.train import step as step_lib
from distill.train import trainer

# Random weights and token ids need no tokenizer; no EOS id means no early stop, so every
# row samples all completion tokens, as the benchmark specifies.
_NO_EOS_TOKENIZER = types.SimpleNamespace(eos_id=None, pad_id=0)


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
  """The benchmark's shapes, or (small) tiny ones of the same structure for the harness test."""
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


def bench_config(shapes: Shapes, algorithm: str, chunk_size: int):
  """The experiment config of a benchmark run: JSD(0.5) at temperature 1, no CE, AdamW."""
  c = config_lib.base_config()
  c.data.batch_size = shapes.batch
  c.task.prompt_len, c.task.completion_len = shapes.prompt_len, shapes.completion_len
  c.loss.divergence, c.loss.kd_weight, c.loss.ce_weight = 'jsd', 1.0, 0.0
  c.loss.temperature, c.loss.chunk_size = 1.0, chunk_size
  c.algorithm.name = algorithm
  with c.unlocked():
    c.loss.hparams.beta = 0.5
    if algorithm == 'gkd':   # always on-policy, sampling from the plain model distribution
      c.algorithm.kwargs.update(lmbda=1.0, seq_kd=False, temperature=1.0, top_k=0, top_p=1.0)
  return c


def sampling_config(shapes: Shapes) -> sampling.SamplingConfig:
  """The benchmark's sampling: temperature 1, no early stop."""
  return sampling.SamplingConfig(max_new_tokens=shapes.completion_len, temperature=1.0,
                                 eos_id=None, pad_id=_NO_EOS_TOKENIZER.pad_id)


@dataclasses.dataclass
class Setup:
  """Teacher, student train state and data shared by the step and sampling cases."""
  shapes: Shapes
  chunk_size: int
  run: run_lib.Run          # what methods read: teacher, tokenizer, model configs, mesh
  graphdef: object
  state: dict               # replaced by each case that donates it
  shardings: dict
  batch_sharding: jax.sharding.NamedSharding
  batch: dict               # rows: random prompt + random completion


def make_setup(shapes: Shapes, chunk_size: int, seed: int = 0) -> Setup:
  # One device: the benchmark's figures are per chip, and its batch is the whole batch.
  mesh = mesh_lib.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1})
  rng_teacher, rng_student, rng_prompt, rng_completion = jax.random.split(
      jax.random.PRNGKey(seed), 4)
  config = bench_config(shapes, 'supervised', chunk_size)
  teacher_graphdef, _ = sharded.abstract_model(shapes.teacher)
  teacher_params = sharded.init_params(shapes.teacher, rng_teacher, mesh)
  run = run_lib.Run(config, workdir='', tokenizer=_NO_EOS_TOKENIZER, task=None, mesh=mesh,
                    model_config=shapes.student, teacher_graphdef=teacher_graphdef,
                    teacher_params=teacher_params, teacher_config=shapes.teacher)
  # Both benchmarked methods keep no state of their own, so one state serves both.
  optimizer = opt_lib.make_optimizer(config)
  method = trainer.make_method(run)
  state, shardings, graphdef = state_lib.create_train_state(
      shapes.student, optimizer, rng_student, mesh,
      algo_state_fn=lambda: method.init_state(optimizer))
  B, P, N, V = shapes.batch, shapes.prompt_len, shapes.completion_len, shapes.student.vocab_size
  prompt = jax.random.randint(rng_prompt, (B, P), 0, V, jnp.int32)
  completion = {'tokens_BxN': jax.random.randint(rng_completion, (B, N), 0, V, jnp.int32),
                'mask_BxN': jnp.ones((B, N), jnp.int32)}
  batch = sampling.training_batch(prompt, jnp.ones((B, P), jnp.int32), completion, pad_id=0)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  return Setup(shapes, chunk_size, run, graphdef, state, shardings, batch_sharding,
               jax.device_put(batch, batch_sharding))


def algorithm_step_fn(setup: Setup, name: str):
  """The method's step, built and jitted by the trainer's step builder (state donated)."""
  config = bench_config(setup.shapes, name, setup.chunk_size)
  run = dataclasses.replace(setup.run, config=config)
  method = trainer.make_method(run)
  if name == 'gkd' and method.rows.sampling != sampling_config(setup.shapes):
    raise RuntimeError(f'gkd samples with {method.rows.sampling}, not the benchmark\'s '
                       f'{sampling_config(setup.shapes)}')
  return step_lib.make_step(config, run, method, setup.graphdef, setup.shardings,
                            opt_lib.make_optimizer(config))


def _time_train(setup: Setup, algorithm: str, steps: int, warmup: int, probe=None) -> dict:
  """Times a donated-state step; records its loss and compiled memory footprint."""
  step_fn = algorithm_step_fn(setup, algorithm)
  teacher = setup.run.teacher_params

  def call(carry):
    return step_fn(carry[0], teacher, setup.batch)

  t, (setup.state, metrics) = timing.time_steps(call, (setup.state, None), steps, warmup,
                                                probe)
  loss_sum, count = metrics['loss']
  # After a call with these shapes, lowering again reuses the jit's compiled executable.
  compiled = step_fn.lower(setup.state, teacher, setup.batch).compile()
  shapes = setup.shapes
  return {'timing': t, 'loss': float(loss_sum / count), 'tokens': shapes.batch * shapes.seq_len,
          'compiled_bytes': timing.compiled_footprint(compiled),
          'flop': flops.distill_step_flops(shapes.teacher, shapes.student, shapes.batch,
                                           shapes.seq_len)}


def offpolicy_step(setup: Setup, steps: int, warmup: int, probe=None) -> dict:
  return _time_train(setup, 'supervised', steps, warmup, probe)


def onpolicy_step(setup: Setup, steps: int, warmup: int, probe=None) -> dict:
  out = _time_train(setup, 'gkd', steps, warmup, probe)
  shapes = setup.shapes
  out['flop'] += flops.generate_flops(shapes.student, shapes.batch, shapes.prompt_len,
                                      shapes.completion_len)
  return out


def generate(setup: Setup, steps: int, warmup: int, probe=None) -> dict:
  """The student's sampling alone: the batch's prompts completed by `make_generate_fn`."""
  shapes, P = setup.shapes, setup.shapes.prompt_len
  generate_fn = sampling.make_generate_fn(setup.graphdef, sampling_config(shapes))
  params = setup.state['params']
  prompt_BxP, prompt_mask_BxP = setup.batch['tokens'][:, :P], setup.batch['input_mask'][:, :P]
  # Keys are split up front so that no eager op runs between timed calls.
  keys = iter(list(jax.random.split(jax.random.PRNGKey(1), steps + warmup + 2)))

  def call(_):
    return generate_fn(params, prompt_BxP, prompt_mask_BxP, next(keys))

  t, sample = timing.time_steps(call, None, steps, warmup, probe)
  generated = int(sample['mask_BxN'].sum())
  if generated != shapes.batch * shapes.completion_len:
    raise RuntimeError(f'generate stopped early: {generated} tokens, expected '
                       f'{shapes.batch * shapes.completion_len} (eos_id must be None)')
  compiled = generate_fn.lower(params, prompt_BxP, prompt_mask_BxP, next(keys)).compile()
  return {'timing': t, 'tokens': generated, 'compiled_bytes': timing.compiled_footprint(compiled),
          'flop': flops.generate_flops(shapes.student, shapes.batch, P, shapes.completion_len)}


def loss_memory(shapes: Shapes, chunk_size: int, dtype: str) -> dict:
  """XLA's memory analysis of value-and-grad of the JSD loss, plain vs chunked (compile only)."""
  m = shapes.memory
  plain_fn, chunked_fn, abstract_args = loss_bench.make_value_and_grad_fns(
      m['batch'], m['seq'], m['hidden'], m['vocab'], chunk_size,
      token_fn=divergence.make_token_fn(bench_config(shapes, 'supervised', chunk_size), True),
      dtype=jnp.dtype(dtype))
  plain = loss_bench.compiled_memory(plain_fn, abstract_args)
  chunked = loss_bench.compiled_memory(chunked_fn, abstract_args)
  return {'chunked_peak_bytes': chunked['total'], 'plain_peak_bytes': plain['total'],
          'peak_ratio': chunked['total'] / plain['total'],
          'chunked_temp_bytes': chunked['temp'], 'plain_temp_bytes': plain['temp'],
          'temp_ratio': chunked['temp'] / plain['temp'], 'memory_chunk_size': chunk_size,
          'memory_shape': {k: m[k] for k in ('batch', 'seq', 'hidden', 'vocab')}}
