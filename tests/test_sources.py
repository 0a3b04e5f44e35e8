"""HF tokenizers and chat templates against tokenizers' / transformers' own results, and the JSONL,
Parquet and TFDS sources feeding the unchanged grain pipeline."""
import json
import os
import pickle

import pytest
import tensorflow_datasets as tfds
from tokenizers import Tokenizer

from distill.data import pipeline, tasks
from distill.data.hf_tokenizer import ChatTemplate, ChatTemplateError, HFTokenizer
from distill.data.sources import (JsonlSource, ParquetSource, RowError, TfdsSource, get_source)

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'hf')
REFERENCE = json.load(open(os.path.join(FIXTURES, 'chat_reference.json')))
STYLES = ('llama', 'qwen2')   # BOS-adding post-processor + .jinja template; ChatML in the config


def tokenizer(style):
  return HFTokenizer(os.path.join(FIXTURES, style))


# ---- tokenizer ----------------------------------------------------------------------------------

@pytest.mark.parametrize('style', STYLES)
def test_encodings_equal_tokenizers_and_transformers(style):
  tok = tokenizer(style)
  raw = Tokenizer.from_file(os.path.join(FIXTURES, style, 'tokenizer.json'))
  assert REFERENCE[style]['texts']   # an empty fixture would make the loop check nothing
  for text, want in REFERENCE[style]['texts'].items():
    assert tok.encode(text) == want == raw.encode(text, add_special_tokens=False).ids, text


def test_special_ids_and_vocab():
  llama, qwen = tokenizer('llama'), tokenizer('qwen2')
  assert (llama.bos_id, llama.eos_id, llama.pad_id, llama.add_bos) == (0, 2, 0, True)
  # Qwen style: no bos_token in tokenizer_config.json -> config.json's bos_token_id; no BOS added.
  assert (qwen.bos_id, qwen.eos_id, qwen.pad_id, qwen.add_bos) == (0, 2, 0, False)
  assert llama.vocab_size == qwen.vocab_size == 150
  assert llama.fingerprint() == tokenizer('llama').fingerprint() != qwen.fingerprint()
  assert llama.fingerprint() == tokenizer('padded_vocab').fingerprint()


def test_decode():
  tok = tokenizer('qwen2')
  text = 'the cat sat on the mat.'
  assert tok.decode(tok.encode(text)) == text
  ids = [tok.pad_id, tok.bos_id] + tok.encode(text) + [tok.eos_id] + tok.encode('hello')
  assert tok.decode(ids) == text
  assert tok.decode(tok.encode('<|im_start|>user')) == '<|im_start|>user'
  with pytest.raises(ValueError, match='outside the vocabulary'):
    tok.decode([155])


def test_missing_tokenizer_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='no tokenizer.json'):
    HFTokenizer(str(tmp_path))
  (tmp_path / 'tokenizer.json').write_bytes(
      open(os.path.join(FIXTURES, 'llama', 'tokenizer.json'), 'rb').read())
  with pytest.raises(ValueError, match='no eos_token'):
    HFTokenizer(str(tmp_path))
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'eos_token': '<nope>'}))
  with pytest.raises(ValueError, match="eos_token='<nope>' is not in the vocabulary"):
    HFTokenizer(str(tmp_path))


# ---- chat templates -----------------------------------------------------------------------------

@pytest.mark.parametrize('style', STYLES)
def test_chat_rendering_equals_transformers(style):
  template = tokenizer(style).chat_template
  assert REFERENCE[style]['chats']   # an empty fixture would make the loop check nothing
  for chat in REFERENCE[style]['chats']:
    messages = chat['messages']
    assert template.render(messages) == chat['full']
    assert template.render(messages[:-1], add_generation_prompt=True) == chat['prompt']
    prompt, completion = template.split(messages)
    assert completion == messages[-1]['content']
    # The pipeline adds BOS and EOS itself, so split drops the rendered ones.
    bos = template.special_tokens.get('bos_token', '')
    assert bos + prompt == chat['prompt']
    assert chat['full'].startswith(chat['prompt'] + completion)


@pytest.mark.parametrize('style', STYLES)
def test_chat_rendering_equals_live_transformers(style):
  transformers = pytest.importorskip('transformers')
  hf_tok = transformers.AutoTokenizer.from_pretrained(os.path.join(FIXTURES, style))
  messages = [{'role': 'user', 'content': 'how many legs has a cat?'},
              {'role': 'assistant', 'content': 'four, why?'}]
  ours = tokenizer(style)
  for gen in (False, True):
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert ours.chat_template.render(messages, add_generation_prompt=gen) == text
    assert ours.encode(text) == hf_tok(text, add_special_tokens=False)['input_ids']


