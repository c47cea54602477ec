"""GGUF grids for quantization-aware distillation: ``project`` is gguf-py's quantize -> dequantize bit for bit,
``fake_quant`` is its straight-through form, ``attach``/``detach`` put a tiny Llama on the grid, and the 4/5-bit GGUF
exports write exactly the projected weights (read back with gguf-py and with transformers)."""

import copy
import importlib.util
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize
from lm_fixtures import tiny_llama
from torch.nn.utils import parametrize
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from distill.errors import DistillError
from distill.export.gguf import export_gguf
from distill.models import gguf_grid
from distill.models.gguf_grid import (
    QTYPES,
    attach,
    detach,
    fake_quant,
    file_bytes,
    grid_types,
    project,
    quantizable,
    rounded,
)

pytestmark = pytest.mark.usefixtures("one_thread")

NEW_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1")


def _reference(w: np.ndarray, qtype: str) -> np.ndarray:
    kind = gguf.GGMLQuantizationType[qtype.upper()]
    with np.errstate(all="ignore"):  # float32-subnormal blocks: 1/d overflows, as in llama.cpp
        return dequantize(quantize(w, kind), kind)


def _bits(x) -> np.ndarray:
    x = x.detach().numpy() if isinstance(x, torch.Tensor) else x
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def _cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ties = np.zeros((4, 32), np.float32)
    ties[0, [3, 7]] = 0.5, -0.5  # |max| tie: the first (positive) one sets the sign of d
    ties[1, [3, 7]] = -0.5, 0.5
    ties[2] = rng.uniform(-0.4, 0.4, 32)
    ties[2, [0, 31]] = -0.5, 0.5
    ties[3] = np.where(np.arange(32) % 2, 1.5, -1.5)
    single = np.zeros((3, 32), np.float32)
    single[0, 5], single[1, 0], single[2, 31] = 0.7, -0.7, 3e-5
    halves = np.concatenate([[127.0], np.arange(31) - 15.5])[None]  # q8_0: d = 1, codes k + 0.5 round away from 0
    return {
        "normal 1e-3": rng.standard_normal((8, 64)) * 1e-3,
        "normal 1": rng.standard_normal((8, 64)),
        "normal 100": rng.standard_normal((8, 64)) * 100,
        "zeros": np.stack([np.zeros(32), -np.zeros(32), np.where(np.arange(32) % 2, 0.0, -0.0)]),
        "ties in |max|": ties,
        "exact halves": np.concatenate([halves, -halves]),
        "a single nonzero": single,
        "constant": np.stack([np.full(32, 0.25), np.full(32, -3.0), np.full(32, 1e-7)]),
        "float16-subnormal scale": rng.standard_normal((4, 64)) * np.array([[1e-5], [1e-6], [1e-7], [1e-8]]),
        "float32-subnormal": rng.standard_normal((2, 64)) * np.array([[1e-38], [1e-41]]),
        "matrix 64x96": rng.standard_normal((64, 96)) * 0.02,
    }


@pytest.mark.parametrize("qtype", QTYPES)
def test_project_is_gguf_py_quantize_then_dequantize_bit_for_bit(qtype):
    for case, w in _cases().items():
        w = w.astype(np.float32)
        got = project(torch.from_numpy(w), qtype)
        assert got.dtype == torch.float32 and got.shape == w.shape
        assert np.array_equal(_bits(got), _bits(_reference(w, qtype))), case


@pytest.mark.parametrize("qtype", QTYPES)
def test_project_rounds_chunk_by_chunk_as_gguf_py_rounds_the_whole(qtype, monkeypatch):
    """``project`` rounds ``CHUNK_BLOCKS`` blocks at a time in place: chunk edges (a last short chunk too) change
    no bit, and the weight given is not written to."""
    monkeypatch.setattr(gguf_grid, "CHUNK_BLOCKS", 3)
    w = np.concatenate([case.astype(np.float32).reshape(-1, 32) for case in _cases().values()])  # 89 blocks
    given = torch.from_numpy(w.copy())
    got = project(given, qtype)
    assert np.array_equal(_bits(got), _bits(_reference(w, qtype)))
    assert np.array_equal(_bits(given), _bits(w))


