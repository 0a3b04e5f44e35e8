"""Quantization-aware distillation: the JAX fake quantizers are the GGUF export's values, bit for
bit; gradients pass straight through; a QAD run trains and exports the weights it trained with."""
import json
import re
import warnings

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distill.data.tokenizer import CharTokenizer
from distill.eval import gguf_model, quantized
from distill.models import gguf_arch, gguf_export, gguf_quants
from distill.quant import blocks
from distill.quant import student as quant
from distill.train import config as config_lib
from distill.train import teacher as teacher_lib
from distill.train import trainer
from distill.parallel import mesh as mesh_lib
from tests.helpers import read_metrics, small_config

Q = gguf.GGMLQuantizationType


def _awkward_rows(n_cols: int) -> np.ndarray:
  """Rows that exercise the searches' edge cases: scales over 9 decades, one-sided, sparse,
  constant, zero, exact rounding ties."""
  rng = np.random.default_rng(0)
  rows = [rng.normal(size=n_cols), rng.standard_t(3, size=n_cols), rng.uniform(size=n_cols),
          -rng.uniform(size=n_cols), rng.normal(size=n_cols) * 1e-6, rng.normal(size=n_cols) * 1e3,
          rng.normal(size=n_cols) * (rng.uniform(size=n_cols) < 0.1), np.full(n_cols, 0.37),
          np.zeros(n_cols), rng.integers(-8, 8, size=n_cols).astype(float)]
  return np.stack(rows).astype(np.float32)


def test_fake_quantize_is_gguf_dequantize_of_the_export_bytes():
  # Q4_K here; Q4_0 and Q8_0 in the QAD run below; every type in
  # experiments/quantized_student/exactness.py.
  qtype = Q.Q4_K
  x = _awkward_rows(512)
  expected = gguf.quants.dequantize(gguf_quants.quantize(x, qtype), qtype).reshape(x.shape)
  size = blocks.block_size(qtype)
  got = np.asarray(jax.jit(lambda v: blocks.fake_quantize(v, qtype))(x.reshape(-1, size)))
  np.testing.assert_array_equal(got.reshape(x.shape).view(np.uint32), expected.view(np.uint32))


def test_straight_through_gradient_is_the_identity():
  master = {'w': jnp.linspace(-1.0, 1.0, 64, dtype=jnp.float32).reshape(2, 32)}
  quantized = jax.jit(lambda p: jax.tree.map(lambda w: blocks.fake_quantize(w, Q.Q4_0), p))(
      master)
  assert not np.array_equal(quantized['w'], master['w'])
  weights = jnp.arange(64, dtype=jnp.float32).reshape(2, 32)
  loss = lambda p: (quant.straight_through(p, quantized)['w'] * weights).sum()
  np.testing.assert_array_equal(loss(master), (quantized['w'] * weights).sum())
  np.testing.assert_array_equal(jax.grad(loss)(master)['w'], weights)


def test_unknown_quant_type_lists_the_known():
  config = small_config('arithmetic_student', 'scratch,small')
  config.quant.type = 'q3_k_s'
  with pytest.raises(ValueError, match=r"unknown GGUF type 'q3_k_s'; known: .*q4_k_m.*q4_0"):
    config_lib.validate(config)


@pytest.fixture(scope='module')
def qad_run(tmp_path_factory):
  """A tiny student trained from scratch with QAD at Q4_0 (its 32-wide rows take Q4_0; the
  output matrix's Q6_K falls back to Q8_0, as in the export)."""
  workdir = str(tmp_path_factory.mktemp('qad'))
  config = small_config('arithmetic_student', 'scratch,small')
  config.quant.type = 'q4_0'
  config.total_steps, config.log_steps, config.checkpoint_steps = 20, 5, 20
  config.optimizer.learning_rate = 3e-3
  config.eval.generate = False
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always', gguf_export.TypeFallbackWarning)
    trainer.train(config, workdir)
  return workdir, [str(w.message) for w in caught
                   if issubclass(w.category, gguf_export.TypeFallbackWarning)]


@pytest.fixture(scope='module')
def qad_gguf(qad_run, tmp_path_factory):
  workdir, _ = qad_run
  graphdef, params, cfg = teacher_lib.load_exported(workdir, mesh_lib.make_mesh({'data': 1}))
  path = str(tmp_path_factory.mktemp('gguf') / 'student.gguf')
  written = gguf_export.export_gguf(nnx.merge(graphdef, params), path, file_type='q4_0',
                                    tokenizer=CharTokenizer())
  return path, written, params, cfg


