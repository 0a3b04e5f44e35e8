"""One run of the student-size study: a method on a task, at the study's protocol.

ARG (comma-separated): one method, one task, optionally `small`.
  methods  teacher     the task's teacher, ground truth from scratch (600 steps)
           pretrain    the students' warm start: ground truth from scratch (PRETRAIN_STEPS)
           gt          ground truth only (cross-entropy), continued from the warm start
           kd          supervised KD: forward KL to the teacher on the dataset
           seqkd       SeqKD: cross-entropy on the teacher's greedy completions
           gkd         GKD: generalized JSD(β=0.5), on the student's own samples (λ=1)
           distillm    DistiLLM: skew forward KL (α=0.1), adaptive off/on-policy + replay
           onpolicy    on-policy reverse KL: per-token reward −(log q − log p) on samples
           taid        TAID: KL to the student–teacher interpolation, t from 0.4 to 1
           minillm     MiniLLM: reverse KL by policy gradient on teacher-mixed samples
  tasks    arithmetic  2-digit addition with working
           arithmetic4 4-digit addition with working: twice the chain, errors compound
           hmm         the language with a known distribution

Every method except teacher/pretrain continues for METHOD_STEPS from a warm start that the
study passes as model.init_from (the ground-truth student of the same size and seed), with
teacher.checkpoint the task's teacher: the protocol of the GKD, DistiLLM and MiniLLM papers.
The study's driver (run.py) sets model.preset, seed, the learning rate and those paths per
run; as a file it also serves `python -m distill.main --config=experiments/size_study/
config.py:gkd,arithmetic --config.teacher.checkpoint=... --config.model.init_from=...`.
"""
import os

from configs import (arithmetic_distillm, arithmetic_gkd, arithmetic_minillm,
                     arithmetic_onpolicy_rkl, arithmetic_seqkd, arithmetic_student,
                     arithmetic_taid, arithmetic_teacher)
from distill import sweep
from distill.train.config import make_small, parse_options

TEACHER_STEPS = 600
PRETRAIN_STEPS = 200
METHOD_STEPS = 150
SEQKD_PROMPTS = 4096
STUDY_DIR = 'workdirs/size_study'   # run.py's default --study_dir
TEACHER = 'teacher-1m'
# The learning rate the study chose for each method on each task (report/study.json, from
# the grid 1e-3 / 3e-4 / 1e-4 at student-100k): what a continuation runs at unless a sweep
# sets another (run.py sets each point's). 4-digit arithmetic takes 2-digit's choices;
# MiniLLM, not in the study, takes on-policy reverse KL's.
LEARNING_RATES = {
    'arithmetic': {'gt': 1e-3, 'kd': 1e-3, 'seqkd': 1e-3, 'gkd': 1e-3, 'distillm': 1e-3,
                   'onpolicy': 1e-4, 'taid': 1e-3, 'minillm': 1e-4},
    'hmm': {'gt': 1e-3, 'kd': 1e-3, 'seqkd': 1e-4, 'gkd': 1e-3, 'distillm': 1e-3,
            'onpolicy': 1e-3, 'taid': 1e-3, 'minillm': 1e-3},
}
TASKS = {'arithmetic': ('arithmetic', 2), 'arithmetic4': ('arithmetic', 4), 'hmm': ('hmm', None)}


def _kd():
  c = arithmetic_student.get_config('kd')
  c.loss.kd_weight, c.loss.ce_weight = 1.0, 0.0
  return c


def _gkd():
  c = arithmetic_gkd.get_config()
  c.algorithm.kwargs.lmbda = 1.0
  return c


def _seqkd():
  c = arithmetic_seqkd.get_config()
  c.algorithm.kwargs.num_prompts = SEQKD_PROMPTS
  return c


METHODS = {
    'teacher': lambda: arithmetic_teacher.get_config(),
    'pretrain': lambda: arithmetic_student.get_config('scratch'),
    'gt': lambda: arithmetic_student.get_config('scratch'),
    'kd': _kd,
    'seqkd': _seqkd,
    'gkd': _gkd,
    'distillm': lambda: arithmetic_distillm.get_config(),
    'onpolicy': lambda: arithmetic_onpolicy_rkl.get_config(),
    'taid': lambda: arithmetic_taid.get_config(),
    'minillm': lambda: arithmetic_minillm.get_config(),
}


def get_config(arg=None):
  options = parse_options(arg, {**{m: 'method' for m in METHODS},
                                **{t: 'task' for t in TASKS}, 'small': 'tiny smoke run'})
  methods, tasks = sorted(options & set(METHODS)), sorted(options & set(TASKS))
  if len(methods) != 1 or len(tasks) != 1:
    raise ValueError(f'give one method and one task, e.g. gkd,arithmetic; got {arg!r}')
  method, task = methods[0], tasks[0]
  c = METHODS[method]()
  c.task.name, num_digits = TASKS[task]
  if num_digits:
    with c.unlocked():
      c.task.kwargs.num_digits = num_digits
  c.mesh.data = 1
  c.progress_bar = False
  c.wandb.mode = 'disabled'
  c.wandb.group = 'size_study'
  c.data.batch_size = 64
  c.data.eval_batch_size = 64
  c.eval.max_batches = 8            # 512 held-out examples (all of arithmetic's eval split)
  c.log_steps = 25
  if method == 'teacher':
    c.total_steps = TEACHER_STEPS
  elif method == 'pretrain':
    c.total_steps = PRETRAIN_STEPS
    c.optimizer.warmup_steps = 50
  else:
    # A continuation: a short warm-up, the learning rate is the study's per-method choice.
    c.total_steps = METHOD_STEPS
    c.optimizer.warmup_steps = 20
    c.optimizer.learning_rate = LEARNING_RATES['hmm' if task == 'hmm' else 'arithmetic'][method]
  c.checkpoint_steps = c.total_steps
  if 'small' in options:
    make_small(c)
    if method == 'seqkd':
      c.algorithm.kwargs.num_prompts = 64
  return c


def teacher_dir(task: str, preset: str = TEACHER, study_dir: str = STUDY_DIR) -> str:
  return os.path.abspath(os.path.join(study_dir, task, 'teacher', f'model.preset={preset}'))


def warm_dir(task: str, size: str, seed: int, study_dir: str = STUDY_DIR) -> str:
  return os.path.abspath(os.path.join(study_dir, task, 'pretrain',
                                      f'model.preset={size},seed={seed}'))


# The student the paper configs continue on each task: the learning-rate grid's size, and on
# 4-digit arithmetic the only size the study warm-starts there (run.py --hard_size).
PAPER_SIZE = {'arithmetic': 'student-100k', 'hmm': 'student-100k', 'arithmetic4': 'student-500k'}


def continuation_points(task: str = 'arithmetic', seeds=(0, 1, 2),
                        study_dir: str = STUDY_DIR) -> list[dict]:
  """Sweep points continuing the study's warm starts (PAPER_SIZE[task]) with its teacher: what
  the paper configs (experiments/<paper>/config.py) multiply their grids with."""
  size = PAPER_SIZE[task]
  return [{'model.preset': size, 'seed': seed,
           'model.init_from': sweep.Labelled(warm_dir(task, size, seed, study_dir), 'warm'),
           'teacher.checkpoint': sweep.Labelled(teacher_dir(task, study_dir=study_dir), TEACHER)}
          for seed in seeds]
