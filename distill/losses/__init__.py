"""Divergences and training losses on fp32 logits, and their chunked memory-flat form.

    fn = distill.losses.get('jsd', beta=0.5, temperature=1.0)
    per_token_BxT = fn(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT)
    loss = distill.losses.reduce(per_token_BxT, mask_BxT, 'token_mean')

Modules: divergences (the registry), reductions, objective (KD + CE per token, Hinton),
chunked (loss and gradient from hidden states without [B, T, V] logits), taid, topk,
hidden (hidden-state KD), cross_tokenizer (ULD and shared-span losses between two
tokenizers), bench (peak-memory comparison of plain vs chunked).
"""
from distill.losses.divergences import NAMES, get, kl_from_logprobs, names, register
from distill.losses.hidden import hidden_state_loss, init_hidden_projections
from distill.losses.objective import cross_entropy, hinton, token_objective
from distill.losses.reductions import MODES, reduce, sum_and_count, token_weights
from distill.losses.taid import (taid_init, taid_loss, taid_teacher_logits, taid_token_fn,
                                 taid_update)
from distill.losses.topk import teacher_topk, topk_forward_kl, topk_loss
from distill.losses.chunked import chunk_scan, chunked_loss, plain_loss
from distill.losses.cross_tokenizer import span_kl, span_terms, uld

__all__ = [
    'NAMES', 'get', 'kl_from_logprobs', 'names', 'register', 'hidden_state_loss',
    'init_hidden_projections',
    'cross_entropy', 'hinton', 'token_objective', 'MODES', 'reduce', 'sum_and_count',
    'token_weights', 'taid_init', 'taid_loss', 'taid_teacher_logits', 'taid_token_fn',
    'taid_update', 'teacher_topk', 'topk_forward_kl', 'topk_loss', 'chunk_scan', 'chunked_loss',
    'plain_loss', 'span_kl', 'span_terms', 'uld',
]