def test_qad_run_trains_and_exports_the_weights_it_trained_with(qad_run, qad_gguf):
  workdir, fallbacks = qad_run
  path, written, params, cfg = qad_gguf
  assert any('output.weight' in m and 'Q8_0' in m for m in fallbacks), fallbacks
  losses = [m['loss'] for m in read_metrics(workdir) if 'loss' in m]
  assert losses[-1] < 0.8 * losses[0], losses
  assert {'Q4_0', 'Q8_0', 'F32'} == set(written.values())
  # What the step computed with: the plan's fake quantization of the master weights.
  plan = quant.quant_plan(cfg, 'q4_0')
  trained_with = gguf_arch.gguf_tensors(
      jax.jit(lambda p: quant.fake_quantize(plan, p))(params), cfg, 'llama')
  for tensor in gguf.GGUFReader(path).tensors:
    stored = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    np.testing.assert_array_equal(stored.reshape(trained_with[tensor.name].shape).view(np.uint32),
                                  trained_with[tensor.name].view(np.uint32), err_msg=tensor.name)


def test_evaluate_cli_on_the_quantized_student(qad_run, qad_gguf, tmp_path, capsys):
  workdir, _ = qad_run
  out_path = str(tmp_path / 'eval.json')
  assert quantized.main([f'--model={qad_gguf[0]}', f'--reference={workdir}', '--max_batches=1',
                         f'--out={out_path}']) == 0
  with open(out_path) as f:
    out = json.load(f)
  printed = capsys.readouterr().out
  jax_col, memory = out['jax'], out['memory']
  # The run evaluated itself through the same fake quantization: the same CE.
  with open(f'{workdir}/final_metrics.json') as f:
    assert jax_col['ce'] == pytest.approx(json.load(f)['ce'], rel=1e-6)
  assert jax_col['kl_reference'] > 0 and 0 < jax_col['top1_reference'] <= 1
  assert memory['gguf_bytes'] > memory['weights_bytes'] > 0
  cfg = qad_gguf[3]
  assert memory['kv_bytes_per_1k'] == 1000 * 2 * cfg.n_layers * cfg.n_kv_heads * \
      cfg.resolved_head_dim * 2
  if 'skipped' in out['llama_cpp']:   # llama-cpp-python is an optional extra
    assert 'llama-cpp-python is not installed' in printed
  else:
    # llama.cpp multiplies quantized weights with activations it quantizes to 8 bits (Q8_0 /
    # Q8_K blocks), so its logits differ from the dequantized float ones by ~1e-2
    # (experiments/quantized_student/llama_cpp_agreement.json: 0.014 at Q4_K_M).
    assert out['llama_cpp']['max_abs_logit_diff_vs_jax'] < 0.1
  assert quantized.main(['--model=/nonexistent.gguf', f'--reference={workdir}']) == 2


def test_evaluate_refuses_a_gguf_of_another_tokenizer_before_building(qad_run, qad_gguf,
                                                                       monkeypatch, capsys):
  workdir, _ = qad_run
  monkeypatch.setattr(quantized.run_lib, 'build_run',
                      lambda *a: pytest.fail('the run was built before the tokenizer check'))
  hf_teacher = 'tests/fixtures/hf/llama_gqa'   # a byte-level BPE tokenizer; the GGUF's is char
  assert quantized.main([f'--model={qad_gguf[0]}', f'--reference={workdir}',
                         f'--teacher={hf_teacher}']) == 2
  error = capsys.readouterr().err
  assert re.search(r"tokenizer differs from the teacher's: the GGUF's gguf-[0-9a-f]{16} \(\d+ "
                   r"tokens\), the teacher's tokenizer hf-[0-9a-f]{16} \(150 tokens\)", error), error


def _vocabulary_only_gguf(path: str, tokens: list[str], bos_id: int) -> str:
  writer = gguf.GGUFWriter(path, 'llama')
  writer.add_tokenizer_model('gpt2')
  writer.add_token_list(tokens)
  writer.add_bos_token_id(bos_id)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.close()
  return path


def test_tokenizer_check_names_the_first_differing_token(tmp_path):
  tokenizer = CharTokenizer()
  tokens = gguf_export.token_list(tokenizer, 64)
  gguf_model.check_tokenizer(_vocabulary_only_gguf(str(tmp_path / 'same.gguf'), tokens, 1),
                             tokenizer, "the teacher's")
  tokens[7] = 'x'   # '4' in the character vocabulary
  with pytest.raises(ValueError, match=r"token 7 is 'x' in the GGUF, '4' in the teacher's; "
                                       r"the GGUF's gguf-[0-9a-f]{16} \(64 tokens\), the "
                                       r"teacher's tokenizer char-[0-9a-f]{16} \(46 tokens\)"):
    gguf_model.check_tokenizer(_vocabulary_only_gguf(str(tmp_path / 'x.gguf'), tokens, 1),
                               tokenizer, "the teacher's")
  tokens[7] = '4'
  with pytest.raises(ValueError, match=r"its BOS id is 3, the teacher's tokenizer's 1"):
    gguf_model.check_tokenizer(_vocabulary_only_gguf(str(tmp_path / 'bos.gguf'), tokens, 3),
                               tokenizer, "the teacher's")
