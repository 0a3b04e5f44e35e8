"""Device mesh from config and the logical-axis → mesh-axis rules.

Model code names logical axes ('batch', 'embed', 'mlp', 'heads', 'vocab', ...); only the
rules below (overridable from the config) decide which mesh axis shards each of them.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical axis → mesh axes. Batch is split over every data-like axis; weights are split
# over 'fsdp' along their embedding dimension and over 'tensor' along heads/mlp/vocab.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('vocab', 'tensor'),
    ('layers', None),
    ('head_dim', None),
    ('length', None),
    ('cache_seq', None),
)


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """Resolves the configured axis sizes; one axis may be -1 ('all remaining devices').

  Sizes whose product is below the device count (none -1) select a prefix of the
  devices, e.g. data=1 for a single-device run on a multi-device host.
  """
  sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
  unknown = set(mesh_config.keys()) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'mesh: unknown axes {sorted(unknown)}; valid axes are {MESH_AXES}')
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}')
  fixed = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % fixed:
      raise ValueError(f'mesh: {num_devices} devices do not divide into fixed axes of size {fixed}')
    sizes[sizes.index(-1)] = num_devices // fixed
  if int(np.prod(sizes)) > num_devices:
    raise ValueError(
        f'mesh: axes {dict(zip(MESH_AXES, sizes))} need {int(np.prod(sizes))} devices, '
        f'but {num_devices} are available')
  return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over all devices; fully explicit sizes may use only the first N of them."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  used = devices[:int(np.prod(shape))]
  return Mesh(np.asarray(used).reshape(shape), MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape['data'] * mesh.shape['fsdp']


def logical_to_mesh_spec(logical: Iterable[str | None], rules=DEFAULT_RULES) -> P:
  """Maps a tuple of logical axis names to a PartitionSpec; a mesh axis is used once."""
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in logical:
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*out)


def _fits(shape: tuple[int, ...], spec: P, mesh: Mesh) -> P:
  """Drops sharding on dimensions the mesh axes do not divide (tiny test models)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    fitted.append(axes if size > 1 and dim % size == 0 else None)
  return P(*fitted)


def named_sharding(shape, logical, mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, _fits(tuple(shape), logical_to_mesh_spec(logical, rules), mesh))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, P(('data', 'fsdp'), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
