"""Writes the tiny Hugging Face checkpoints under tests/fixtures/hf/ (run once; outputs are committed).

Needs torch + transformers (not needed by the test suite):
    .venv/bin/pip install torch==2.13.0 transformers
    .venv/bin/python scripts/make_hf_fixtures.py [NAME ...]   # default: every fixture

Each fixture folder holds config.json, model.safetensors (or a sharded index), a byte-level BPE
tokenizer.json (150 tokens, trained here), tokenizer_config.json with a chat template, and
reference.npz: logits of transformers' eager fp32 forward pass on fixed tokens. chat_reference.json
holds transformers' own renderings and encodings of sample conversations, so the tests can check
distill's tokenizer and templates against transformers without importing it.
"""
import json
import os
import random
import shutil
import string
import sys

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   'tests', 'fixtures', 'hf')
SPECIALS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
TOKENIZER_SIZE = 150

# ChatML as in Qwen2.5: a default system turn, then <|im_start|>role\ncontent<|im_end|>\n.
CHATML = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('unknown role ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

# Llama-3 / Mistral style: renders bos_token itself and insists on alternating roles.
LLAMA_STYLE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n\\n' + message['content'] | trim + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n\\n' }}{% endif %}")

WORDS = ('the cat sat on a mat and then it ran to see what was there while we read '
         'about numbers like one two three four five six seven eight nine ten plus minus '
         'equals question answer think step hello world model student teacher small large '
         'data train learn fast slow good bad yes no why how what who').split()

CONVERSATIONS = [
    [{'role': 'user', 'content': 'what is two plus two?'},
     {'role': 'assistant', 'content': 'two plus two equals four.'}],
    [{'role': 'user', 'content': 'hello'},
     {'role': 'assistant', 'content': 'hello world!'},
     {'role': 'user', 'content': 'why is the cat on the mat?'},
     {'role': 'assistant', 'content': 'the cat sat there to learn.'}],
]
SYSTEM_CONVERSATION = [{'role': 'system', 'content': 'think step by step'}] + CONVERSATIONS[0]
SAMPLE_TEXTS = ['hello world', 'the cat sat on the mat.', ' two  spaces', 'yes, no? why!',
                '<|im_start|>user\nhi<|im_end|>']


def train_tokenizer() -> Tokenizer:
  rng = random.Random(0)
  corpus = [' '.join(rng.choice(WORDS) for _ in range(12)) + rng.choice('.?!,')
            for _ in range(400)]
  # Every printable ASCII character and newline is in the alphabet, so text round-trips.
  corpus += ['The quick brown fox jumps over the lazy dog.\nTHE QUICK BROWN FOX JUMPS OVER '
             'THE LAZY DOG!', '0123456789 ' + string.punctuation + '\n\n', 'You are a helpful assistant.']
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=TOKENIZER_SIZE, special_tokens=SPECIALS, show_progress=False))
  assert tok.get_vocab_size() == TOKENIZER_SIZE, tok.get_vocab_size()
  return tok


def write_tokenizer(base: Tokenizer, folder: str, style: str):
  tok = Tokenizer.from_str(base.to_str())
  if style == 'llama':
    # Llama 3 style: the post-processor prepends BOS; the template lives in chat_template.jinja.
    tok.post_processor = processors.TemplateProcessing(
        single='<|endoftext|> $A', pair='<|endoftext|> $A <|endoftext|> $B',
        special_tokens=[('<|endoftext|>', tok.token_to_id('<|endoftext|>'))])
    config = {'bos_token': '<|endoftext|>'}
    with open(os.path.join(folder, 'chat_template.jinja'), 'w') as f:
      f.write(LLAMA_STYLE)
  else:
    # Qwen style: no BOS token in the tokenizer config; the template sits in tokenizer_config.json.
    config = {'bos_token': None, 'chat_template': CHATML}
  tok.save(os.path.join(folder, 'tokenizer.json'))
  config.update({'tokenizer_class': 'PreTrainedTokenizerFast', 'eos_token': '<|im_end|>',
                 # The serialized AddedToken form older checkpoints use (the loader accepts str or dict).
                 'pad_token': {'__type': 'AddedToken', 'content': '<|endoftext|>', 'lstrip': False,
                               'normalized': False, 'rstrip': False, 'single_word': False},
                 'model_max_length': 256, 'clean_up_tokenization_spaces': False})
  with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f, indent=1)


COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, bos_token_id=0, eos_token_id=2, pad_token_id=0)

