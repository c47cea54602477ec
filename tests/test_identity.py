"""Teacher identities (the keys of every teacher cache) change with everything that changes the model's outputs."""

from __future__ import annotations

import json

from distill.teachers.identity import encoder_id, lm_id


def make_folder(path, **files):
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name.replace("__", "/")).parent.mkdir(parents=True, exist_ok=True)
        (path / name.replace("__", "/")).write_text(text)
    return path


def encoder_folder(path):
    modules = [{"idx": 0, "path": "", "type": "Transformer"}, {"idx": 1, "path": "1_Pooling", "type": "Pooling"}]
    return make_folder(
        path,
        **{
            "config.json": '{"hidden_size": 8}',
            "model-00001-of-00002.safetensors": "first half",
            "model-00002-of-00002.safetensors": "second half",
            "modules.json": json.dumps(modules),
            "1_Pooling__config.json": '{"pooling_mode_mean_tokens": true}',
            "README.md": "about",
        },
    )


def test_encoder_id_sees_every_weight_file_and_the_pooling(tmp_path):
    """Issue 17.5: the id hashed only the first weights file, so a changed second shard or pooling hit the cache."""
    folder = encoder_folder(tmp_path / "e")
    before = encoder_id(folder)
    (folder / "README.md").write_text("edited")  # not part of what the model computes
    assert encoder_id(folder) == before
    for name, text in [
        ("model-00002-of-00002.safetensors", "other second half"),
        ("1_Pooling/config.json", '{"pooling_mode_cls_token": true}'),
        ("config.json", '{"hidden_size": 8, "layer_norm_eps": 1e-6}'),
    ]:
        folder = encoder_folder(tmp_path / name.replace("/", "_"))
        (folder / name).write_text(text)
        assert encoder_id(folder) != before, name


def test_lm_id_sees_the_config_and_the_dtype(tmp_path):
    files = {"config.json": '{"final_logit_softcapping": null}', "model.safetensors": "w"}
    base = lm_id(make_folder(tmp_path / "a", **files), "float32")
    assert lm_id(make_folder(tmp_path / "b", **files), "float32") == base
    assert lm_id(make_folder(tmp_path / "b", **files), "bfloat16") != base
    changed = files | {"config.json": '{"final_logit_softcapping": 30.0}'}
    assert lm_id(make_folder(tmp_path / "c", **changed), "float32") != base
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert lm_id(gguf, "float32") != base


def test_a_served_teacher_is_keyed_by_server_model_and_answer_format():
    from distill.teachers.identity import served_id

    base = served_id("http://h:8000/v1/", "m", "prompt_logprobs")
    assert base == served_id("http://h:8000/v1", "m", "prompt_logprobs")  # a trailing slash is the same server
    others = {
        served_id("http://h:8001/v1", "m", "prompt_logprobs"),
        served_id("http://h:8000/v1", "n", "prompt_logprobs"),
        served_id("http://h:8000/v1", "m", "echo"),
    }
    assert base not in others and len(others) == 3
