from pathlib import Path

import pytest

from distill.errors import DistillError
from distill.recipe import apply_overrides
from distill.tasks import load_recipe, parse_recipe


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_key_and_allowed_keys(tmp_path):
    with pytest.raises(DistillError) as err:
        load_recipe(write(tmp_path, "train:\n  epochs: 3\n"))
    assert "train: unknown key" in str(err.value)
    assert "allowed: task, name, seed" in str(err.value)
    with pytest.raises(DistillError) as err:
        load_recipe(write(tmp_path, "student:\n  train:\n    epocs: 3\n"))
    assert "student.train.epocs: unknown key" in str(err.value)
    assert "epochs" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("distill:\n  temperature: 0\n", "distill.temperature = 0: must be a number > 0, or auto"),
        ("distill:\n  temperature: hot\n", "distill.temperature = 'hot': must be a number > 0, or auto"),
        ("distill:\n  loss: kl\n", "unknown loss 'kl'; allowed: forward_kl, jsd, reverse_kl, skew_kl, tvd"),
        ("data:\n  source: imagenet\n", "data.source = 'imagenet': Input should be 'mnist', 'digits', 'npy' or 'csv'"),
        ("student:\n  train:\n    batch_size: 10\n    grad_accum: 3\n", "must be divisible by grad_accum 3"),
        ("- a\n- b\n", "expected a mapping"),
    ],
)
def test_bad_values_fail_with_one_clear_line(tmp_path, text, expected):
    with pytest.raises(DistillError) as err:
        load_recipe(write(tmp_path, text))
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(DistillError, match=r"invalid YAML at line 2"):
        load_recipe(write(tmp_path, "a: 1\n  b: [\n"))
    with pytest.raises(DistillError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_set_overrides_are_parsed_and_validated(tmp_path):
    path = write(tmp_path, "student:\n  train:\n    epochs: 2\n")
    recipe = load_recipe(path, ["student.train.epochs=7", "distill.loss=jsd", "distill.beta=0.25"])
    assert recipe.student.train.epochs == 7 and recipe.distill.loss == "jsd"
    assert recipe.distill.divergence_kwargs() == {"beta": 0.25}
    with pytest.raises(DistillError, match="student.train.epochs = -1"):
        load_recipe(path, ["student.train.epochs=-1"])
    with pytest.raises(DistillError, match="expected KEY=VALUE"):
        apply_overrides({}, ["student.train.epochs"])
    with pytest.raises(DistillError, match="is a value, not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_defaults_are_a_valid_recipe():
    recipe = parse_recipe({})
    assert recipe.distill.loss == "forward_kl" and recipe.baseline


def test_causal_lm_recipes_validate_their_own_sections():
    recipe = parse_recipe({"task": "causal_lm", "student": {"from_teacher": {"every": 2}}})
    assert recipe.student.from_teacher.every == 2 and recipe.distill.temperature == 1.0
    with pytest.raises(DistillError, match="exactly one of layers, every, keep"):
        parse_recipe({"task": "causal_lm", "student": {"from_teacher": {"every": 2, "keep": 3}}})
    with pytest.raises(DistillError, match="exactly one of from_teacher"):
        parse_recipe({"task": "causal_lm", "student": {"from_teacher": {"keep": 3}, "path": "x"}})
    with pytest.raises(DistillError, match=r"data.blocks: unknown key \(allowed: source, path, block_size"):
        parse_recipe({"task": "causal_lm", "data": {"blocks": 3}})
    with pytest.raises(DistillError, match="task = 'vision': choose classification, causal_lm, generate"):
        parse_recipe({"task": "vision"})


def test_shipped_lm_recipe_is_valid():
    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "smollm2-shakespeare.yaml")
    assert (
        recipe.teacher.path == "smollm2"
        and recipe.student.prune.params == 0.5
        and recipe.student.prune.axes == ["depth"]
    )
    assert recipe.teacher.train is not None and recipe.teacher.adapt == "auto"  # adapted where it helps (issue 35.1)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid(path):
    assert load_recipe(path).name


def test_set_value_that_is_not_yaml_is_one_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\n")
    with pytest.raises(DistillError, match=r"--set '0=\\x1f': the value is not valid YAML: .*special characters"):
        load_recipe(path, ["0=\x1f"])


def test_empty_recipe_file_is_an_error_not_the_default_run(tmp_path):
    for text in ("", "# only a comment\n", "\n\n"):
        path = tmp_path / "empty.yaml"
        path.write_text(text)
        with pytest.raises(DistillError, match="is empty; start from one in recipes/"):
            load_recipe(path)


def test_mixed_precision_no_is_the_word_not_yaml_false(tmp_path):
    """YAML 1.1 reads a bare `no` as false; `mixed_precision: no` used to be refused ("Input should be 'no', …")."""
    from distill.tasks import load_recipe

    for task in ("classification", "causal_lm"):
        path = tmp_path / f"{task}.yaml"
        extra = "data: {source: text, path: x.txt}\nteacher: {path: t}\nstudent: {from_teacher: {keep: 1}}\n"
        path.write_text(f"task: {task}\nmixed_precision: no\n" + (extra if task == "causal_lm" else ""))
        assert load_recipe(path).mixed_precision == "no"
        assert load_recipe(path, ["mixed_precision=no"]).mixed_precision == "no"
        assert load_recipe(path, ["mixed_precision=bf16"]).mixed_precision == "bf16"