def test_chat_split_errors():
  template = tokenizer('llama').chat_template
  with pytest.raises(ChatTemplateError, match='row 7: the last message must be the assistant'):
    template.split([{'role': 'user', 'content': 'hi'}], row='row 7')
  with pytest.raises(ChatTemplateError, match='row 8: chat template failed.*roles must alternate'):
    template.split([{'role': 'assistant', 'content': 'a'}, {'role': 'assistant', 'content': 'b'}],
                   row='row 8')
  with pytest.raises(ChatTemplateError, match='string "role" and "content"'):
    template.split([{'role': 'assistant', 'content': 3}])
  odd = ChatTemplate("{% if add_generation_prompt %}>{% endif %}"
                     "{% for m in messages %}{{ m['content'] }}{% endfor %}")
  with pytest.raises(ChatTemplateError, match='prefix'):
    odd.split([{'role': 'user', 'content': 'a'}, {'role': 'assistant', 'content': 'b'}])
  with pytest.raises(ValueError, match='does not compile'):
    ChatTemplate('{% for %}')


def test_template_is_sandboxed():
  evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
  with pytest.raises(ChatTemplateError, match='SecurityError|unsafe'):
    evil.render([{'role': 'user', 'content': 'x'}])


# ---- JSONL / Parquet ----------------------------------------------------------------------------

PLAIN = [{'prompt': f'what is {i} plus {i}?', 'completion': f'{2 * i}', 'id': i} for i in range(8)]
CHATS = [{'messages': [{'role': 'user', 'content': f'hello {w}'},
                       {'role': 'assistant', 'content': f'the {w} sat on the mat.'}]}
         for w in ('cat', 'model', 'teacher', 'student')]


def write_jsonl(path, rows, raw_lines=()):
  with open(path, 'w') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')
    for line in raw_lines:
      f.write(line + '\n')
  return str(path)


def all_examples(source, split='train'):
  return [source.example(split, i) for i in range(source.num_examples(split))]


def test_chat_jsonl_feeds_the_pipeline(tmp_path):
  tok = tokenizer('qwen2')
  source = JsonlSource(write_jsonl(tmp_path / 'chat.jsonl', CHATS), messages_field='messages',
                       chat_template=tok)
  assert source.splits == ('train',) and source.num_examples('train') == 4
  prompt, completion = source.example('train', 1)
  assert prompt == ('<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n'
                    '<|im_start|>user\nhello model<|im_end|>\n<|im_start|>assistant\n')
  assert completion == 'the model sat on the mat.'
  it = pipeline.make_iterator(source, tok, split='train', prompt_len=64, completion_len=16,
                              batch_size=4, seed=0, num_epochs=1, shuffle=False)
  batch = next(it)
  assert batch['tokens'].shape == (4, 80) and batch['loss_mask'].shape == (4, 80)
  for row, (p, c) in enumerate(all_examples(source)):
    real = batch['tokens'][row][batch['input_mask'][row] == 1]
    bos = [tok.bos_id] if tok.add_bos else []   # Qwen tokenizers add no BOS
    assert list(real) == bos + tok.encode(p) + tok.encode(c) + [tok.eos_id]
    learned = batch['targets'][row][batch['loss_mask'][row] == 1]
    assert list(learned) == tok.encode(c) + [tok.eos_id]   # completion and EOS, nothing else
    # ChatML's EOS (<|im_end|>) also closes prompt turns, so decode the completion on its own.
    assert tok.decode(learned) == c


THINKING = os.path.join(os.path.dirname(__file__), 'fixtures', 'qwen3_thinking')


@pytest.mark.parametrize('enable_thinking', [True, False])
def test_task_kwargs_choose_the_thinking_mode(tmp_path, enable_thinking):
  rows = [{'messages': [{'role': 'user', 'content': 'two plus two?'},
                        {'role': 'assistant', 'content': 'four.',
                         'reasoning_content': 'add them.'}]}]
  kwargs = dict(path=write_jsonl(tmp_path / 'think.jsonl', rows), messages_field='messages',
                chat_template=THINKING)
  task = tasks.get_task('jsonl', **kwargs, enable_thinking=enable_thinking)   # config.task
  messages = rows[0]['messages']
  expected = HFTokenizer(THINKING).chat_template.split(messages, enable_thinking=enable_thinking)
  assert task.example('train', 0) == expected
  assert expected[1].endswith('four.') and ('add them.' in expected[1]) is enable_thinking
  # Without the kwarg the template's own default (Qwen3's: thinking) applies.
  assert tasks.get_task('jsonl', **kwargs).example('train', 0)[1] == HFTokenizer(
      THINKING).chat_template.split(messages, enable_thinking=True)[1]