def test_project_reads_other_dtypes_as_float32_and_refuses_ragged_rows():
    w = torch.randn(4, 64).to(torch.bfloat16)
    assert torch.equal(project(w, "q4_0"), project(w.float(), "q4_0"))
    with pytest.raises(DistillError, match=r"\(4, 48\) to q4_1: rows must be a multiple of 32 values") as err:
        project(torch.randn(4, 48), "q4_1")
    assert "\n" not in str(err.value)
    with pytest.raises(DistillError, match="q4_k"):
        project(torch.randn(4, 32), "q4_k")


@pytest.mark.parametrize("qtype", QTYPES)
def test_project_is_idempotent_on_weights(qtype):
    """What lets a run save the projected weights and the export pack them again unchanged."""
    rng = np.random.default_rng(1)
    for scale in (1e-3, 0.02, 1.0, 100.0):
        once = project(torch.from_numpy((rng.standard_normal((32, 256)) * scale).astype(np.float32)), qtype)
        assert np.array_equal(_bits(project(once, qtype)), _bits(once)), scale


def test_where_project_is_not_idempotent():
    """Two corner cases, pinned so that a change shows. (1) A block whose float16 scale underflows to 0 (every |w|
    below ~2.4e-7 for q4_0, ~4.8e-7 q5_0, ~3.8e-6 q8_0) projects to zeros whose sign the second pass may flip: equal
    values, different bits. (2) q4_1/q5_1 blocks whose minimum is ~2^17 (q5_1: ~2^18) steps or more from zero: d*q + m
    is not exact in float32, so the second pass moves a value by about one float32 ulp."""
    rng = np.random.default_rng(2)
    tiny = torch.from_numpy((rng.standard_normal((16, 32)) * 1e-8).astype(np.float32))
    for qtype in ("q4_0", "q5_0", "q8_0"):
        once = project(tiny, qtype)
        assert torch.equal(project(once, qtype), once) and not np.array_equal(_bits(project(once, qtype)), _bits(once))
    for qtype in ("q4_1", "q5_1"):
        assert np.array_equal(_bits(project(project(tiny, qtype), qtype)), _bits(project(tiny, qtype)))

    offset = torch.from_numpy((64 + rng.standard_normal((64, 32)) * 1e-3).astype(np.float32))
    for qtype in ("q4_1", "q5_1"):
        once, twice = project(offset, qtype), project(project(offset, qtype), qtype)
        assert not torch.equal(once, twice)
        assert ((twice - once).abs() <= torch.finfo(torch.float32).eps * 64).all()  # one ulp at 64
    for qtype in ("q4_0", "q5_0", "q8_0"):
        assert torch.equal(project(project(offset, qtype), qtype), project(offset, qtype))


@pytest.mark.parametrize("qtype", QTYPES)
def test_fake_quant_forward_is_the_grid_and_its_gradient_the_identity(qtype):
    w = torch.randn(8, 64, requires_grad=True)
    out = fake_quant(w, qtype)
    assert np.array_equal(_bits(out), _bits(project(w, qtype)))
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    assert fake_quant(w.detach().to(torch.bfloat16), qtype).dtype == torch.bfloat16  # a parametrization keeps dtypes


def _by_hand(model, qtype: str):
    """A copy of ``model`` whose grid weights were replaced by their projections, without parametrizations."""
    copied = copy.deepcopy(model)
    params = dict(copied.named_parameters())
    with torch.no_grad():
        for name, kind in grid_types(copied, qtype).items():
            params[name].copy_(project(params[name], kind))
    return copied


def _tied_llama(tok, **overrides) -> LlamaForCausalLM:
    config = copy.deepcopy(tiny_llama(tok, layers=2).config)
    for key, value in {"tie_word_embeddings": True, **overrides}.items():
        setattr(config, key, value)
    torch.manual_seed(3)
    return LlamaForCausalLM(config).eval()


def _ids(tok):
    return torch.randint(0, len(tok), (2, 16), generator=torch.Generator().manual_seed(0))


def test_grid_types_of_a_llama(tok):
    model = tiny_llama(tok, layers=2)
    types = grid_types(model, "q4_1")
    assert types["model.embed_tokens.weight"] == types["lm_head.weight"] == "q8_0"
    assert types["model.layers.1.self_attn.k_proj.weight"] == types["model.layers.0.mlp.down_proj.weight"] == "q4_1"
    assert len(types) == 7 * 2 + 2 and quantizable(model, "q4_1") == list(types)
    assert not any("norm" in name for name in types)
    tied = grid_types(_tied_llama(tok), "q5_0")
    assert "lm_head.weight" not in tied and tied["model.embed_tokens.weight"] == "q8_0" and len(tied) == 7 * 2 + 1


