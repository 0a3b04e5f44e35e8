"""Embedded tasks, the character tokenizer and grain input pipelines."""
from distill.data.arithmetic import ArithmeticTask
from distill.data.hmm_language import HMMLanguage, HMMTask, distinct_n, empirical_entropy
from distill.data.pipeline import encode_example, make_dataset, make_eval_iterator, make_iterator
from distill.data.tasks import TASKS, Task, get_task, sequence_lengths
from distill.data.tokenizer import CharTokenizer
