"""Device mesh from config and the logical-axis → mesh-axis rules.

Model code names logical axes ('batch', 'embed', 'mlp', 'heads', 'vocab', ...); only the
rules below (overridable from the config) decide which mesh axis shards each of them.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

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


LOGICAL_AXES = tuple(name for name, _ in DEFAULT_RULES)


def _axes(value, where: str) -> tuple[str, ...]:
  """'data,fsdp' (or a sequence of names) → mesh axes; '' = not sharded."""
  axes = tuple(a.strip() for a in value.split(',') if a.strip()) if isinstance(value, str) \
      else tuple(value)
  unknown = [a for a in axes if a not in MESH_AXES]
  if unknown or len(set(axes)) != len(axes):
    raise ValueError(f'{where}={value!r}: mesh axes must be distinct names of {MESH_AXES} '
                     f'(comma-separated; \'\' = not sharded)')
  return axes


def rules_with(overrides: Mapping[str, Any] | None, base=DEFAULT_RULES, *,
               where: str = 'config.mesh.rules') -> tuple[tuple[str, Any], ...]:
  """`base` with the logical axes named in `overrides` re-mapped; None keeps base's mapping."""
  table = dict(base)
  for logical, value in dict(overrides or {}).items():
    if logical not in table:
      raise ValueError(f'{where}.{logical}: unknown logical axis; valid: {", ".join(table)}')
    if value is not None:
      table[logical] = _axes(value, f'{where}.{logical}') or None
  return tuple(table.items())


def student_rules(config):
  """The student's rules: DEFAULT_RULES with config.mesh.rules applied."""
  return rules_with(config.mesh.get('rules'))


def teacher_rules(config):
  """The teacher's rules: the student's with config.teacher.sharding applied, so a large
  teacher can be sharded (e.g. over fsdp and tensor) while the student is data-parallel."""
  return rules_with(config.teacher.get('sharding'), student_rules(config),
                    where='config.teacher.sharding')


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """Resolves the configured axis sizes; one axis may be -1 ('all remaining devices').

  Sizes whose product is below the device count (none -1) select a prefix of the
  devices, e.g. data=1 for a single-device run on a multi-device host.
  """
  sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
  # Keys of config.mesh that are not axis sizes.
  unknown = set(mesh_config.keys()) - set(MESH_AXES) - {'rules', 'device_memory_gb'}
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
  if jax.process_count() > 1 and int(np.prod(shape)) != len(devices):
    # A prefix of the devices would leave some processes without any.
    raise ValueError(f'mesh: axes {dict(zip(MESH_AXES, shape))} use {int(np.prod(shape))} of '
                     f'the {len(devices)} devices of {jax.process_count()} processes; '
                     'on several processes the mesh must span all of them')
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
