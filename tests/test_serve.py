"""The served teacher: vLLM's protocol against the teacher's own forward, a plain HTTP client,
rows and training equal to the in-process teacher's, and the faults (server down, dying
mid-run, another model or tokenizer, k above the server's limit, malformed answers)."""
import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jax
import numpy as np
import pytest
import requests
from flax import nnx

from distill.algorithms import hooks, policy_gradient, rollout, topk
from distill import teacher_pool
from distill.data import pipeline, teacher_cache
from distill.data.tokenizer import CharTokenizer
from distill.serve.batcher import ScoreBatcher
from distill.serve.engine import Engine
from distill.serve.http import TeacherServer
from distill.teacher_client import (MalformedResponse, TeacherClient, TeacherServerError,
                                    TeacherUnavailable)
from distill.train import run as run_lib
from distill.train import trainer
from tests.helpers import read_metrics, small_config
from tests.test_teacher_cache import export_random_teacher, read_all

FAST_RETRIES = dict(retries=2, backoff_s=0.05, timeout_s=60.0)


def export_teacher(directory: str, seed: int) -> str:
  export_random_teacher(directory, seed)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump({'tokenizer': ''}, f)   # a run's config names its tokenizer ('' = characters)
  return directory


@pytest.fixture(scope='module')
def teachers(tmp_path_factory):
  return [export_teacher(str(tmp_path_factory.mktemp(f'teacher{s}')), s) for s in (1, 2)]


@pytest.fixture(scope='module')
def engine(teachers):
  return Engine(teachers[0])


def start(engine, port=0, max_logprobs=20, **kwargs) -> TeacherServer:
  server = TeacherServer(engine, port=port, served_name='teacher', max_logprobs=max_logprobs,
                         **kwargs)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server


@pytest.fixture(scope='module')
def server(engine):
  server = start(engine)
  yield server
  server.stop()


def config_for(module, *, teacher='', url='', **kwargs):
  config = small_config(module)
  config.mesh.data = 1
  config.eval.generate = False   # accuracy decoding is not what these tests compare
  config.teacher.checkpoint = teacher
  config.teacher.server = url
  config.teacher.client.update(FAST_RETRIES)
  with config.unlocked():   # a served variant may take more kwargs (e.g. gkd's k and tail)
    config.algorithm.kwargs.update(kwargs)
  return config


def rows_hook(config, workdir):
  return trainer.make_method(run_lib.build_run(config, str(workdir))).rows


def test_served_topk_is_the_teachers_own_forward(server, engine, teachers, tmp_path):
  run = run_lib.build_run(config_for('arithmetic_cached', teacher=teachers[0]), str(tmp_path))
  batch = teacher_cache.example_rows(run, 0, 8, 8)
  client = TeacherClient(server.url)
  client.connect()
  ids, logprobs, _ = client.score_rows(batch, 8)
  want_ids, want_logprobs = jax.device_get(topk.teacher_topk(
      engine.graphdef, engine.params, batch, 8, temperature=1.0))
  assert batch['loss_mask'].sum() > 0 and ids.shape == want_ids.shape
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(logprobs, want_logprobs, atol=1e-5, rtol=0)


