"""`--import=MODULE_OR_FILE.py`: a researcher's own divergences and methods, loaded by name.

    # my_losses.py
    import jax.numpy as jnp
    from distill import losses
    def hellinger(lq, lp):   # log-probs over the vocabulary axis -> per-token values
      return jnp.sum((jnp.exp(lp / 2) - jnp.exp(lq / 2)) ** 2, axis=-1)
    losses.register('hellinger', hellinger)

    python -m distill.main --import=my_losses.py --config.loss.divergence=hellinger ...

Every CLI imports these before it resolves the config, so the names they register are
valid config values. A file is imported under its stem as the module name; anything else
is a module name on sys.path.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback


def import_plugin(spec: str):
  """Imports a module name or a .py file; errors name the file (and line) that failed."""
  if spec.endswith('.py') or os.sep in spec:
    path = os.path.abspath(spec)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'--import={spec}: no such file {path}')
    name = os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
      module_spec.loader.exec_module(module)
    except Exception as e:   # the user's code: report where it failed, not our frames
      del sys.modules[name]
      raise ImportError(f'--import={spec} failed: {_where(e, path)}'
                        f'{type(e).__name__}: {e}') from e
    return module
  try:
    return importlib.import_module(spec)
  except ModuleNotFoundError as e:
    if e.name == spec or spec.startswith(f'{e.name}.'):
      raise ImportError(f'--import={spec}: no module named {spec!r} (give a module on '
                        'sys.path or a path to a .py file)') from e
    raise ImportError(f'--import={spec} failed: {_where(e)}{type(e).__name__}: {e}') from e
  except Exception as e:
    raise ImportError(f'--import={spec} failed: {_where(e)}{type(e).__name__}: {e}') from e


def _where(error: Exception, path: str | None = None) -> str:
  """'FILE, line N: ' of the deepest frame in `path` (or, without one, of the deepest frame)."""
  frames = traceback.extract_tb(error.__traceback__)
  if isinstance(error, SyntaxError) and error.filename:
    return f'{error.filename}, line {error.lineno}: '
  if path is not None:
    frames = [f for f in frames if os.path.abspath(f.filename) == path] or frames
  if not frames:
    return ''
  return f'{frames[-1].filename}, line {frames[-1].lineno}: '


def import_all(specs) -> None:
  for spec in specs:
    import_plugin(spec)