def test_thinking_mode_refused_without_a_thinking_template(tmp_path):
  path = write_jsonl(tmp_path / 'chat.jsonl', CHATS)
  with pytest.raises(ValueError, match="enable_thinking=False: this chat template has no "
                                       "thinking mode: it never reads 'enable_thinking'"):
    tasks.get_task('jsonl', path=path, messages_field='messages',
                   chat_template=os.path.join(FIXTURES, 'qwen2'), enable_thinking=False)
  with pytest.raises(ValueError, match='enable_thinking=True needs a chat template'):
    tasks.get_task('jsonl', path=path, enable_thinking=True)


def test_sources_pickle_for_grain_workers(tmp_path, tfds_dir):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.Table.from_pylist(CHATS), tmp_path / 'chat.parquet')
  tok = tokenizer('qwen2')
  sources = [JsonlSource(write_jsonl(tmp_path / 'chat.jsonl', CHATS), messages_field='messages',
                         chat_template=tok),
             ParquetSource(str(tmp_path / 'chat.parquet'), messages_field='messages',
                           chat_template=tok),
             TfdsSource('distill_tiny_chat', tfds_dir, messages_field='messages',
                        chat_template=tok)]
  for source in sources:
    copy = pickle.loads(pickle.dumps(source))
    assert all_examples(copy) == all_examples(source)
  copy = pickle.loads(pickle.dumps(tok))
  assert copy.encode('hello world') == tok.encode('hello world')
  assert copy.fingerprint() == tok.fingerprint()


def test_plain_jsonl_with_deterministic_eval_split(tmp_path):
  path = write_jsonl(tmp_path / 'plain.jsonl', PLAIN)
  source = JsonlSource(path, eval_fraction=0.25)
  assert source.splits == ('train', 'eval')
  train, evals = all_examples(source), all_examples(source, 'eval')
  assert len(train) == 6 and len(evals) == 2
  everything = {(r['prompt'], r['completion']) for r in PLAIN}
  assert set(train) | set(evals) == everything and not set(train) & set(evals)
  assert all_examples(JsonlSource(path, eval_fraction=0.25), 'eval') == evals
  reseeded = [all_examples(JsonlSource(path, eval_fraction=0.25, split_seed=s), 'eval')
              for s in range(1, 6)]
  assert any(r != evals for r in reseeded)
  separate = JsonlSource(path, eval_path=write_jsonl(tmp_path / 'eval.jsonl', PLAIN[:3]))
  assert separate.num_examples('train') == 8 and separate.num_examples('eval') == 3
  with pytest.raises(ValueError, match='has no split'):
    source.example('test', 0)


def test_jsonl_errors_name_file_and_line(tmp_path):
  bad_json = write_jsonl(tmp_path / 'a.jsonl', PLAIN[:2], ['{"prompt": "x", '])
  with pytest.raises(RowError, match=r'a\.jsonl:3: invalid JSON'):
    JsonlSource(bad_json)
  missing = write_jsonl(tmp_path / 'b.jsonl', PLAIN[:1] + [{'prompt': 'only'}])
  with pytest.raises(RowError, match=r"b\.jsonl:2: missing field\(s\) \['completion'\]"):
    JsonlSource(missing)
  typed = write_jsonl(tmp_path / 'c.jsonl', [{'prompt': 'x', 'completion': 5}])
  with pytest.raises(RowError, match=r"c\.jsonl:1: field 'completion' must be a string"):
    JsonlSource(typed)
  not_assistant = write_jsonl(tmp_path / 'd.jsonl', [{'messages': [{'role': 'user', 'content': 'x'}]}])
  with pytest.raises(RowError, match=r'd\.jsonl:1: the last message must be the assistant'):
    JsonlSource(not_assistant, messages_field='messages', chat_template=tokenizer('qwen2'))
  with pytest.raises(ValueError, match='needs a chat_template'):
    JsonlSource(not_assistant, messages_field='messages')
  with pytest.raises(FileNotFoundError, match='no data file matches'):
    JsonlSource(str(tmp_path / 'nope-*.jsonl'))


def test_skip_policy_and_empty_files(tmp_path):
  mixed = write_jsonl(tmp_path / 'mixed.jsonl', PLAIN[:3] + [{'prompt': 'only'}] + PLAIN[3:5],
                      ['not json', ''])
  source = JsonlSource(mixed, on_error='skip')
  assert source.num_skipped == 2 and source.num_examples('train') == 5
  assert any('mixed.jsonl:4' in m for m in source.skipped_examples)
  assert all_examples(source) == [(r['prompt'], r['completion']) for r in PLAIN[:5]]
  with pytest.raises(ValueError, match='no examples'):
    JsonlSource(write_jsonl(tmp_path / 'empty.jsonl', []))
  with pytest.raises(ValueError, match=r'no examples .*\(2 bad rows skipped\)'):
    JsonlSource(write_jsonl(tmp_path / 'bad.jsonl', [], ['x', '{}']), on_error='skip')
  with pytest.raises(ValueError, match='on_error'):
    JsonlSource(mixed, on_error='ignore')


