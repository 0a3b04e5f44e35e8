"""Evidence for the equivalent survivors: the losses' values and gradients, bit for bit.

    python -m experiments.mutation.equivalence [ID ...]   # default: every id in EQUIVALENT

Both equivalent survivors drop the zeroing of targets at masked positions. The probe computes
cross-entropy, the plain loss, the chunked loss (with and without a gradient) and their
gradients with the masked positions' targets set to -100, 0, V + 5 and an in-range id, and
prints a digest of every value and gradient. It runs in a worktree of HEAD without the mutant,
then with each mutant; the output must be identical.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

from experiments.mutation import run
from experiments.mutation.mutants import EQUIVALENT, MUTANTS


def probe() -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np

  import distill.losses as L
  rng = np.random.default_rng(0)
  B, T, D, D_T, V = 2, 7, 4, 6, 13
  h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
  teacher_h = jnp.asarray(rng.normal(size=(B, T, D_T)), jnp.float32)
  teacher_w = jnp.asarray(rng.normal(size=(D_T, V)), jnp.float32)
  weights = np.ones((B, T), np.float32)
  weights[0, :4], weights[1, 3], weights[1, 5] = 0.0, 0.5, 0.0
  weights = jnp.asarray(weights)
  token_fn = L.token_objective(ce_weight=0.5)
  for masked_target in (-100, 0, V + 5, 7):
    targets = jnp.where(weights > 0, jnp.asarray(rng.integers(0, V, (B, T))), masked_target)
    forms = {
        'cross_entropy': lambda h, w: jnp.sum(L.cross_entropy(h @ w, targets, weights)),
        'plain': lambda h, w: L.plain_loss(h, w, teacher_h, teacher_w, targets, weights,
                                           token_fn)[0],
        'chunked': lambda h, w: L.chunked_loss(h, w, teacher_h, teacher_w, targets, weights,
                                               token_fn, chunk_size=4)[0],
    }
    for name, fn in forms.items():
      value, grads = jax.jit(jax.value_and_grad(fn, (0, 1)))(h, w)
      value_only = jax.jit(fn)(h, w)   # the chunked form's value-only scan
      arrays = [np.asarray(x) for x in (value, value_only, *grads)]
      digest = hashlib.sha256(b''.join(x.tobytes() for x in arrays)).hexdigest()[:16]
      print(f'masked target {masked_target:4d} {name:13s} {digest} '
            f'finite={all(np.isfinite(x).all() for x in arrays)}')


def _probe_output(tree) -> str:
  proc = subprocess.run([sys.executable, '-m', 'experiments.mutation.equivalence', '--probe'],
                        cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)), check=True,
                        capture_output=True, text=True)
  return proc.stdout


def main(ids) -> None:
  mutants = [m for m in MUTANTS if m.id in (ids or EQUIVALENT)]
  tree = run._worktree()
  try:
    reference = _probe_output(tree)
    print(reference, end='')
    for m in mutants:
      path = tree / m.path
      original = path.read_text()
      path.write_text(run.apply(m, original))
      run._drop_bytecode(path)
      try:
        same = _probe_output(tree) == reference
      finally:
        path.write_text(original)
        run._drop_bytecode(path)
      print(f'{m.id}: {"identical" if same else "DIFFERENT"}')
  finally:
    run.remove_worktree(tree)


if __name__ == '__main__':
  if sys.argv[1:] == ['--probe']:
    probe()
  else:
    main(sys.argv[1:])
