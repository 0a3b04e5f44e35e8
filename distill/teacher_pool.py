"""Several served teachers as one: config.teacher.server plus the URLs in config.teachers.more.

`ServedTeachers` answers `score_rows` like one TeacherClient, so every served method that
takes a top-k or the sampled tokens' log-probs (cached_teacher, topk_online, gkd, distillm,
onpolicy_rkl) takes several teachers unchanged. Each server is asked for the same rows; the
answers are combined per position, in float64:

  routed  (config.teachers.routes) each row takes the scores of its route's teacher (the
          rows' ROUTE_FIELD; topk_online only: its dataset batches carry the field).
  mixed   (config.teachers.weights w_i) the mixture p = Σ_i w_i p_i, of which each teacher
          reports only its top-k S_i and so its missing mass R_i = 1 − Σ_{v∈S_i} p_i(v):
              p̂(v) = Σ_i w_i · (p_i(v) if v ∈ S_i else R_i / (V − k))   for v in U = ∪_i S_i
          i.e. each teacher's missing mass spread evenly over the V − k ids it did not list
          (V: the vocabulary size). The top-k fields then hold U (n·k columns, best first;
          an id listed by several teachers once, the other columns a repeated id at log-prob
          −inf, which adds nothing to the top-k losses), and the bucket of tail='bucket' is
          1 − Σ_{v∈U} p̂(v) = Σ_i w_i R_i (V − k − |U∖S_i|) / (V − k): the spread mass on the
          ids outside U, so teacher and student buckets cover the same ids. The estimate is
          exact when each teacher's unlisted ids share its missing mass equally; in particular
          at k = V − 1 (one unlisted id each) it is the exact mixture. The alternative of
          counting unlisted ids as 0 puts all missing mass in the bucket, including mass a
          teacher has on ids of U, so the bucket would not be the mass outside U.
          A sampled token's log-prob mixes exactly: log Σ_i w_i p_i(y).
`tests/test_teachers.py` checks the rule against a float64 dense reference and the k = V − 1
case against the exact mixture.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses

import numpy as np

from distill.data.pipeline import ROUTE_FIELD
from distill.teacher_client import RowScores, ServedModel, TeacherClient


def mix_topk(ids: list[np.ndarray], logprobs: list[np.ndarray], weights, vocab_size: int):
  """(ids [..., n·k] int32, log-probs [..., n·k] fp32) of the weighted mixture of n teachers'
  top-k (ids / logprobs: one [..., k] array per teacher), by the rule of the module doc."""
  k = ids[0].shape[-1]
  lead = ids[0].shape[:-1]
  if k == 0:   # token log-probs alone (onpolicy_rkl)
    return ids[0], logprobs[0]
  ids_NxTxK = np.stack([i.reshape(-1, k) for i in ids], axis=1)               # [N, n, k]
  p_NxTxK = np.exp(np.stack([lp.reshape(-1, k) for lp in logprobs], axis=1).astype(np.float64))
  N, n = ids_NxTxK.shape[:2]
  missing_NxT = np.clip(1.0 - p_NxTxK.sum(-1), 0.0, 1.0)
  spread_NxT = missing_NxT / (vocab_size - k) if vocab_size > k else np.zeros_like(missing_NxT)
  union_NxU = ids_NxTxK.reshape(N, n * k)
  # p_i at each union id: its listed probability, else its spread missing mass.
  match_NxUxTxK = union_NxU[:, :, None, None] == ids_NxTxK[:, None, :, :]
  listed_NxUxT = match_NxUxTxK.any(-1)
  p_NxUxT = np.where(listed_NxUxT, (match_NxUxTxK * p_NxTxK[:, None]).sum(-1),
                     spread_NxT[:, None, :])
  mixed_NxU = p_NxUxT @ np.asarray(weights, np.float64)
  # An id several teachers list counts once: its later columns get probability 0.
  earlier = np.tril(union_NxU[:, :, None] == union_NxU[:, None, :], k=-1).any(-1)
  with np.errstate(divide='ignore'):
    log_NxU = np.where(earlier, -np.inf, np.log(mixed_NxU))
  order = np.argsort(-log_NxU, axis=-1, kind='stable')
  out_ids = np.take_along_axis(union_NxU, order, -1).astype(np.int32)
  out_logprobs = np.take_along_axis(log_NxU, order, -1).astype(np.float32)
  return out_ids.reshape(*lead, n * k), out_logprobs.reshape(*lead, n * k)


def mix_token_logprobs(token_logprobs: list[np.ndarray], weights) -> np.ndarray:
  """log Σ_i w_i p_i(y) of each position's token (exact), fp32."""
  lp_TxN = np.stack(token_logprobs).astype(np.float64)
  with np.errstate(divide='ignore'):
    log_w = np.log(np.asarray(weights, np.float64)).reshape(-1, *[1] * (lp_TxN.ndim - 1))
  return np.logaddexp.reduce(lp_TxN + log_w, axis=0).astype(np.float32)


@dataclasses.dataclass
class ServedTeachers:
  """Several connected TeacherClients answering as one (see the module doc)."""
  clients: list[TeacherClient]
  weights: tuple[float, ...]    # mixed: one per teacher; () when routed
  vocab_size: int

  @property
  def served(self) -> ServedModel:
    """What the methods read of 'the' served model: the shortest context of the servers."""
    lengths = [c.served.max_model_len for c in self.clients if c.served.max_model_len]
    return ServedModel(' + '.join(c.served.name for c in self.clients),
                       min(lengths) if lengths else None, None, None, None)

  @property
  def identity(self) -> str:
    """The teachers' identities with the rule that combines them (a cache's identity)."""
    rule = f'weights {self.weights}' if self.weights else 'routed'
    return f'served teachers [{", ".join(c.identity for c in self.clients)}], {rule}'

  def check_topk(self, k: int, *, tokens: bool = False) -> None:
    for client in self.clients:
      client.check_topk(k, tokens=tokens)

  def generate(self, *args, **kwargs):
    raise ValueError('several served teachers give top-k and token log-probs, not generations '
                     '(seqkd): give one config.teacher.server')

  def score_rows(self, batch: dict, k: int, *, tokens: bool = False) -> RowScores:
    with concurrent.futures.ThreadPoolExecutor(len(self.clients)) as pool:
      each = list(pool.map(lambda c: c.score_rows(batch, k, tokens=tokens), self.clients))
    if not self.weights:
      if ROUTE_FIELD not in batch:
        raise ValueError(f'routed served teachers need the rows\' {ROUTE_FIELD}, which these '
                         'rows lack (only topk_online\'s dataset batches carry it)')
      route_B = np.asarray(batch[ROUTE_FIELD])[:, 0]
      pick = lambda field: (None if getattr(each[0], field) is None else np.stack(
          [getattr(each[r], field)[b] for b, r in enumerate(route_B)]))
      return RowScores(*(pick(f) for f in RowScores._fields))
    ids, logprobs = mix_topk([s.topk_ids for s in each], [s.topk_logprobs for s in each],
                             self.weights, self.vocab_size)
    keep = (np.asarray(batch['loss_mask']) != 0)[..., None]   # zeros off the mask, as each had
    ids, logprobs = np.where(keep, ids, 0), np.where(keep, logprobs, 0.0).astype(np.float32)
    token_logprobs = None
    if tokens:
      token_logprobs = np.where(keep[..., 0], mix_token_logprobs(
          [s.token_logprobs for s in each], self.weights), 0.0).astype(np.float32)
    return RowScores(ids, logprobs, token_logprobs)