def test_a_plain_http_client_gets_vllms_layout(server, engine):
  models = requests.get(server.url + '/v1/models', timeout=30).json()
  card = models['data'][0]
  assert card['id'] == 'teacher' and card['distill']['model_fingerprint'] == engine.fingerprint
  prompt = [5, 9, 3, 7]
  answer = requests.post(server.url + '/v1/completions', timeout=60, json={
      'model': 'teacher', 'prompt': [prompt], 'max_tokens': 0, 'echo': True,
      'prompt_logprobs': 3}).json()
  choice = answer['choices'][0]
  assert choice['prompt_logprobs'][0] is None and len(choice['prompt_logprobs']) == len(prompt)
  scores = engine.score([prompt], 3)
  for j, position in enumerate(choice['prompt_logprobs'][1:]):
    # the top 3 by rank, plus the prompt's own token with its rank when it is not among them
    top = sorted((e['rank'], int(t), e['logprob']) for t, e in position.items() if e['rank'] <= 3)
    assert [t for _, t, _ in top] == scores.topk_ids[0][j].tolist()
    assert str(prompt[j + 1]) in position
    assert position[str(prompt[j + 1])]['rank'] == scores.token_ranks[0][j]
  generated = requests.post(server.url + '/v1/completions', timeout=60, json={
      'prompt': prompt, 'max_tokens': 5, 'temperature': 0, 'logprobs': 2,
      'return_tokens_as_token_ids': True}).json()['choices'][0]
  tokens = [int(t.split(':')[1]) for t in generated['logprobs']['tokens']]
  assert generated['finish_reason'] in ('stop', 'length') and 1 <= len(tokens) <= 5
  for top, token, logprob in zip(generated['logprobs']['top_logprobs'], tokens,
                                 generated['logprobs']['token_logprobs']):
    assert top[f'token_id:{token}'] == logprob and 2 <= len(top) <= 3
  too_many = requests.post(server.url + '/v1/completions', timeout=60, json={
      'prompt': prompt, 'max_tokens': 0, 'echo': True, 'prompt_logprobs': 21})
  assert too_many.status_code == 400
  assert too_many.json()['error']['message'] == ('Requested prompt logprobs of 21, which is '
                                                 'greater than max allowed: 20')
  unsupported = requests.post(server.url + '/v1/completions', timeout=60,
                              json={'prompt': prompt, 'stop': ['\n']})
  assert unsupported.status_code == 400 and unsupported.json()['error']['param'] == 'stop'


def test_served_rows_equal_the_in_process_teachers(server, teachers, tmp_path):
  cached = dict(num_rows=16, rows_per_shard=8, batch_size=8)
  local = rows_hook(config_for('arithmetic_cached', teacher=teachers[0], **cached), tmp_path / 'a')
  served = rows_hook(config_for('arithmetic_cached', url=server.url, **cached), tmp_path / 'b')
  assert local.identity == served.identity   # one cache serves both
  local.build_cache(), served.build_cache()
  local_rows, served_rows = read_all(local.cache_dir), read_all(served.cache_dir)
  for field in ('tokens', 'targets', 'input_mask', 'loss_mask', 'topk_ids'):
    np.testing.assert_array_equal(served_rows[field], local_rows[field])
  np.testing.assert_allclose(served_rows['topk_logprobs'], local_rows['topk_logprobs'], atol=1e-5)

  greedy = dict(num_prompts=8, rows_per_shard=8, batch_size=8)
  local = rows_hook(config_for('arithmetic_seqkd', teacher=teachers[0], **greedy), tmp_path / 'c')
  served = rows_hook(config_for('arithmetic_seqkd', url=server.url, **greedy), tmp_path / 'd')
  local.build_cache(), served.build_cache()
  local_rows, served_rows = read_all(local.cache_dir), read_all(served.cache_dir)
  assert served_rows['loss_mask'].sum() > 0
  for field in ('tokens', 'targets', 'input_mask', 'loss_mask'):
    np.testing.assert_array_equal(served_rows[field], local_rows[field])


