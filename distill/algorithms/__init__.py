"""Data regimes that feed the step, composed by name (house rule 8).

An algorithm decides where the step's tokens come from (the dataset, the teacher's or
the student's own samples) and may carry state in the checkpoint; it never knows which
divergence the loss uses.
"""
from __future__ import annotations

import difflib

from distill.algorithms.base import Algorithm
from distill.algorithms.cached_teacher import CachedTeacher, OnlineTopK
from distill.algorithms.distillm import DistiLLM
from distill.algorithms.gkd import GKD
from distill.algorithms.hidden_kd import HiddenKD
from distill.algorithms.minillm import MiniLLM
from distill.algorithms.onpolicy_rkl import OnPolicyReverseKL
from distill.algorithms.seqkd import SeqKD
from distill.algorithms.skd import SKD
from distill.algorithms.supervised import Supervised

ALGORITHMS: dict[str, type[Algorithm]] = {
    'supervised': Supervised,
    'gkd': GKD,
    'distillm': DistiLLM,
    'minillm': MiniLLM,
    'onpolicy_rkl': OnPolicyReverseKL,
    'skd': SKD,
    'seqkd': SeqKD,
    'cached_teacher': CachedTeacher,
    'topk_online': OnlineTopK,
    'hidden_kd': HiddenKD,
}


def register(name: str, cls: type[Algorithm]):
  ALGORITHMS[name] = cls


def get(name: str) -> type[Algorithm]:
  if name not in ALGORITHMS:
    close = difflib.get_close_matches(name, ALGORITHMS, n=3)
    hint = f' (did you mean {", ".join(close)}?)' if close else ''
    raise ValueError(f'unknown algorithm {name!r}{hint}; valid: {", ".join(sorted(ALGORITHMS))}')
  return ALGORITHMS[name]
