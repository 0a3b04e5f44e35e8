"""Timing primitives of the benchmark: step timer with compile counting, matmul peak, versions."""
from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import subprocess
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

# jax records one such event per XLA compilation (jax._src.dispatch.BACKEND_COMPILE_EVENT).
_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'
_compiles = 0


def _on_event(event: str, duration_secs: float, **kwargs) -> None:
  global _compiles
  if event == _COMPILE_EVENT:
    _compiles += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


def compile_count() -> int:
  """XLA compilations so far in this process (any function, including eager ops)."""
  return _compiles


class MatmulProbe:
  """The machine's practical peak: a jitted fp32 n×n×n matmul, compiled once, timed on demand.

  Timed right next to the steps it normalises, so that load drifting on a shared machine
  affects both sides of the ratio alike.
  """

  def __init__(self, n: int = 2048, repeats: int = 3):
    self.flop = 2 * n**3
    self.repeats = repeats
    self._a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    self._b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    self._matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(self._matmul(self._a, self._b))

  def seconds(self, clock=time.perf_counter) -> float:
    """Median seconds of `repeats` matmuls (wall clock, or e.g. time.process_time)."""
    times = []
    for _ in range(self.repeats):
      start = clock()
      jax.block_until_ready(self._matmul(self._a, self._b))
      times.append(clock() - start)
    return statistics.median(times)

  def flops(self) -> float:
    return self.flop / self.seconds()


@dataclasses.dataclass(frozen=True)
class Timing:
  compile_s: float          # the first call, compilation included
  step_s: list[float]       # each timed call, after the warm-up calls
  compiles_during_timed: int
  reference_s: list[float] | None = None   # per timed call: the probe's time around it
  cpu_s: list[float] | None = None         # per timed call: this process's CPU time (all threads)

  @property
  def median_s(self) -> float:
    return statistics.median(self.step_s)


def time_steps(step: Callable[[Any], Any], carry: Any, steps: int, warmup: int = 1,
               probe: MatmulProbe | None = None) -> tuple[Timing, Any]:
  """Times `carry = step(carry)`: one compiling call, `warmup` more, then `steps` timed ones.
  Returns the timing and the last carry.

  Each call is waited for (block_until_ready on everything it returns) before the clock
  stops, so asynchronous dispatch cannot hide work. Threading the carry lets a step donate it.
  With a probe, the matmul is timed before the first and after every timed call, and each
  call's reference is the mean of the probe times just before and after it.
  """
  start = time.perf_counter()
  carry = jax.block_until_ready(step(carry))
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    carry = jax.block_until_ready(step(carry))
  probes = [probe.seconds()] if probe else []
  before = compile_count()
  times, cpu = [], []
  for _ in range(steps):
    start, start_cpu = time.perf_counter(), time.process_time()
    carry = jax.block_until_ready(step(carry))
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
    if probe:
      probes.append(probe.seconds())
  compiles = compile_count() - before
  reference = [(a + b) / 2 for a, b in zip(probes, probes[1:])] if probe else None
  return Timing(compile_s, times, compiles, reference, cpu), carry


def _git_commit() -> str | None:
  try:
    # '-dirty' when tracked files differ from the commit (shared checkouts often do).
    out = subprocess.run(['git', 'describe', '--always', '--dirty'], capture_output=True,
                         text=True, timeout=10, cwd=os.path.dirname(os.path.abspath(__file__)))
    return out.stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def environment() -> dict:
  """Software versions and the device, for every result line."""
  device = jax.devices()[0]
  return {
      'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'flax': flax.__version__,
      'optax': optax.__version__, 'numpy': np.__version__, 'python': platform.python_version(),
      'platform': device.platform, 'device_kind': device.device_kind,
      'machine': platform.processor() or platform.machine(), 'git_commit': _git_commit(),
  }


def device_peak_memory() -> int | None:
  """The allocator's peak bytes in use on device 0, where the backend reports it (not CPU)."""
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get('peak_bytes_in_use')


def compiled_footprint(compiled) -> int:
  """Arguments + outputs + temporaries of a compiled executable, donated buffers counted once."""
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)
