"""Quantization-aware distillation: the student's weights as the GGUF file of `config.quant.type`
will hold them, inside the jitted step, with straight-through gradients to fp32 master weights.

    plan = quant_plan(model_config, 'q4_k_m')         # None for ''
    quantized = fake_quantize(plan, params)           # what the GGUF export dequantizes to
    params_for_loss = straight_through(params, quantized)

Every matrix gets the type the GGUF export gives it (distill.models.gguf_export.tensor_type:
llama-quantize's per-tensor mix for the file type, and its fallbacks for rows that do not fit
a block, with the same TypeFallbackWarning); 1-D parameters (norms, biases) stay float32 as
they are written. A GGUF row is HF's [out, in] row, so blocks run along the framework's input
axis (axis -2 of a transposed [in, out] kernel, -1 of the embedding). All blocks of one type, from
every tensor, are quantized in one call of distill.quant.blocks, so the step compiles each
type's quantizer once.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from distill.models import gguf_arch, gguf_export, hf
from distill.models.config import ModelConfig
from distill.quant import blocks

Q = gguf.GGMLQuantizationType
# config.quant.type: '' (no QAD) or a GGUF file type of the export.
QUANT_TYPES = tuple(gguf_export.FILE_TYPES)


def check_type(name: str) -> str:
  """The export's file-type key of config.quant.type ('' = off), or an error naming the known."""
  if not name:
    return ''
  if name.lower() not in QUANT_TYPES:
    raise ValueError(f'config.quant.type: unknown GGUF type {name!r}; known: '
                     f'{", ".join(QUANT_TYPES)} (or \'\' for no quantization-aware training)')
  return name.lower()


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """How one parameter is quantized: per group of layers (all of them: layers None), a type."""
  path: tuple[str, ...]
  rows_on_last_axis: bool        # False: the GGUF row is the framework's axis -2
  groups: tuple[tuple[Q, tuple[int, ...] | None], ...]


def quant_plan(cfg: ModelConfig, quant_type: str) -> tuple[LeafPlan, ...] | None:
  """The per-parameter types of `cfg`'s GGUF export as `quant_type` (None when '')."""
  file_type = check_type(quant_type)
  if not file_type:
    return None
  arch = gguf_arch.default_arch(cfg)
  gguf_arch.check(cfg, arch)
  if gguf_arch.query_rescale(cfg, arch) != 1.0 and not cfg.qk_norm:
    # The export multiplies q's weights by a factor before quantising them (with a q_norm it
    # goes on the norm, which stays F32).
    raise ValueError(f'quantization-aware training cannot match the {arch} export of this model: '
                     f'it rescales the queries (query_pre_attn_scalar='
                     f'{cfg.query_pre_attn_scalar}) before quantising')
  rules = hf.weight_rules(cfg, 'Phi3ForCausalLM' if arch == 'phi3' else 'LlamaForCausalLM')
  shapes = hf.expected_tensors(cfg, rules)
  names = gguf.get_tensor_name_map(gguf_arch.ARCHS[arch], cfg.n_layers)
  gguf_name = lambda n: names.get_name(n, try_suffixes=('.weight', '.bias'))
  has_output = any(gguf_name(n) == 'output.weight' for n in shapes)
  plan, warned = [], set()
  for path, rule in sorted(rules.items()):
    by_type: dict[Q, list[int | None]] = {}
    for layer in (range(cfg.n_layers) if rule.per_layer else [None]):
      hf_name = rule.hf.format(layer=layer)
      name, shape = gguf_name(hf_name), shapes[hf_name]
      qtype, wanted = gguf_export.tensor_type(name, shape, file_type, cfg.n_layers, has_output)
      if wanted is not None and (path, wanted) not in warned:   # once per parameter and type
        warned.add((path, wanted))
        warnings.warn(gguf_export.TypeFallbackWarning(
            f'{name}: rows of {shape[-1]} are not a multiple of {blocks.block_size(wanted)} '
            f'({wanted.name}); trained and written as {qtype.name}'))
      by_type.setdefault(qtype, []).append(layer)
    if set(by_type) == {Q.F32}:
      continue
    groups = tuple((t, None if layers == [None] or len(by_type) == 1 else tuple(layers))
                   for t, layers in by_type.items())
    plan.append(LeafPlan(path, not rule.transpose, groups))
  return tuple(plan)


def _rows(x, rows_on_last_axis: bool):
  return x if rows_on_last_axis else jnp.swapaxes(x, -1, -2)


def fake_quantize(plan: tuple[LeafPlan, ...] | None, params):
  """`params` (an nnx.State of float weights) with every planned matrix replaced by the values
  its GGUF type stores (exactly what gguf's dequantizer reads back from the export)."""
  if plan is None:
    return params
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  index = {hf._path(key_path): i for i, (key_path, _) in enumerate(leaves)}
  values = [leaf for _, leaf in leaves]
  pieces: dict[Q, list] = {}          # qtype -> [(leaf index, layers, rows-first array)]
  for leaf_plan in plan:
    i = index[leaf_plan.path]
    for qtype, layers in leaf_plan.groups:
      if qtype == Q.F32:
        continue
      part = values[i] if layers is None else values[i][np.asarray(layers)]
      pieces.setdefault(qtype, []).append((i, layers, _rows(part, leaf_plan.rows_on_last_axis)))
  rows_on_last = {index[p.path]: p.rows_on_last_axis for p in plan}
  for qtype, parts in pieces.items():
    size = blocks.block_size(qtype)
    flat = jnp.concatenate([a.astype(jnp.float32).reshape(-1) for _, _, a in parts])
    quantized = blocks.fake_quantize(flat.reshape(-1, size), qtype).reshape(-1)
    offset = 0
    for i, layers, a in parts:
      q = _rows(quantized[offset:offset + a.size].reshape(a.shape),
                rows_on_last[i]).astype(values[i].dtype)
      offset += a.size
      values[i] = q if layers is None else values[i].at[np.asarray(layers)].set(q)
  return jax.tree_util.tree_unflatten(treedef, values)


@jax.custom_vjp
def straight_through(master, quantized):
  """The quantized weights forward; their gradient goes to the master weights unchanged (the
  straight-through estimator: rounding is treated as the identity)."""
  del master
  return quantized


def _straight_through_fwd(master, quantized):
  del master
  return quantized, None


def _straight_through_bwd(_, grad):
  return grad, jax.tree.map(jnp.zeros_like, grad)


straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


@functools.lru_cache(maxsize=8)
def _jitted(plan):
  return jax.jit(functools.partial(fake_quantize, plan))


def for_evaluation(config, model_config: ModelConfig, params):
  """The student as a run with config.quant evaluates it: fake-quantized when QAD is on."""
  plan = quant_plan(model_config, config.quant.type) if 'quant' in config else None
  return params if plan is None else _jitted(plan)(params)