def test_parquet_matches_jsonl(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.Table.from_pylist(PLAIN), tmp_path / 'plain.parquet')
  pq.write_table(pa.Table.from_pylist(CHATS), tmp_path / 'chat.parquet')
  plain = ParquetSource(str(tmp_path / 'plain.parquet'), eval_fraction=0.25)
  same = JsonlSource(write_jsonl(tmp_path / 'plain.jsonl', PLAIN), eval_fraction=0.25)
  assert all_examples(plain) == all_examples(same)
  assert all_examples(plain, 'eval') == all_examples(same, 'eval')
  chat = ParquetSource(str(tmp_path / 'chat.parquet'), messages_field='messages',
                       chat_template=os.path.join(FIXTURES, 'qwen2'))
  assert all_examples(chat) == all_examples(JsonlSource(
      write_jsonl(tmp_path / 'chat.jsonl', CHATS), messages_field='messages',
      chat_template=os.path.join(FIXTURES, 'qwen2')))
  with pytest.raises(ValueError, match=r"missing column\(s\) \['answer'\]"):
    ParquetSource(str(tmp_path / 'plain.parquet'), completion_field='answer')


def test_get_source(tmp_path):
  source = get_source('jsonl', write_jsonl(tmp_path / 'p.jsonl', PLAIN))
  assert isinstance(source, JsonlSource) and source.num_examples('train') == 8
  with pytest.raises(ValueError, match="unknown data source 'csv'; valid: jsonl, parquet, tfds"):
    get_source('csv')


# ---- TFDS (ArrayRecord, no TensorFlow) ------------------------------------------------------------

class DistillTinyChat(tfds.core.GeneratorBasedBuilder):
  """PLAIN as a TFDS dataset with 'train' and 'test' splits, written as ArrayRecord."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    turn = {'role': tfds.features.Text(), 'content': tfds.features.Text()}
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'prompt': tfds.features.Text(), 'completion': tfds.features.Text(),
        'messages': tfds.features.Sequence(turn)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(PLAIN[:6]),
            'test': self._generate_examples(PLAIN[6:])}

  def _generate_examples(self, rows):
    for row in rows:
      yield row['id'], {'prompt': row['prompt'], 'completion': row['completion'],
                        'messages': [{'role': 'user', 'content': row['prompt']},
                                     {'role': 'assistant', 'content': row['completion']}]}


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  DistillTinyChat(data_dir=data_dir, file_format='array_record').download_and_prepare()
  return data_dir


def test_tfds_source_feeds_the_pipeline(tfds_dir):
  tok = tokenizer('llama')
  source = TfdsSource('distill_tiny_chat', tfds_dir)
  assert source.splits == ('train', 'eval')
  assert (source.num_examples('train'), source.num_examples('eval')) == (6, 2)
  plain = {(r['prompt'], r['completion']) for r in PLAIN}
  assert set(all_examples(source)) | set(all_examples(source, 'eval')) == plain
  batch = next(pipeline.make_iterator(source, tok, split='train', prompt_len=16,
                                      completion_len=4, batch_size=2, seed=0))
  assert batch['tokens'].shape == (2, 20)
  chat = TfdsSource('distill_tiny_chat', tfds_dir, messages_field='messages',
                    chat_template=tok, eval_split=None)
  assert chat.splits == ('train',)
  prompt, completion = chat.example('train', 0)
  assert prompt.startswith('<|im_start|>user\n\nwhat is ') and completion.isdigit()
  eval_batch = next(pipeline.make_eval_iterator(chat, tok, prompt_len=40, completion_len=4,
                                                batch_size=4, split='train'))
  assert eval_batch['loss_mask'].sum() > 0


def test_tfds_errors(tfds_dir):
  with pytest.raises(ValueError, match="TFDS dataset 'no_such_dataset_xyz' not found"):
    TfdsSource('no_such_dataset_xyz', tfds_dir)
  with pytest.raises(ValueError, match=r"missing feature\(s\) \['answer'\]"):
    TfdsSource('distill_tiny_chat', tfds_dir, completion_field='answer')
  with pytest.raises(ValueError, match="no split 'validation'"):
    TfdsSource('distill_tiny_chat', tfds_dir, eval_split='validation')
