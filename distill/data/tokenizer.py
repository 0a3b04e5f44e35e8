"""Character-level tokenizer with one fixed vocabulary shared by every embedded task.

The vocabulary never depends on the data, so a checkpoint, a teacher cache and a run
agree on token ids by construction; `fingerprint()` lets them check that they do.
"""
import hashlib
import string
from collections.abc import Iterable

PAD, BOS, EOS = '<pad>', '<bos>', '<eos>'
_SPECIALS = (PAD, BOS, EOS)
# Order matters: ids are positions in this tuple. Append only, never reorder.
_CHARS = tuple(string.digits + '+-*=;#' + ' ' + string.ascii_lowercase)


class CharTokenizer:
  """pad=0, bos=1, eos=2, then digits, '+-*=;#', space and lowercase letters."""

  pad_id, bos_id, eos_id = 0, 1, 2

  def __init__(self):
    self._id_to_token = _SPECIALS + _CHARS
    self._char_to_id = {c: i for i, c in enumerate(self._id_to_token) if c in _CHARS}

  @property
  def vocab_size(self) -> int:
    return len(self._id_to_token)

  @property
  def chars(self) -> tuple[str, ...]:
    """The characters `encode` accepts, in id order (ids start at 3)."""
    return _CHARS

  def token_id(self, char: str) -> int:
    """The id of one character; ValueError if it is not in the vocabulary."""
    try:
      return self._char_to_id[char]
    except KeyError:
      raise ValueError(
          f'character {char!r} is not in the CharTokenizer vocabulary '
          f'(valid: {"".join(_CHARS)!r})') from None

  def encode(self, text: str) -> list[int]:
    """Ids of the characters of `text` (no BOS/EOS added)."""
    return [self.token_id(c) for c in text]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`: stops at the first EOS, skips pad and BOS."""
    return ''.join(self._id_to_token[i] for i in content_ids(self, ids))

  def fingerprint(self) -> str:
    """Stable short hash of the vocabulary (ids and tokens)."""
    blob = '\x00'.join(self._id_to_token).encode()
    return 'char-' + hashlib.sha256(blob).hexdigest()[:16]

  def __repr__(self) -> str:
    return f'CharTokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint()!r})'


def content_ids(tokenizer, ids: Iterable[int]) -> list[int]:
  """The ids a decoder turns into text: up to the first EOS, without pad and BOS.

  Shared by every tokenizer of the framework; ids outside the vocabulary raise.
  """
  out = []
  for i in ids:
    i = int(i)
    if i == tokenizer.eos_id:
      break
    if i in (tokenizer.pad_id, tokenizer.bos_id):
      continue
    if not 0 <= i < tokenizer.vocab_size:
      raise ValueError(f'token id {i} is outside the vocabulary [0, {tokenizer.vocab_size})')
    out.append(i)
  return out
