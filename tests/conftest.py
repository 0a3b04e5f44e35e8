"""Every test process sees 8 fake CPU devices, so sharding tests need no special runner.

The CLI runs the tests start share one persistent compilation cache per session
(tests/helpers.cli_env); the directory is made here, in the process that starts the xdist
workers, so that they all inherit it.
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('WANDB_MODE', 'disabled')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if 'DISTILL_TEST_COMPILE_CACHE' not in os.environ:   # the first process of the session
  os.environ['DISTILL_TEST_COMPILE_CACHE'] = tempfile.mkdtemp(prefix='distill-jax-cache-')
  atexit.register(shutil.rmtree, os.environ['DISTILL_TEST_COMPILE_CACHE'], ignore_errors=True)
