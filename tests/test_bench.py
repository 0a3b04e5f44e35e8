"""The benchmark harness: FLOP convention against the models' own parameter trees, the device
peak table, the step timer's compile counting, and every case run once at tiny shapes."""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distill.bench import cli, flops, timing
from distill.bench.cases import make_shapes
from distill.models import Transformer, get_preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _matrix_params_from_model(cfg):
  """Independent count: entries of every ≥2-D parameter except the input embedding."""
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  matrices = sum(math.prod(v.shape) for path, v in flat
                 if path[-1] != 'embed' and len(v.shape) - (path[0] == 'layers') >= 2)
  return matrices


@pytest.mark.parametrize('name', ['bench-teacher', 'bench-student', 'tiny'])
def test_forward_flops_follow_the_convention(name):
  cfg = get_preset(name, vocab_size=32768 if name.startswith('bench') else 96)
  with_output = _matrix_params_from_model(cfg)   # includes the untied output projection
  assert flops.weight_matrix_params(cfg) + cfg.d_model * cfg.vocab_size == with_output
  tokens, seq = 3 * 17, 17
  attention = 4 * cfg.n_layers * seq * cfg.d_model * tokens
  assert flops.forward_flops(cfg, tokens, seq) == 2 * with_output * tokens + attention


def test_benchmark_md_totals():
  teacher, student = make_shapes(False, 'float32').teacher, make_shapes(False, 'float32').student
  # The totals of experiments/bench/README.md by hand: teacher 8 layers of 4·512² + 3·512·1536,
  # student 4 of 4·256² + 3·256·768.
  teacher_fwd = 2 * (8 * (4 * 512**2 + 3 * 512 * 1536) + 512 * 32768) + 4 * 8 * 256 * 512
  student_fwd = 2 * (4 * (4 * 256**2 + 3 * 256 * 768) + 256 * 32768) + 4 * 4 * 256 * 256
  assert flops.distill_step_flops(teacher, student, 8, 256) == 8 * 256 * (
      teacher_fwd + 3 * student_fwd)
  # Generation: 8×64 prefill tokens (8 projected) + 8×192 decoded, all attending to 256 slots.
  per_token_no_proj = 2 * 4 * (4 * 256**2 + 3 * 256 * 768) + 4 * 4 * 256 * 256
  expected = (8 * 256 * per_token_no_proj + (8 + 8 * 192) * 2 * 256 * 32768)
  assert flops.generate_flops(student, 8, 64, 192) == expected


@pytest.mark.parametrize('kind,dtype,peak', [
    ('NVIDIA H100 80GB HBM3', 'bfloat16', 989e12), ('NVIDIA H100 PCIe', 'bfloat16', 756e12),
    ('NVIDIA H200', 'float32', 494e12), ('NVIDIA A100-SXM4-40GB', 'bfloat16', 312e12),
    ('TPU v4', 'bfloat16', 275e12), ('TPU v5 lite', 'bfloat16', 197e12),
    ('TPU v5', 'bfloat16', 459e12), ('TPU v6 lite', 'bfloat16', 918e12), ('cpu', 'float32', None),
])
def test_device_peak_table(kind, dtype, peak):
  assert flops.device_peak_flops(kind, dtype) == peak


def test_time_steps_counts_recompilations_and_threads_the_carry():
  double = jax.jit(lambda x: 2 * x)
  t, out = timing.time_steps(double, jnp.ones(3), steps=3, warmup=1)
  np.testing.assert_array_equal(out, 2.0**5 * np.ones(3))   # 1 + 1 warm-up + 3 timed calls
  assert t.compiles_during_timed == 0 and len(t.step_s) == 3 and t.median_s > 0
  # A new shape every call forces a compilation every call.
  grow = jax.jit(lambda x: jnp.concatenate([x, x[:1]]))
  t, out = timing.time_steps(grow, jnp.ones(1), steps=2, warmup=0)
  assert out.shape == (4,) and t.compiles_during_timed == 2


