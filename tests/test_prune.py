"""Importance pruning of causal-LM students (issue 19.2): nothing pruned is exact; a crafted teacher whose
unimportant parts are known loses exactly those; shapes and configs reload with transformers; bad targets."""

from __future__ import annotations

import math

import pytest
import torch
from lm_fixtures import tiny_llama, tiny_qwen2
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from distill.errors import DistillError
from distill.export.gguf import export_gguf
from distill.models.prune import block_weights, importance, plan, prune


def calibration(tok, blocks=4, length=16, seed=0):
    ids = torch.randint(3, len(tok), (blocks, length), generator=torch.Generator().manual_seed(seed))
    return ids, torch.ones_like(ids)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits[..., : model.config.vocab_size]


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
def test_pruning_nothing_is_exact(tok, make):
    teacher = make(tok, layers=4)
    ids, mask = calibration(tok)
    student, record = prune(teacher, (ids, mask), 1.0, ["depth", "width"])
    assert record["blocks_removed"] == [] and record["channels_removed"] == []
    torch.testing.assert_close(logits(student, ids), logits(teacher, ids), rtol=0, atol=0)


def test_a_crafted_teacher_loses_exactly_its_unimportant_parts(tok, tmp_path):
    teacher = tiny_llama(tok, layers=4)
    config = teacher.config
    head_dim = config.hidden_size // config.num_attention_heads
    with torch.no_grad():
        block = teacher.model.layers[2]  # a block that adds nothing to its input: an identity
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
        for layer in teacher.model.layers:
            layer.mlp.up_proj.weight[[5, 40]] = 0  # two neurons that never fire
            layer.self_attn.v_proj.weight[head_dim : 2 * head_dim] = 0  # KV group 1 outputs nothing
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[7] = 0  # channel 7 is read by nothing
        teacher.model.norm.weight[7] = 0
    ids, mask = calibration(tok)
    scores = importance(teacher, ids, mask)
    assert scores["blocks"].argmin().item() == 2 and scores["blocks"][2] == pytest.approx(0, abs=1e-12)
    # depth: 3 of 4 blocks; block 2 was an identity, so the pruned model computes exactly what the teacher does
    shallow, record = prune(teacher, (ids, mask), 0.75, ["depth"])
    assert record["blocks_removed"] == [2] and shallow.config.num_hidden_layers == 3
    torch.testing.assert_close(logits(shallow, ids), logits(teacher, ids), rtol=1e-5, atol=1e-5)
    # width: the dead neurons, the silent KV group and the unread channel score lowest
    for layer_scores in scores["neurons"]:
        assert layer_scores[[5, 40]].abs().max() == 0 and (layer_scores > 0).sum() == config.intermediate_size - 2
    assert all(group_scores.argmin().item() == 1 for group_scores in scores["groups"])
    assert scores["channels"].argmin().item() == 7
    # a real width prune (share 0.5 → every width × 0.71): the silent group and the dead channel are gone
    narrow, record = prune(teacher, (ids, mask), 0.5, ["width"])
    assert narrow.config.num_key_value_heads == 1 and all(layer["kv_groups_kept"] == [0] for layer in record["layers"])
    assert 7 in record["channels_removed"] and narrow.config.hidden_size == 22  # 32 × 0.71, a multiple of 2 heads
    # shapes and configs reload with transformers
    narrow.save_pretrained(tmp_path / "narrow")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "narrow")
    torch.testing.assert_close(logits(again, ids), logits(narrow, ids))


def test_share_and_axes_are_split_as_documented(tok):
    config = tiny_llama(tok, layers=8).config
    assert plan(config, 0.5, ["depth"])["blocks"] == 4
    # width 0.25: attention and embedding widths × 0.5, the MLP width solved for the share (here also × 0.5)
    assert plan(config, 0.25, ["width"]) == {"blocks": 8, "neurons": 32, "groups": 1, "channels": 16}
    assert plan(config, 0.25, ["depth", "width"])["blocks"] == 4


def _smollm2_config():  # SmolLM2-135M's shapes
    return LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        head_dim=64, vocab_size=64,
    )  # fmt: skip


@pytest.mark.parametrize("share", [0.75, 0.5, 0.25])
@pytest.mark.parametrize("axes", [["depth"], ["width"], ["depth", "width"]])
def test_the_kept_block_weights_come_to_the_share(share, axes):
    config = _smollm2_config()
    counts = plan(config, share, axes)
    teacher = 30 * (576 * 64 * (2 * 9 + 2 * 3) + 3 * 576 * 1536)  # q, k, v, o and the three MLP matrices
    heads = counts["groups"] * 3
    kept = counts["blocks"] * (
        counts["channels"] * 64 * (2 * heads + 2 * counts["groups"]) + 3 * counts["channels"] * counts["neurons"]
    )
    assert block_weights(config, counts) == kept
    # within 2 %: depth rounds to whole blocks (8 of 30 for a quarter), width to multiples of 32
    assert kept / teacher == pytest.approx(share, abs=0.02)
    if "width" in axes:  # multiples of 32 (q8_0 rows): GGUF quantizes every matrix, none falls back to f16
        assert counts["neurons"] % 32 == 0 and counts["channels"] % heads == 0
        assert counts["channels"] % 32 == 0 or math.lcm(heads, 32) * 4 > 576


def test_bad_prune_targets_are_one_line(tok):
    config = tiny_llama(tok, layers=4).config
    with pytest.raises(DistillError, match="leaves no block .*the teacher has 4"):
        plan(config, 0.1, ["depth"])
    with pytest.raises(DistillError, match="leaves no attention head group .*the teacher has 2"):
        plan(config, 0.01, ["width"])
    with pytest.raises(DistillError, match=r"axes \['height'\]: choose from \['depth', 'width'\]"):
        plan(config, 0.5, ["height"])
    with pytest.raises(DistillError, match=r"params 1.5: give the share"):
        plan(config, 1.5, ["depth"])


def test_a_width_pruned_student_exports_every_matrix_to_q8_0(tok, tmp_path):
    """Widths that are multiples of 32: q8_0 packs every matrix (none falls back to f16) and reloads the same."""
    gguf = pytest.importorskip("gguf")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=-(-len(tok) // 32) * 32, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    teacher = LlamaForCausalLM(config).eval()
    ids, mask = calibration(tok)
    student, record = prune(teacher, (ids, mask), 0.5, ["width"])
    assert (student.config.hidden_size, student.config.intermediate_size) == (96, 192)
    assert record["block_weights"]["kept"] / record["block_weights"]["teacher"] == pytest.approx(0.5, abs=0.02)
    path = export_gguf(student, tok, tmp_path / "student.gguf", qtype="q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors if len(t.shape) > 1}
    assert types and set(types.values()) == {"Q8_0"}, types
    again = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="student.gguf", dtype=torch.float32).eval()
    agree = (logits(again, ids).argmax(-1) == logits(student, ids).argmax(-1)).float().mean()
    assert agree > 0.95