def test_attach_rounds_the_forward_and_detach_leaves_the_grid(tok):
    model = tiny_llama(tok, layers=2)
    expected = _by_hand(model, "q4_0")
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    types, size = grid_types(model, "q4_0"), file_bytes(model, "q4_0")
    attach(model, "q4_0")
    assert model.model.layers[0].self_attn.q_proj.parametrizations.weight.original is q_proj
    assert grid_types(model, "q4_0") == types and file_bytes(model, "q4_0") == size  # plain names while attached
    with pytest.raises(DistillError, match="already on a GGUF grid"):
        attach(model, "q4_0")
    with torch.no_grad():
        assert torch.equal(model(_ids(tok)).logits, expected(_ids(tok)).logits)
    model(_ids(tok)).logits.sum().backward()  # gradients reach the float32 originals
    assert q_proj.grad is not None and q_proj.grad.abs().sum() > 0

    detach(model)
    assert model.model.layers[0].self_attn.q_proj.weight is q_proj  # the same Parameter: an optimizer keeps it
    assert not any("parametrizations" in name for name, _ in model.named_parameters())
    want = expected.state_dict()
    for name, tensor in model.state_dict().items():
        assert np.array_equal(_bits(tensor), _bits(want[name])), name


def test_a_tied_head_stays_tied_and_reads_the_projected_embedding(tok):
    model = _tied_llama(tok)
    expected = _by_hand(model, "q5_1")
    assert expected.lm_head.weight is expected.model.embed_tokens.weight
    embedding = model.model.embed_tokens.weight
    types = grid_types(model, "q5_1")
    attach(model, "q5_1")
    assert grid_types(model, "q5_1") == types
    head, embed = model.lm_head.parametrizations.weight, model.model.embed_tokens.parametrizations.weight
    assert head.original is embed.original is embedding
    assert isinstance(head[0], type(embed[0])) and head[0].qtype == embed[0].qtype == "q8_0"
    with torch.no_grad():
        assert torch.equal(model(_ids(tok)).logits, expected(_ids(tok)).logits)
    detach(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight is embedding
    assert np.array_equal(_bits(embedding), _bits(expected.model.embed_tokens.weight))


def test_attach_refuses_rows_that_are_not_a_multiple_of_32(tok):
    model = _tied_llama(tok, intermediate_size=48)
    with pytest.raises(DistillError, match=r"model\.layers\.0\.mlp\.down_proj\.weight has shape \(32, 48\)") as err:
        attach(model, "q4_0")
    assert "\n" not in str(err.value) and "multiple of 32" in str(err.value)
    assert not any("parametrizations" in name for name, _ in model.named_parameters())  # left untouched


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' reverse of the llama.cpp q/k permutation (whole rows move; blocks within a row do not)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read_back(path, model) -> tuple[dict[str, np.ndarray], dict[str, str], int]:
    """The file's tensors dequantized (q/k un-permuted) under HF names, their types, and their data bytes."""
    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    hf_names = {name_map.get_name(n, try_suffixes=(".weight",)): n for n in model.state_dict()}
    tensors, types, n_bytes = {}, {}, 0
    for t in gguf.GGUFReader(path).tensors:
        data = dequantize(np.asarray(t.data), t.tensor_type)
        if t.name.endswith("attn_q.weight"):
            data = _unpermute(data, config.num_attention_heads)
        elif t.name.endswith("attn_k.weight"):
            data = _unpermute(data, config.num_key_value_heads)
        tensors[hf_names[t.name]], types[hf_names[t.name]] = data, t.tensor_type.name
        n_bytes += int(t.n_bytes)
    return tensors, types, n_bytes


@pytest.mark.parametrize("qtype", [*NEW_TYPES, "q8_0"])
def test_export_writes_exactly_the_projected_weights(tok, qtype, tmp_path):
    model = detach(attach(tiny_llama(tok, layers=2, seed=4), qtype))
    path = export_gguf(model, tok, tmp_path / f"qad-{qtype}.gguf", qtype=qtype)
    assert gguf.GGUFReader(path).get_field("general.file_type").contents() == getattr(
        gguf.LlamaFileType, f"MOSTLY_{qtype.upper()}"
    )
    tensors, types, n_bytes = _read_back(path, model)
    state = model.state_dict()
    assert set(tensors) == set(state)
    for name, tensor in state.items():
        assert tensors[name].shape == tuple(tensor.shape), name
        assert np.array_equal(_bits(tensors[name]), _bits(tensor)), name
    grid = grid_types(model, qtype)
    assert types == {name: grid[name].upper() if name in grid else "F32" for name in state}
    assert n_bytes == file_bytes(model, qtype)

    # transformers' GGUF loader dequantizes with gguf-py and un-permutes q/k: the same float32 weights come back.
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    back = reloaded.state_dict()
    for name, tensor in state.items():
        assert np.array_equal(_bits(back[name]), _bits(tensor)), name
    with torch.no_grad():
        assert torch.equal(reloaded(_ids(tok)).logits, model(_ids(tok)).logits)


def test_a_tied_export_keeps_one_q8_0_embedding(tok, tmp_path):
    model = detach(attach(_tied_llama(tok), "q4_0"))
    path = export_gguf(model, tok, tmp_path / "tied.gguf", qtype="q4_0")
    tensors, types, n_bytes = _read_back(path, model)
    assert "lm_head.weight" not in types and types["model.embed_tokens.weight"] == "Q8_0"
    assert np.array_equal(_bits(tensors["model.embed_tokens.weight"]), _bits(model.model.embed_tokens.weight))
    assert n_bytes == file_bytes(model, "q4_0")


def test_a_4_bit_export_refuses_rows_that_are_not_a_multiple_of_32(tok, tmp_path):
    model = _tied_llama(tok, intermediate_size=48)
    with pytest.raises(DistillError, match=r"down_proj\.weight has shape \(32, 48\): GGUF q4_0") as err:
        export_gguf(model, tok, tmp_path / "odd.gguf", qtype="q4_0")
    assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())


