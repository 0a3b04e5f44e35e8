"""Where the time of `offpolicy_step` (and of `generate`) goes: each part jitted and timed alone.

    .venv/bin/python experiments/bench/profile_step.py [--small] [--steps=3] [--out=FILE]

Parts of the step, at the benchmark's shapes (README.md), built from the same framework
functions the step calls (model_outputs, the loss's value-and-grad from distill.losses.bench,
the optimiser update): teacher trunk forward, student trunk forward and forward+backward, the loss's
value and gradient w.r.t. the student's hidden states and projection (plain and chunked), the
optimiser update; then the whole step (plain and chunked loss). Sampling: prefill, one decode step, one sampling draw,
and the whole generate call. Prints a table and appends JSON lines to --out.
"""
import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from distill import sampling
from distill.algorithms import divergence, hooks
from distill.bench import cases, flops, timing
from distill.losses import bench as loss_bench
from distill.train import optimizer as opt_lib
from distill.train import step as step_lib


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument('--small', action='store_true')
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--chunk_size', type=int, default=512)
  parser.add_argument('--out', default='')
  args = parser.parse_args(argv)
  env = timing.environment()   # before the run: others may commit meanwhile
  shapes = cases.make_shapes(args.small, 'float32')
  setup = cases.make_setup(shapes, chunk_size=0)
  B, T, P, N = shapes.batch, shapes.seq_len, shapes.prompt_len, shapes.completion_len
  t_cfg, s_cfg = shapes.teacher, shapes.student
  V, Dt, Ds = s_cfg.vocab_size, t_cfg.d_model, s_cfg.d_model
  batch, params = setup.batch, setup.state['params']
  teacher_gd, teacher_params = setup.run.teacher_graphdef, setup.run.teacher_params
  probe = timing.MatmulProbe(shapes.matmul_n, repeats=5)
  matmul = probe.flops()
  # CPU time (all threads) of one matmul: less disturbed by other processes than wall time.
  matmul_cpu_s = probe.seconds(time.process_time)
  rows = []

  def record(name, fn, carry, flop, note=''):
    t, _ = timing.time_steps(fn, carry, args.steps, probe=probe)
    # Against the matmul timed around each call: load drift on a shared machine cancels.
    in_matmuls = statistics.median(s / r for s, r in zip(t.step_s, t.reference_s))
    row = {'part': name, 'step_s_median': t.median_s, 'gflop': flop / 1e9,
           'gflops': flop / t.median_s / 1e9, 'in_matmuls': in_matmuls,
           'peak_fraction': flop / (in_matmuls * probe.flop), 'compile_s': t.compile_s,
           'cpu_s_median': statistics.median(t.cpu_s),
           'cpu_in_matmuls': statistics.median(t.cpu_s) / matmul_cpu_s, 'note': note}
    rows.append(row)
    print(f'{name:26s} {t.median_s * 1e3:8.1f} ms = {in_matmuls:6.2f} matmuls | cpu '
          f'{row["cpu_in_matmuls"]:6.2f} matmuls | {flop / 1e9:6.1f} GFLOP '
          f'{row["gflops"]:6.1f} GFLOP/s ({row["peak_fraction"]:.2f} of matmul) | '
          f'compile {t.compile_s:5.1f} s', flush=True)

  trunk = lambda cfg: flops.forward_flops(cfg, B * T, T, projected=0)
  logits_flop = 2 * B * T * V   # × D: one [B·T, D] @ [D, V] product
  print(f'matmul peak {matmul / 1e9:.1f} GFLOP/s ({matmul_cpu_s:.3f} CPU s); B={B} T={T} V={V}',
        flush=True)

  # ---- what bf16 would buy on this machine (XLA:CPU dot in bf16 vs fp32) --------------------
  n = shapes.matmul_n
  for dtype in (jnp.float32, jnp.bfloat16):
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    mm = jax.jit(jnp.matmul)
    record(f'matmul {n} {jnp.dtype(dtype).name}', lambda _: mm(a, a), None, 2 * n**3)

  # ---- the step's parts ------------------------------------------------------------------
  teacher_fwd = jax.jit(lambda p, b: hooks.model_outputs(teacher_gd, p, b)[0])
  record('teacher trunk fwd', lambda _: teacher_fwd(teacher_params, batch), None, trunk(t_cfg))
  student_fwd = jax.jit(lambda p, b: hooks.model_outputs(setup.graphdef, p, b)[0])
  record('student trunk fwd', lambda _: student_fwd(params, batch), None, trunk(s_cfg))
  cotangent = jax.random.normal(jax.random.PRNGKey(0), (B, T, Ds))
  student_grad = jax.jit(jax.grad(lambda p, b: jnp.vdot(
      hooks.model_outputs(setup.graphdef, p, b)[0], cotangent)))
  record('student trunk fwd+bwd', lambda _: student_grad(params, batch), None, 3 * trunk(s_cfg))

  token_fn = divergence.make_token_fn(cases.bench_config(shapes, 'supervised', 0), True)
  plain_fn, chunked_fn, _ = loss_bench.make_value_and_grad_fns(
      B, T, Ds, V, args.chunk_size, token_fn=token_fn, teacher_hidden=Dt)
  teacher_w = nnx.merge(teacher_gd, teacher_params).output_projection()
  student = nnx.merge(setup.graphdef, params)
  loss_args = (student_fwd(params, batch), student.output_projection(),
               teacher_fwd(teacher_params, batch), teacher_w, batch['targets'],
               batch['loss_mask'])
  # Teacher logits (D_t), student logits (D_s) and their two gradient products (2·D_s).
  loss_flop = logits_flop * (Dt + 3 * Ds)
  record('loss plain v&g', lambda _: plain_fn(*loss_args), None, loss_flop)
  completion_share = N / T
  record(f'loss chunked({args.chunk_size}) v&g', lambda _: chunked_fn(*loss_args), None,
         loss_flop, note=f'computes logits of loss tokens only (~{completion_share:.0%})')

  optimizer = opt_lib.make_optimizer(cases.bench_config(shapes, 'supervised', 0))

  def update(state, grads):
    params, opt_state = step_lib.apply_update(optimizer, grads, state['opt_state'],
                                              state['params'])
    return dict(state, params=params, opt_state=opt_state)

  update = jax.jit(update, donate_argnums=(0,))
  grads = jax.tree.map(jnp.ones_like, params)
  record('optimizer update', lambda c: (update(c[0], grads), None), (setup.state, None), 0,
         note='elementwise: memory bound')
  setup.state = None

  # ---- the whole step, plain and chunked --------------------------------------------------
  step_flop = flops.distill_step_flops(t_cfg, s_cfg, B, T)
  for chunk in (0, args.chunk_size):
    setup = cases.make_setup(shapes, chunk_size=chunk)
    step_fn = cases.algorithm_step_fn(setup, 'supervised')
    teacher_params = setup.run.teacher_params
    record(f'full step (chunk {chunk})',
           lambda c: step_fn(c[0], teacher_params, setup.batch), (setup.state, None), step_flop)

  # ---- sampling ----------------------------------------------------------------------------
  setup = cases.make_setup(shapes, chunk_size=0)
  params = setup.state['params']
  prompt, prompt_mask = setup.batch['tokens'][:, :P], setup.batch['input_mask'][:, :P]

  def prefill(p, prompt, mask):
    model = nnx.merge(setup.graphdef, p)
    return model.prefill(prompt, mask, model.init_cache(B, P + N), last_only=True)

  prefill_fn = jax.jit(prefill)
  logits, cache = prefill_fn(params, prompt, prompt_mask)
  record('prefill', lambda _: prefill_fn(params, prompt, prompt_mask), None,
         flops.forward_flops(s_cfg, B * P, P + N, projected=B))
  decode_fn = jax.jit(lambda p, tok, cache: nnx.merge(setup.graphdef, p).decode_step(tok, cache))
  token = jnp.zeros((B, 1), jnp.int32)
  record('decode step', lambda _: decode_fn(params, token, cache), None,
         flops.forward_flops(s_cfg, B, P + N))
  project = jax.jit(lambda p, h: nnx.merge(setup.graphdef, p).logits(h))
  h_BxD = jnp.ones((B, s_cfg.d_model), jnp.float32)
  record('decode output projection', lambda _: project(params, h_BxD), None, 2 * B * Ds * V,
         note='reads the [D, V] projection for B rows')
  cfg = cases.sampling_config(shapes)
  draw = jax.jit(lambda rng, logits: sampling.sample_from_logits(rng, logits, cfg))
  record('sample_from_logits', lambda _: draw(jax.random.PRNGKey(0), logits), None, 0)
  generate_fn = sampling.make_generate_fn(setup.graphdef, cfg)
  record(f'generate ({N} tokens)',
         lambda _: generate_fn(params, prompt, prompt_mask, jax.random.PRNGKey(0)), None,
         flops.generate_flops(s_cfg, B, P, N))

  if args.out:
    with open(args.out, 'a') as f:
      for row in rows:
        f.write(json.dumps({**row, 'small': args.small, **env}) + '\n')


if __name__ == '__main__':
  main(sys.argv[1:])
