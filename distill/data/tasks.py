"""Registry of the embedded tasks, composed by name from configs."""
from collections.abc import Callable
from typing import Protocol

from distill.data import sources
from distill.data.arithmetic import ArithmeticTask
from distill.data.hmm_language import HMMTask


class Task(Protocol):
  """What pipelines and evaluation rely on.

  Optional members, present only where meaningful: `score(prompt, completion_text) ->
  1.0/0.0` (tasks with a grader, e.g. arithmetic) and `next_token_logprobs(tokens_BxT,
  input_mask_BxT)` (tasks whose true distribution is known, e.g. hmm).
  """

  name: str
  splits: tuple[str, ...]
  max_prompt_chars: int  # longest prompt / completion the task produces (no BOS/EOS)
  max_completion_chars: int

  def num_examples(self, split: str) -> int: ...

  def example(self, split: str, index: int) -> tuple[str, str]: ...


TASKS: dict[str, Callable[..., Task]] = {'arithmetic': ArithmeticTask, 'hmm': HMMTask}


def get_task(name: str, **kwargs) -> Task:
  """An embedded task, or a file/TFDS source ('jsonl', 'parquet', 'tfds'), by name;
  kwargs go to its constructor."""
  if name in TASKS:
    return TASKS[name](**kwargs)
  if name in sources.SOURCES:
    return sources.get_source(name, **kwargs)
  raise ValueError(f'unknown task {name!r}; valid names: {sorted(TASKS) + sorted(sources.SOURCES)}')


def sequence_lengths(task: Task) -> tuple[int, int]:
  """The smallest (prompt_len, completion_len) that fit every example (+BOS, +EOS)."""
  if not hasattr(task, 'max_prompt_chars'):
    raise ValueError(f'{task.name}: lengths in tokens are not known in advance for a data '
                     'source; set config.task.prompt_len and config.task.completion_len')
  return task.max_prompt_chars + 1, task.max_completion_chars + 1
