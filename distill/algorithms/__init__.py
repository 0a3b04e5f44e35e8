"""Methods composed by name: each is a pair (where the rows come from × what is minimised).

    config.algorithm.name = 'gkd'            # a registered method
    config.algorithm.kwargs = {...}          # the options its two hooks take

Built-in methods (rows hook × objective hook):
  supervised      dataset rows × config.loss (Hinton KD with any divergence; CE alone
                  without a teacher)
  seqkd           the teacher's generations, cached once × config.loss
  cached_teacher  the teacher's top-k, cached once × top-k forward KL
  topk_online     dataset rows with the teacher's top-k computed in the step × top-k KL
  hidden_kd       dataset rows × config.loss + hidden-state terms (trained projections)
  taid            dataset rows × KL to TAID's student→teacher interpolation
  gkd             the student's samples with probability λ, else dataset (or teacher
                  samples) × config.loss
  distillm        adaptive student samples with a replay buffer × config.loss
  skd             student proposals, the teacher replacing those outside its top-K ×
                  config.loss
  minillm         teacher-mixed samples × MiniLLM's policy gradient
  onpolicy_rkl    the student's samples × per-token reverse-KL policy gradient
  cross_tokenizer dataset rows also in the teacher's own tokenizer (config.teacher.tokenizer)
                  × ULD or GOLD-style shared-span losses

A researcher's own method needs no edit of the package: subclass `Rows` and/or `Objective`
(distill.algorithms.hooks), `register('name', rows=..., objective=...)` in a file, and run
`python -m distill.main --import=that_file.py --config.algorithm.name=name ...`
(BUILD.md has a worked example).
"""
from __future__ import annotations

import difflib

from distill.algorithms import (cross_tokenizer, distillm, gkd, hidden_kd, minillm,
                                policy_gradient, rollout, seqkd, skd, taid, topk)
from distill.algorithms.divergence import Divergence
from distill.algorithms.hooks import Drawn, Objective, Rows, StepInputs
from distill.algorithms.method import Method, MethodSpec

__all__ = ['Drawn', 'Method', 'MethodSpec', 'Objective', 'Rows', 'StepInputs', 'get',
           'names', 'register']

_BUILT_IN = (
    MethodSpec('supervised', Rows, Divergence),
    MethodSpec('seqkd', seqkd.TeacherGenerations, Divergence),
    MethodSpec('cached_teacher', topk.TeacherTopKCache, topk.TopKForwardKL),
    MethodSpec('topk_online', topk.OnlineTopK, topk.TopKForwardKL),
    MethodSpec('hidden_kd', Rows, hidden_kd.HiddenStates),
    MethodSpec('taid', Rows, taid.TAID),
    MethodSpec('gkd', gkd.MixedRows, Divergence),
    MethodSpec('distillm', distillm.AdaptiveReplayRows, Divergence),
    MethodSpec('skd', skd.InterleavedRows, Divergence),
    MethodSpec('minillm', minillm.TeacherMixedRows, minillm.MiniLLMObjective),
    MethodSpec('onpolicy_rkl', rollout.StudentSamples, policy_gradient.ReverseKLPerToken),
    MethodSpec('cross_tokenizer', cross_tokenizer.TeacherTokenRows,
               cross_tokenizer.CrossTokenizer),
)
_METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in _BUILT_IN}


def register(name: str, *, rows: type[Rows] = Rows,
             objective: type[Objective] = Divergence) -> MethodSpec:
  """Makes `name` selectable as config.algorithm.name; returns its spec.

  rows: a Rows subclass (default: the dataset's rows); objective: an Objective subclass
  (default: config.loss through the chunked loss). A name already taken is refused.
  """
  if not isinstance(name, str) or not name.isidentifier():
    raise ValueError(f'a method name must be an identifier, got {name!r}')
  if name in _METHODS:
    kind = 'built-in' if any(spec.name == name for spec in _BUILT_IN) else 'registered'
    raise ValueError(f'algorithm {name!r} is already a {kind} method; choose another name')
  for hook, base in ((rows, Rows), (objective, Objective)):
    if not (isinstance(hook, type) and issubclass(hook, base)):
      raise ValueError(f'register({name!r}): {hook!r} is not a subclass of '
                      f'distill.algorithms.{base.__name__}')
  _METHODS[name] = MethodSpec(name, rows, objective)
  return _METHODS[name]


def names() -> list[str]:
  return sorted(_METHODS)


def get(name: str) -> MethodSpec:
  if name not in _METHODS:
    close = difflib.get_close_matches(name, _METHODS, n=3)
    hint = f' (did you mean {", ".join(close)}?)' if close else ''
    raise ValueError(f'unknown algorithm {name!r}{hint}; valid: {", ".join(names())}')
  return _METHODS[name]
