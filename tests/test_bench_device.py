"""`make bench-device` at tiny shapes on CPU, so the one-shot accelerator check cannot rot."""
import json
import os
import subprocess
import sys

from distill.bench import device
from tests.helpers import REPO


def test_bench_device_runs_every_case_in_small_mode():
  # Its own process: one device, and unoptimised XLA codegen for a short compilation.
  env = dict(os.environ, XLA_FLAGS='--xla_backend_optimization_level=0', JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-m', 'distill.bench.device', '--small', '--steps=1',
                         '--warmup=0', '--chunk_size=16'], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  rows = [json.loads(line) for line in proc.stdout.splitlines()]
  assert [(r.get('pair'), r['case']) for r in rows] == [
      (None, case) for case in device.BENCH_CASES] + [
      ('qwen3-1.7b-like -> qwen3-0.6b-like', case) for case in device.PAIR_CASES]
  assert not any('error' in r for r in rows)
  for row in rows:
    assert row['dtype'] == 'bfloat16' and row['small']
  on = rows[-1]
  assert on['ratio_to_offpolicy_s'] == on['step_s_median'] / rows[-2]['step_s_median']
  for row in rows[-2:]:
    assert row['tokens_per_s'] > 0 and row['mfu'] is None    # CPU: no data-sheet peak
    assert row['compiled_mem_bytes'] > 0 and 0 < row['loss']
  # The summary table names the goals beside the figures.
  assert 'MFU >= 45% (H100/H200-class)' in proc.stderr
  assert f'<= 1.5x off-policy step: {on["ratio_to_offpolicy_s"]:.2f}x' in proc.stderr


def test_a_failing_case_is_a_row_of_its_own():
  row = {'case': 'onpolicy_step', 'pair': 'p', 'error': 'XlaRuntimeError: RESOURCE_EXHAUSTED'}
  assert 'failed: XlaRuntimeError: RESOURCE_EXHAUSTED' in device.summary([row])
