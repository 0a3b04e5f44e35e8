"""The real-model example end to end on CPU: a tiny Qwen3 HF teacher, its tokenizer and chat
template, a chat JSONL file, on-policy GKD — configs/qwen3_distill_jsonl.py in small mode."""
import json
import os

import numpy as np

from tests.helpers import read_metrics, run_cli


def test_qwen3_gkd_on_chat_jsonl(tmp_path):
  workdir = str(tmp_path)
  run_cli(workdir, '--config=configs/qwen3_distill_jsonl.py:small')
  rows = [r for r in read_metrics(workdir) if 'loss' in r]
  assert [r['step'] for r in rows] == [2, 4] and all(np.isfinite(r['loss']) for r in rows)
  final = json.load(open(os.path.join(workdir, 'final_metrics.json')))
  assert final['kl_forward'] > 0 and final['teacher_ce'] > 0
  model = json.load(open(os.path.join(workdir, 'model.json')))
  assert model['qk_norm'] and model['vocab_size'] == 150   # the teacher's tokenizer vocabulary
