"""What the user sees (distill.train.monitor): the alarms on logged values, and the served
teacher's time as the loop waited for it. Pure Python; the probe's numbers are checked in
tests/test_teachers.py and the trainer's logs in tests/test_serve.py."""
import time

import pytest

from distill.algorithms import served
from distill.train import monitor


def _logs(entropies, kls):
  return [{'step': 10 * (i + 1), 'student_entropy': e, 'probe_kl': k}
          for i, (e, k) in enumerate(zip(entropies, kls))]


def test_alarms_are_raised_once_with_the_step_named():
  alarms = monitor.Alarms(entropy_floor=0.25, kl_spike=3.0, kl_window=10)
  logs = _logs([2.0, 1.9, 1.0, 0.4, 0.3, 0.2], [1.0, 1.1, 0.9, 1.0, 3.5, 4.0])
  raised = {}
  with pytest.warns(UserWarning) as caught:
    for log in logs:
      raised.update(alarms.check(log['step'], log))
  # entropy 0.4 < 0.25 * 2.0 at step 40; KL 3.5 > 3 * median(1.0, 1.1, 0.9, 1.0) at step 50
  assert raised == {'alarm/entropy_collapse': 40, 'alarm/kl_spike': 50}
  messages = [str(w.message) for w in caught]
  assert len(messages) == 2
  assert 'entropy collapsed at step 40: 0.4 nats' in messages[0]
  assert 'probe_kl spiked at step 50: 3.5' in messages[1]


def test_a_resumed_run_keeps_its_history():
  first = _logs([2.0, 1.9, 0.4], [1.0, 1.1, 0.9])
  alarms = monitor.Alarms(0.25, 3.0, 10)
  alarms.replay([*first[:2], {**first[2], 'alarm/entropy_collapse': 30}])
  # The reference entropy and the KLs come back: a spike is seen at once, the collapse
  # (already raised before the restart) is not raised again.
  with pytest.warns(UserWarning, match='probe_kl spiked at step 40'):
    assert alarms.check(40, {'student_entropy': 0.1, 'probe_kl': 9.0}) == {'alarm/kl_spike': 40}
  assert alarms.check(50, {'loss': 50.0}) == {}   # without probe_kl the loss is watched


class _Source:
  def __init__(self):
    self.i = 0

  def __next__(self):
    self.i += 1
    return {'i': self.i}

  def get_state(self):
    return self.i

  def set_state(self, state):
    self.i = state


def test_served_teacher_time_is_the_wait_of_the_loop():
  def fetch(batch):
    time.sleep(0.05)
    return batch['i'], None

  batches = served._WithServedTopK(_Source(), fetch)
  next(batches)            # the first request: nothing ran ahead of it
  time.sleep(0.12)         # a "step" long enough for the requests ahead to finish
  next(batches)
  timing = batches.take_timing()
  assert 0.045 < timing['teacher_request_s'] < 0.5
  # The first batch waited for its request, the second found it done: half a request each.
  assert timing['teacher_s'] < timing['teacher_request_s']
  assert batches.take_timing() == {'teacher_s': 0.0, 'teacher_request_s': 0.0}
