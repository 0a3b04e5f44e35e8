"""Distil a Qwen3 teacher into a smaller Qwen3 student on a local chat JSONL file with
on-policy GKD (generalised JSD), as on a GPU/TPU host.

Point the three paths at local folders/files (nothing is downloaded), e.g.
  python -m distill.main --config=configs/qwen3_distill_jsonl.py --workdir=runs/qwen3 \
    --config.teacher.checkpoint=/models/Qwen3-1.7B --config.tokenizer=/models/Qwen3-1.7B \
    --config.model.init_from=/models/Qwen3-0.6B --config.task.kwargs.path=data/chat.jsonl
Each JSONL row holds {"messages": [...]}; the final assistant turn is the completion and
everything before it, rendered with the tokenizer's chat template, is the prompt. Add
--config.task.kwargs.enable_thinking=False (or True) to render the rows in that thinking mode.

ARG 'small': the repository's tiny Qwen3 test checkpoint and chat fixture, a few steps on CPU.
"""
import ml_collections

from distill.train.config import base_config, parse_options

FIXTURES = 'tests/fixtures'


def get_config(arg=None):
  options = parse_options(arg, {'small': 'tiny fixture checkpoint and data (CPU smoke run)'})
  c = base_config()
  c.role = 'student'
  c.tokenizer = ''                       # the teacher's folder (tokenizer.json + chat template)
  c.teacher.checkpoint = ''
  c.model.init_from = ''                 # initialise the student from a smaller Qwen3
  c.task.name = 'jsonl'
  c.task.kwargs.path = ''
  c.task.kwargs.messages_field = 'messages'
  c.task.kwargs.chat_template = ''       # set to the tokenizer folder
  c.task.kwargs.eval_fraction = 0.02
  # Qwen3's thinking mode for every chat row (teacher and student read the same row): True
  # keeps the final turn's reasoning in the completion, False drops it; None: the template's
  # default. A bool-typed reference so --config.task.kwargs.enable_thinking=False parses.
  c.task.kwargs.enable_thinking = ml_collections.FieldReference(None, field_type=bool)
  c.task.prompt_len = 512
  c.task.completion_len = 512
  c.model.dtype = 'bfloat16'
  c.loss.divergence = 'jsd'
  c.loss.hparams.beta = 0.5
  c.loss.kd_weight = 1.0
  c.loss.ce_weight = 0.0
  c.loss.chunk_size = 1024
  c.algorithm.name = 'gkd'
  c.algorithm.kwargs.lmbda = 0.5
  c.data.batch_size = 32
  c.data.eval_batch_size = 32
  c.total_steps = 2000
  c.checkpoint_steps = 200
  c.eval_steps = 200
  c.eval.generate = False                # no task grader for free-form chat
  c.optimizer.learning_rate = 5e-5
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.wandb.group = 'qwen3-gkd'
  if 'small' in options:
    teacher = f'{FIXTURES}/hf/qwen3'
    c.tokenizer = teacher
    c.teacher.checkpoint = teacher
    c.model.init_from = ''
    c.model.preset = 'tiny'
    c.model.qk_norm = True
    c.model.head_dim = 16
    c.model.max_seq_len = 64
    c.model.n_layers = 1
    c.task.kwargs.path = f'{FIXTURES}/data/chat_small.jsonl'
    c.task.kwargs.chat_template = teacher
    c.task.kwargs.eval_fraction = 0.25
    c.task.prompt_len = 52
    c.task.completion_len = 12
    c.model.dtype = 'float32'
    c.loss.chunk_size = 64
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 1
    c.data.batch_size = 8
    c.data.eval_batch_size = 8
    c.eval.max_batches = 1
    c.total_steps = 4
    c.checkpoint_steps = 2
    c.eval_steps = 0
    c.log_steps = 2
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.progress_bar = False
  return c