def test_served_scores_of_sampled_rows_are_the_teachers_own(server, engine, teachers, tmp_path):
  """The log-prob of each sampled token (what onpolicy_rkl's served objective reads) and the
  top-k, from the server, equal the in-process teacher's on sampled rows."""
  config = config_for('arithmetic_onpolicy_rkl', teacher=teachers[0])
  run = run_lib.build_run(config, str(tmp_path))
  method = trainer.make_method(run)
  batch = teacher_cache.example_rows(run, 0, 8, 8)
  rows, _ = rollout.sample_rows(run.teacher_graphdef, run.teacher_params, batch,
                                jax.random.PRNGKey(0), method.rows.sampling)
  client = TeacherClient(server.url)
  client.connect()
  scores = client.score_rows(jax.device_get(rows), 4, tokens=True)
  h, w = hooks.model_outputs(run.teacher_graphdef, run.teacher_params, rows)
  mask = np.asarray(rows['loss_mask']) != 0
  want_tokens = np.where(mask, policy_gradient.target_logprobs(h, w, rows['targets']), 0.0)
  want_ids, want_logprobs = jax.device_get(topk.teacher_topk(
      run.teacher_graphdef, run.teacher_params, rows, 4, temperature=1.0))
  assert mask.sum() > 0 and (scores.token_logprobs[mask] < 0).all()
  np.testing.assert_allclose(scores.token_logprobs, want_tokens, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(scores.topk_ids, want_ids)
  np.testing.assert_allclose(scores.topk_logprobs, want_logprobs, atol=1e-5, rtol=0)


def _logged_losses(workdir):
  return [(r['step'], r['loss']) for r in read_metrics(workdir) if 'loss' in r]


def test_served_gkd_topk_at_k_v_minus_1_trains_as_in_process_forward_kl(engine, teachers,
                                                                        tmp_path):
  """gkd with its rows scored by the server between the step's two phases (top-k at
  k = V - 1, tail bucket: every id an outcome, so the loss is forward KL's) trains as gkd
  with forward KL and the teacher in-process: the same losses at every step."""
  vocab = CharTokenizer().vocab_size
  full = start(engine, max_logprobs=vocab)
  configs = {'local': config_for('arithmetic_gkd', teacher=teachers[0]),
             'served': config_for('arithmetic_gkd', url=full.url, k=vocab - 1, tail='bucket')}
  try:
    for name, config in configs.items():
      config.loss.divergence = 'forward_kl'   # gkd's coin (λ = 0.5) still flips
      config.total_steps, config.log_steps = 3, 1
      trainer.train(config, str(tmp_path / name))
  finally:
    full.stop()
  local, served = _logged_losses(str(tmp_path / 'local')), _logged_losses(str(tmp_path / 'served'))
  assert [step for step, _ in served] == [1, 2, 3]
  np.testing.assert_allclose([v for _, v in served], [v for _, v in local], rtol=1e-5)
  record = [r for r in read_metrics(str(tmp_path / 'served')) if 'loss' in r][-1]
  assert record['teacher_s'] > 0 and 0 < record['teacher_share'] <= 1


def test_online_topk_against_a_server_that_dies_equals_in_process_after_resume(
    engine, teachers, tmp_path):
  local = config_for('arithmetic_cached', teacher=teachers[0])
  local.algorithm.name = 'topk_online'
  local.algorithm.kwargs = {'k': 16, 'tail': 'bucket'}
  trainer.train(local, str(tmp_path / 'local'))
  # One probe, then one request per batch of 16 rows: the server stops after batch 4, while
  # the run (checkpoints every 3 steps) waits for batch 5.
  dying = start(engine, max_requests=5)
  served = config_for('arithmetic_cached', url=dying.url)
  served.algorithm.name, served.algorithm.kwargs = 'topk_online', local.algorithm.kwargs
  workdir = str(tmp_path / 'served')
  with pytest.raises(TeacherUnavailable, match=dying.url + '.*last checkpoint is intact'):
    trainer.train(served, workdir)
  assert [d for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit()] == ['3']
  restarted = start(engine, port=dying.server_address[1])
  try:
    trainer.train(served, workdir)
  finally:
    restarted.stop()
  local_log, served_log = read_metrics(str(tmp_path / 'local')), read_metrics(workdir)
  losses = [(a['step'], a['loss'], b['loss']) for a, b in zip(local_log, served_log)
            if 'loss' in a]
  assert [step for step, _, _ in losses] == [2, 3, 4, 6]
  np.testing.assert_allclose([b for _, _, b in losses], [a for _, a, _ in losses], rtol=1e-5)
  for record in (r for r in served_log if 'loss' in r):   # what the user sees of the server
    assert 0 <= record['teacher_share'] <= 1 and record['teacher_request_s'] > 0
    assert 0 < record['topk_mass'] <= 1


def test_a_server_that_is_down_is_named_after_the_retries(tmp_path):
  with socket.socket() as s:   # a port nothing listens on
    s.bind(('127.0.0.1', 0))
    url = f'http://127.0.0.1:{s.getsockname()[1]}'
  with pytest.raises(TeacherUnavailable, match=f'{url} did not answer GET /v1/models after 3 '):
    run_lib.build_run(config_for('arithmetic_cached', url=url), str(tmp_path))


def test_another_model_tokenizer_or_too_large_k_is_refused(server, teachers, engine, tmp_path):
  with pytest.raises(TeacherServerError, match=f'serves model fingerprint {engine.fingerprint}, '
                     'but config.teacher.checkpoint is sha256-'):
    run_lib.build_run(config_for('arithmetic_cached', teacher=teachers[1], url=server.url),
                      str(tmp_path))
  config = config_for('arithmetic_cached', url=server.url)
  config.teacher.fingerprint = 'sha256-0000000000000000'
  with pytest.raises(TeacherServerError, match='config.teacher.fingerprint is sha256-0000'):
    run_lib.build_run(config, str(tmp_path))
  config = config_for('arithmetic_cached', url=server.url)
  config.tokenizer = os.path.join(os.path.dirname(__file__), 'fixtures', 'hf', 'llama32')
  with pytest.raises(TeacherServerError, match=f'uses tokenizer {engine.tokenizer_fingerprint}, '
                     'this run uses hf-'):
    run_lib.build_run(config, str(tmp_path))
  with pytest.raises(TeacherServerError, match='top-30.*max allowed: 20'):
    rows_hook(config_for('arithmetic_cached', url=server.url, k=30), tmp_path)


@pytest.mark.parametrize('module, kwargs, problem', [
    ('arithmetic_minillm', {}, "'minillm' samples with the teacher at every decoded token"),
    ('arithmetic_skd', {}, "'skd' samples with the teacher at every decoded token"),
    ('arithmetic_taid', {}, "'taid' runs the teacher inside the training step on its own rows"),
    ('arithmetic_gkd', {'seq_kd': True, 'divergence': 'forward_kl'},
     'with seq_kd samples from the teacher inside the step'),
    ('arithmetic_gkd', {}, "minimises forward_kl, not config.loss.divergence='jsd'"),
    ('arithmetic_gkd', {'k': 30, 'divergence': 'forward_kl'}, 'top-30.*max allowed: 20'),
])
def test_on_policy_methods_a_server_cannot_score_are_refused(server, tmp_path, module, kwargs,
                                                             problem):
  kwargs = dict(kwargs)
  divergence = kwargs.pop('divergence', None)
  config = config_for(module, url=server.url, **kwargs)
  config.loss.divergence = divergence or config.loss.divergence
  with pytest.raises((ValueError, TeacherServerError), match=problem):
    rows_hook(config, tmp_path)


def test_two_served_teachers_mixed_or_routed(engine, teachers, tmp_path):
  """topk_online against two servers mixed by weights: at k = V - 1 (one unlisted id per
  teacher, distill.teacher_pool's spread rule is then exact) the rows' top-k are the exact
  mixture of the two teachers' own distributions; routed, each row is its teacher's."""
  vocab = CharTokenizer().vocab_size
  second = Engine(teachers[1])
  servers = [start(e, max_logprobs=vocab) for e in (engine, second)]
  try:
    config = config_for('arithmetic_cached', url=servers[0].url)
    config.algorithm.name, config.algorithm.kwargs = 'topk_online', {'k': vocab - 1}
    config.teachers.more, config.teachers.weights = (servers[1].url,), (0.7, 0.3)
    run = run_lib.build_run(config, str(tmp_path))
    batch = next(trainer.make_method(run).train_batches(run_lib.train_iterator(run)))
    mask = batch['loss_mask'] != 0
    exact = sum(w * jax.nn.softmax(nnx.merge(e.graphdef, e.params)(
        batch['tokens'], batch['input_mask']).astype(np.float32), axis=-1)
        for w, e in zip((0.7, 0.3), (engine, second)))
    listed = mask[..., None] & (batch['topk_logprobs'] > -np.inf)
    assert batch['topk_ids'].shape[-1] == 2 * (vocab - 1) and listed.any(-1)[mask].all()
    np.testing.assert_allclose(
        np.exp(batch['topk_logprobs'][listed]),
        np.take_along_axis(np.asarray(exact), batch['topk_ids'], -1)[listed], rtol=1e-4)

    routed = teacher_pool.ServedTeachers(run.teacher_server.clients, (), vocab)
    route_B = np.array([0, 1] * (len(batch['tokens']) // 2), np.int32)
    rows = {**batch, pipeline.ROUTE_FIELD: np.repeat(route_B[:, None], batch['tokens'].shape[1], 1)}
    got = routed.score_rows(rows, 4, tokens=True)
    each = [c.score_rows(batch, 4, tokens=True) for c in run.teacher_server.clients]
    for b, r in enumerate(route_B):
      for field in ('topk_ids', 'topk_logprobs', 'token_logprobs'):
        np.testing.assert_array_equal(getattr(got, field)[b], getattr(each[r], field)[b])

    second.tokenizer_fingerprint = 'hf-another'   # the second server now names another one
    with pytest.raises(TeacherServerError, match=f'{servers[1].url}.*uses tokenizer hf-another'):
      run_lib.build_run(config, str(tmp_path))
  finally:
    for server in servers:
      server.stop()


def test_served_and_in_process_teachers_in_one_list_are_refused(server, teachers, tmp_path):
  config = config_for('arithmetic_cached', url=server.url)
  config.teachers.more, config.teachers.weights = (teachers[1],), (0.5, 0.5)
  with pytest.raises(ValueError, match='either all served .* a mix of the two is not built'):
    run_lib.build_run(config, str(tmp_path))
  config = config_for('arithmetic_cached', teacher=teachers[0])
  config.teachers.more, config.teachers.weights = (server.url,), (0.5, 0.5)
  with pytest.raises(ValueError, match='names servers .* need config.teacher.server'):
    run_lib.build_run(config, str(tmp_path))
  config = config_for('arithmetic_onpolicy_rkl', url=server.url)
  config.teachers.more, config.teachers.routes = (server.url,), ('a', 'b')
  with pytest.raises(ValueError, match="only topk_online's dataset batches carry"):
    run_lib.build_run(config, str(tmp_path))


class _Canned(BaseHTTPRequestHandler):
  """Answers every completion with the server's `answer` (a malformed server)."""
  protocol_version = 'HTTP/1.1'

  def log_message(self, *args):
    pass

  def do_GET(self):   # noqa: N802
    self._send({'data': [{'id': 'canned'}]})

  def do_POST(self):   # noqa: N802
    self.rfile.read(int(self.headers['Content-Length']))
    self._send(self.server.answer)

  def _send(self, body):
    data = json.dumps(body).encode()
    self.send_response(200)
    self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    self.wfile.write(data)


@pytest.mark.parametrize('position, problem, tokens', [
    ({'5': {'rank': 1}}, r"prompt_logprobs\[1\]\['5'\]\.logprob is None", False),
    ({'5': {'logprob': -0.1, 'rank': 2}}, r'prompt_logprobs\[1\] has ranks \[2\], not the top 1',
     False),
    (None, r'prompt_logprobs\[1\] is None', False),
    # on-policy scoring reads the sampled token's own entry, which vLLM always adds
    ({'7': {'logprob': -0.1, 'rank': 1}},
     r"prompt_logprobs\[1\]\['5'\] \(the log-prob of the prompt's own token 5\) is missing",
     True),
])
def test_a_malformed_response_names_the_field(position, problem, tokens):
  canned = ThreadingHTTPServer(('127.0.0.1', 0), _Canned)
  canned.answer = {'choices': [{'prompt_logprobs': [None, position]}]}
  threading.Thread(target=canned.serve_forever, daemon=True).start()
  try:
    client = TeacherClient(f'http://127.0.0.1:{canned.server_address[1]}')
    client.connect()
    with pytest.raises(MalformedResponse, match=problem):
      client.prompt_topk([[3, 5]], 1, tokens=tokens)
  finally:
    canned.shutdown()
    canned.server_close()


def test_concurrent_requests_share_one_forward_pass(engine):
  """Server-side batching: requests arriving together are scored in one call at the largest
  k, each answered with its own rows and k."""
  batcher = ScoreBatcher(engine._score_now, max_rows=64, wait_s=0.5)
  asks = [([[5, 9, 3, 7], [4, 4]], 3), ([[6, 8, 10, 12, 14, 3]], 5), ([[7, 5]], 1)]
  answers = [None] * len(asks)

  def ask(i):
    answers[i] = batcher.score(*asks[i])
  threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(60)
  assert batcher.batches_run == 1
  # The reference: all the prompts in one call at the largest k (the batch's own shape, so
  # nothing more to compile), each request's rows and k cut out of it.
  every = engine.score([p for prompts, _ in asks for p in prompts], 5)
  first = 0
  for (prompts, k), answer in zip(asks, answers):
    rows = slice(first, first + len(prompts))
    first = rows.stop
    for field in ('topk_ids', 'topk_logprobs'):
      for got, want in zip(getattr(answer, field), getattr(every, field)[rows]):
        np.testing.assert_array_equal(got, want[:, :k])
    for field in ('token_logprobs', 'token_ranks'):
      for got, want in zip(getattr(answer, field), getattr(every, field)[rows]):
        np.testing.assert_array_equal(got, want)