FIXTURES = {
    # name: (config class, overrides, tokenizer style, max shard size or None)
    'llama': (transformers.LlamaConfig, dict(num_key_value_heads=4, rms_norm_eps=1e-5), 'llama',
              None),
    'llama_gqa': (transformers.LlamaConfig, dict(num_key_value_heads=2, rope_theta=500_000.0),
                  'llama', '60KB'),
    'llama_tied': (transformers.LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=True),
                   'llama', None),
    'mistral': (transformers.MistralConfig, dict(num_key_value_heads=1, sliding_window=None,
                                                 rope_theta=1e6), 'llama', None),
    'qwen2': (transformers.Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=True),
              'chatml', None),
    'qwen3': (transformers.Qwen3Config, dict(num_key_value_heads=2, head_dim=16,
                                             rope_theta=1e6), 'chatml', None),
    'padded_vocab': (transformers.LlamaConfig, dict(num_key_value_heads=2, vocab_size=160),
                     'llama', None),
    # Llama 3.2 style: tied, llama3 rope scaling with an original context (16) inside the
    # positions used, so that all three frequency bands occur.
    'llama32': (transformers.LlamaConfig, dict(
        num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500_000.0,
        rope_scaling=dict(rope_type='llama3', factor=32.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=16)),
        'llama', None),
    # YaRN scaling and attention_bias (q, k, v and o_proj biases).
    'llama_yarn': (transformers.LlamaConfig, dict(
        num_key_value_heads=2, attention_bias=True, rope_theta=10_000.0,
        rope_scaling=dict(rope_type='yarn', factor=4.0, original_max_position_embeddings=16)),
        'llama', None),
    # Sliding window shorter than the reference tokens.
    'mistral_swa': (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=4),
                    'llama', None),
    # Gemma 2: alternating sliding / global layers, soft-capping small enough to bend the
    # random model's scores and logits, query scaling that is not head_dim.
    'gemma2': (transformers.Gemma2Config, dict(
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
        attn_logit_softcapping=2.0, final_logit_softcapping=5.0), 'llama', None),
    # Gemma 3 text: q/k norms, a local layer with its own RoPE base between global layers with
    # linear scaling (Gemma-3-4B's), untied head.
    'gemma3': (transformers.Gemma3TextConfig, dict(
        num_hidden_layers=3, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=4, tie_word_embeddings=False,
        layer_types=['full_attention', 'sliding_attention', 'full_attention'],
        rope_parameters={'full_attention': dict(rope_type='linear', factor=8.0,
                                                rope_theta=1_000_000.0),
                         'sliding_attention': dict(rope_type='default', rope_theta=10_000.0)}),
        'llama', None),
    # Phi-3 / Phi-4-mini: fused qkv and gate/up projections, partial rotary, sliding window.
    'phi3': (transformers.Phi3Config, dict(num_key_value_heads=2, partial_rotary_factor=0.5,
                                           sliding_window=5, pad_token_id=0), 'llama', None),
}
# The fixtures made before sliding windows and rope scaling keep their 8 reference tokens.
FIXTURES_BEFORE_WINDOWS = ('llama', 'llama_gqa', 'llama_tied', 'mistral', 'qwen2', 'qwen3',
                           'padded_vocab')
# Norm weights of these families are offsets from 1 (they scale by 1 + w).
PLUS_ONE_NORMS = ('gemma2', 'gemma3')


def randomize(model: torch.nn.Module, norm_center: float):
  """Scales far from HF's near-zero init so that parity tests see O(1) logits."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('norm.weight'):
        p.copy_(norm_center + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.15 * torch.randn_like(p))


def make_fixture(name: str, tokenizer: Tokenizer):
  config_cls, overrides, style, shard = FIXTURES[name]
  folder = os.path.join(OUT, name)
  shutil.rmtree(folder, ignore_errors=True)
  os.makedirs(folder)
  config = config_cls(**{'vocab_size': TOKENIZER_SIZE, **COMMON, **overrides})
  torch.manual_seed(sum(map(ord, name)))
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation='eager',
                                                        dtype=torch.float32)
  randomize(model, 0.0 if name in PLUS_ONE_NORMS else 1.0)
  model.tie_weights()
  model.eval()
  kwargs = {'max_shard_size': shard} if shard else {}
  model.save_pretrained(folder, **kwargs)
  write_tokenizer(tokenizer, folder, style)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, TOKENIZER_SIZE, size=(2, 8)).astype(np.int32)
  if name not in FIXTURES_BEFORE_WINDOWS:   # longer than the sliding windows and rope contexts
    tokens = rng.integers(0, TOKENIZER_SIZE, size=(2, 24)).astype(np.int32)
  with torch.no_grad():
    logits = model(torch.from_numpy(tokens).long()).logits.float().numpy()
  np.savez(os.path.join(folder, 'reference.npz'), tokens=tokens, logits=logits)


def chat_reference():
  """transformers' renderings and encodings, for the two tokenizer styles."""
  out = {}
  for name in ('llama', 'qwen2'):
    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(OUT, name))
    convs = CONVERSATIONS + [SYSTEM_CONVERSATION] if name == 'qwen2' else CONVERSATIONS
    out[name] = {
        'texts': {t: tok(t, add_special_tokens=False)['input_ids'] for t in SAMPLE_TEXTS},
        'chats': [{'messages': m,
                   'full': tok.apply_chat_template(m, tokenize=False),
                   'prompt': tok.apply_chat_template(m[:-1], tokenize=False,
                                                     add_generation_prompt=True)}
                  for m in convs],
    }
  with open(os.path.join(OUT, 'chat_reference.json'), 'w') as f:
    json.dump(out, f, indent=1)


def main(names):
  unknown = sorted(set(names) - set(FIXTURES))
  if unknown:
    sys.exit(f'unknown fixtures {unknown}; known: {", ".join(FIXTURES)}')
  os.makedirs(OUT, exist_ok=True)
  tokenizer = train_tokenizer()
  for name in names or FIXTURES:
    make_fixture(name, tokenizer)
  if not names:
    chat_reference()
  total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
  print(f'wrote {len(names or FIXTURES)} fixtures to {OUT} ({total / 1e6:.2f} MB in all)',
        file=sys.stderr)


if __name__ == '__main__':
  main(sys.argv[1:])
