import pytest

from longgen_jax import AttentionSpec, ModelConfig, layer_pattern, parse_spec, preset
from longgen_jax.model.config import PRESETS

F, S = AttentionSpec.full(), AttentionSpec.sink_window(64, 1984)


def test_placements():
  assert layer_pattern(8, 3, S, "middle") == (S, S, F, F, F, S, S, S)
  assert layer_pattern(8, 3, S, "bottom") == (F, F, F, S, S, S, S, S)
  assert layer_pattern(8, 3, S, "top") == (S, S, S, S, S, F, F, F)
  inter = layer_pattern(9, 3, S, "interleaved")
  assert sum(x.is_full for x in inter) == 3 and inter[0] == S and inter[-1] == S
  with pytest.raises(ValueError, match="placement"):
    layer_pattern(8, 3, S, "sideways")
  with pytest.raises(ValueError, match="num_full"):
    layer_pattern(8, 9, S)


def test_presets():
  c = preset("llama2_7b")
  assert c.num_layers == 32 and c.num_full_layers == 12
  assert all(s.is_full for s in c.layer_specs[10:22]) and c.layer_specs[0] == S
  assert preset("llama2_7b_full").num_full_layers == 32
  c70 = preset("llama2_70b")
  assert c70.num_kv_heads == 8 and 25 <= c70.num_full_layers <= 30
  assert all(s.is_full for s in c70.layer_specs[c70.num_layers // 2 - 5: c70.num_layers // 2 + 5])
  assert preset("llama2_7b", num_layers=8).num_full_layers == 3
  for name in PRESETS:
    preset(name)
  with pytest.raises(ValueError, match="unknown preset"):
    preset("gpt2")


def test_parse_and_json_round_trip():
  assert parse_spec("block_sparse(64, 16, 64)") == AttentionSpec.block_sparse(64, 16, 64)
  assert parse_spec("block_sparse(64,16,64,homo)").homo_head
  for spec in (F, S, AttentionSpec.block_sparse(8, 2, 4, True)):
    assert parse_spec(str(spec)) == spec
  with pytest.raises(ValueError, match="cannot parse"):
    parse_spec("window(3)")
  c = preset("tiny", sparse="block_sparse(4,2,3)", rope_theta=5e5)
  assert ModelConfig.from_json(c.to_json()) == c
  with pytest.raises(ValueError, match="unknown ModelConfig keys"):
    ModelConfig.from_dict({**c.to_dict(), "n_embd": 3})
