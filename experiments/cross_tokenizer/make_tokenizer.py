"""A multi-character BPE tokenizer for the embedded arithmetic task, the teacher's own.

    .venv/bin/python experiments/cross_tokenizer/make_tokenizer.py OUT_FOLDER [--vocab_size=96]

Trained with `tokenizers` on the first 4096 train examples (prompt + completion) over the
CharTokenizer's characters, with no pre-tokenizer, so merges cross digits and symbols
('+0=', '=1', ';#'...) and its token boundaries differ from the student's characters. The
decoder fuses tokens, so every text decodes back exactly. Writes tokenizer.json and
tokenizer_config.json (<pad>, <bos>, <eos>, BOS added before prompts) into OUT_FOLDER.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from tokenizers import Tokenizer, decoders, models, trainers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from distill.data import tasks  # noqa: E402
from distill.data.tokenizer import CharTokenizer  # noqa: E402

_VOCAB = flags.DEFINE_integer('vocab_size', 96, 'Tokens, with the three special ones.')
_DIGITS = flags.DEFINE_integer('num_digits', 2, 'Operand digits of the arithmetic task.')
SPECIALS = ['<pad>', '<bos>', '<eos>']


def build(folder: str, vocab_size: int, num_digits: int, examples: int = 4096) -> None:
  task = tasks.get_task('arithmetic', num_digits=num_digits)
  texts = [''.join(task.example('train', i)) for i in range(examples)]
  tokenizer = Tokenizer(models.BPE())
  tokenizer.decoder = decoders.Fuse()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                initial_alphabet=list(CharTokenizer().chars), show_progress=False)
  tokenizer.train_from_iterator(texts, trainer)
  os.makedirs(folder, exist_ok=True)
  tokenizer.save(os.path.join(folder, 'tokenizer.json'))
  with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
    json.dump({'pad_token': '<pad>', 'bos_token': '<bos>', 'eos_token': '<eos>',
               'add_bos_token': True}, f, indent=1)


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('usage: make_tokenizer.py OUT_FOLDER')
  build(argv[1], _VOCAB.value, _DIGITS.value)


if __name__ == '__main__':
  app.run(main)