def test_rounded_is_the_file_and_leaves_the_model_alone(tok, tmp_path):
    """``rounded`` is what rounding after training gives: a GGUF of that type holds exactly its weights (f16 too),
    ``file_bytes`` counts that file's tensor bytes, and the model it was given is not changed."""
    model = _tied_llama(tok)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for qtype in ("f16", "q4_0"):
        on_file = rounded(model, qtype)
        path = export_gguf(model, tok, tmp_path / f"rtn-{qtype}.gguf", qtype=qtype)
        tensors, _, n_bytes = _read_back(path, on_file)
        state = on_file.state_dict()
        for name, tensor in tensors.items():
            assert np.array_equal(_bits(tensor), _bits(state[name])), (qtype, name)
        assert n_bytes == file_bytes(on_file, qtype)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


LLAMA_READ = """
import sys, numpy as np, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_batch=64, logits_all=True, n_threads=1, verbose=False)
ids = [int(i) for i in sys.argv[3].split(",")]
llm.eval(ids)
np.save(sys.argv[2], np.asarray(llm.scores[: len(ids)], dtype=np.float32))
"""


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python (make llama-cpp)")
def test_llama_cpp_reads_a_qad_export_as_our_forward(tok, tmp_path):
    """The file a QAD run exports, read by llama.cpp itself (in a child process: a crash there is a failure here, not
    the end of the test run): its next-token logits are ours, to llama.cpp's own rounding of the activations (it
    multiplies q4_0 weights by q8_0-rounded inputs), and its top-1 token is ours (15 of 16 positions at least).
    bench/lm_frontier.py measures the agreement on a trained student's held-out text."""
    model = tiny_llama(tok, layers=2, seed=4)
    with torch.no_grad():  # peaked logits, so the top-1 token is not decided by rounding noise; peaked attention,
        model.lm_head.weight.mul_(40)  # so a wrong order of q/k rows (llama.cpp's rotary layout) shows
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    model = detach(attach(model, "q4_0"))
    path = export_gguf(model, tok, tmp_path / "qad.gguf", qtype="q4_0")
    ids = _ids(tok)[0].tolist()
    out = tmp_path / "logits.npy"
    done = subprocess.run([sys.executable, "-c", LLAMA_READ, str(path), str(out), ",".join(map(str, ids))],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, f"llama.cpp failed (exit {done.returncode}): {done.stderr[-500:]}"
    theirs = np.load(out)[:, : model.config.vocab_size]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    gap = np.abs(theirs - ours)  # measured: mean 1.3 % of the mean |logit|, max 3.6 % of the max; a file with
    assert gap.mean() < 0.05 * np.abs(ours).mean()  # its k rows in HF's order instead of llama.cpp's: 76 % and 100 %
    assert gap.max() < 0.08 * np.abs(ours).max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 15 / 16
