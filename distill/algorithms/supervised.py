"""Supervised KD (Hinton) on a fixed dataset, with any divergence of the loss library."""
from distill.algorithms.base import Algorithm


class Supervised(Algorithm):
  """The default regime: dataset rows, teacher and student scored on the same tokens."""