def test_bad_flags_fail_before_anything_runs(capsys):
  for argv, message in ((['--cases=offpolicy_step,bogus'], 'valid cases'),
                        (['--steps=0'], '--steps'), (['--dtype=float16'], '--dtype')):
    with pytest.raises(SystemExit):
      cli.parse_args(argv)
    assert message in capsys.readouterr().err


def test_every_case_runs_once_in_small_mode(tmp_path):
  out = tmp_path / 'bench.jsonl'
  # Its own process: one device without the suite's 8 fake ones, and unoptimised XLA codegen
  # to keep compilation (most of this test's time) short; the harness logic is the same.
  env = dict(os.environ, XLA_FLAGS='--xla_backend_optimization_level=0', JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, '-m', 'distill.bench', '--small', '--steps=1', '--warmup=0',
       '--chunk_size=16', f'--out={out}'], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stderr
  rows = [json.loads(line) for line in proc.stdout.splitlines()]
  assert rows == [json.loads(line) for line in out.read_text().splitlines()]
  by_case = {row['case']: row for row in rows}
  assert list(by_case) == list(cli.CASES)

  import flax, optax   # noqa: E401
  shapes = make_shapes(True, 'float32')
  for row in rows:
    assert row['jax'] == jax.__version__ and row['flax'] == flax.__version__
    assert row['optax'] == optax.__version__ and row['numpy'] == np.__version__
    assert row['python'] and row['jaxlib'] and row['device_kind'] == 'cpu'
    assert row['small'] and row['dtype'] == 'float32'

  for case in ('offpolicy_step', 'onpolicy_step', 'generate'):
    row = by_case[case]
    assert row['step_s'] == [row['step_s_median']] and row['step_s_median'] > 0
    assert row['compile_s'] > row['step_s_median']
    assert row['compiles_during_timed'] == 0
    assert row['gflops'] == pytest.approx(row['gflop_per_step'] / row['step_s_median'])
    assert row['matmul_peak_gflops'] > 0 and row['step_in_matmuls'] > 0
    assert row['peak_fraction'] == pytest.approx(row['gflops'] / row['matmul_peak_gflops'])
    assert row['mfu'] is None   # CPU: no data-sheet peak
    assert row['peak_mem_source'] == 'xla_memory_analysis' and row['peak_mem_bytes'] > 0

  train_tokens = shapes.batch * shapes.seq_len
  step_gflop = flops.distill_step_flops(shapes.teacher, shapes.student, shapes.batch,
                                        shapes.seq_len) / 1e9
  gen_gflop = flops.generate_flops(shapes.student, shapes.batch, shapes.prompt_len,
                                   shapes.completion_len) / 1e9
  off, on, gen = by_case['offpolicy_step'], by_case['onpolicy_step'], by_case['generate']
  assert off['gflop_per_step'] == pytest.approx(step_gflop)
  assert on['gflop_per_step'] == pytest.approx(step_gflop + gen_gflop)
  assert gen['gflop_per_step'] == pytest.approx(gen_gflop)
  for row in (off, on):
    assert row['tokens_per_s'] == pytest.approx(train_tokens / row['step_s_median'])
    # JSD(0.5) of two random models is small but positive and finite (bounded by log 2).
    assert 0 < row['loss'] < math.log(2)
  assert gen['tokens_per_s'] == pytest.approx(
      shapes.batch * shapes.completion_len / gen['step_s_median'])
  assert on['ratio_to_offpolicy_s'] == pytest.approx(on['step_s_median'] / off['step_s_median'])
  assert on['ratio_to_offpolicy'] == pytest.approx(on['step_in_matmuls'] / off['step_in_matmuls'])

  mem = by_case['loss_memory']
  assert 0 < mem['chunked_peak_bytes'] < mem['plain_peak_bytes']
  assert mem['peak_ratio'] == pytest.approx(mem['chunked_peak_bytes'] / mem['plain_peak_bytes'])
  assert 0 < mem['temp_ratio'] < 1
