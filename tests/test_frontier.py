"""`distill frontier` (issue 35.3): pruned students healed by distillation, read in every file type on the validation
split, the Pareto front, the smallest file that keeps the target chosen and exported; bad requests are one line."""

import json

import pytest
import yaml
from lm_fixtures import tiny_tokenizer
from test_lm import write_recipe
from test_plan import cli

from distill.frontier import Candidate, pareto, parse_budget, search
from distill.tasks import load_recipe


@pytest.fixture(scope="module")
def lm_recipe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("frontier")
    path, raw = write_recipe(tmp, tiny_tokenizer(), "cache", baseline=False, mixed_precision="no")
    raw["student"]["train"] |= {"epochs": 1}
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_search_writes_the_front_chooses_the_smallest_file_that_keeps_and_exports_it(lm_recipe, tmp_path):
    out = tmp_path / "frontier"
    found = search(
        load_recipe(lm_recipe), out, keep=0.2, budget=1800, shares=(0.75, 0.5), types=("f16", "q8_0", "q4_0")
    )
    assert [(c.share, c.type) for c in found.candidates][:3] == [(0.75, "f16"), (0.75, "q8_0"), (0.75, "q4_0")]
    by_type = {c.type: c.file_bytes for c in found.candidates if c.share == 0.75}
    assert by_type["q4_0"] < by_type["q8_0"] < by_type["f16"]
    keeping = [c for c in found.candidates if c.keeps >= 0.2]
    assert found.chosen is not None and found.chosen.file_bytes == min(c.file_bytes for c in keeping)
    teacher = found.teacher["validation_perplexity"]
    for c in found.candidates:  # keeps = the teacher's validation perplexity over the candidate's
        assert c.keeps == pytest.approx(teacher / c.validation_perplexity)
    assert found.chosen.pareto and (out / "chosen" / "model.gguf").exists()
    written = json.loads((out / "frontier.json").read_text())
    assert written["chosen"]["type"] == found.chosen.type and written["generations"]
    text = (out / "FRONTIER.md").read_text()
    assert "**chosen**" in text and "Generations of the candidates on the front" in text
    assert (out / "frontier.png").stat().st_size > 0


def test_the_front_is_the_candidates_nothing_beats_on_both_size_and_perplexity():
    def c(size, ppl):
        return Candidate(1.0, "f16", "r", 1, size, None, ppl, 0.5, ppl, 1.0)

    points = [c(10, 5.0), c(20, 4.0), c(20, 6.0), c(30, 4.0), c(5, 9.0)]
    pareto(points)
    assert [p.pareto for p in points] == [True, True, False, False, True]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--keep", "1.5"], "--keep 1.5 must be in (0, 1]"),
        (["--keep", "0"], "must be in (0, 1]"),
        (["--budget", "5x"], "is not a duration"),
        (["--types", "q3_k"], "unknown file type"),
        (["--budget", "0.001s"], "is less than one candidate needs: the plan gives"),
    ],
)
def test_bad_requests_are_one_line_and_write_nothing(lm_recipe, tmp_path, monkeypatch, capsys, args, fragment):
    out = tmp_path / "f"
    code, _, err = cli(monkeypatch, capsys, "frontier", lm_recipe, "--out", out, *args)
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_classifier_recipe_is_refused(tmp_path, tiny_recipe, monkeypatch, capsys):
    recipe = tmp_path / "c.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe))
    code, _, err = cli(monkeypatch, capsys, "frontier", recipe, "--out", tmp_path / "f")
    assert code == 2 and "searches causal_lm students; this recipe is task: classification" in err


def test_budgets():
    assert [parse_budget(x) for x in ("60m", "1.5h", "90s", "3600")] == [3600, 5400, 90, 3600]
