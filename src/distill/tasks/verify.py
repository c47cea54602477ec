"""Which teacher traces to keep: the final answer is pulled out of the completion and checked by exact match,
by reasoning-gym's ``score_answer``, or by the user's own function named in the recipe."""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

from distill.errors import DistillError
from distill.recipe import VerifySpec

# Final-answer markers, most explicit first; the last occurrence in the text wins.
ANSWER_PATTERNS = (
    re.compile(r"####\s*([^\n]+)"),
    re.compile(r"\\boxed\{([^{}]+)\}"),
    re.compile(r"answer\s*(?:is|:)\s*([^\n]+)", re.IGNORECASE),
)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")

Scorer = Callable[[str, dict], float]


def extract_answer(completion: str) -> str | None:
    """The final answer written in ``completion``: after '####', in \\boxed{}, after 'answer is/:', else the last
    number; None when there is none."""
    for pattern in ANSWER_PATTERNS:
        if found := pattern.findall(completion):
            # "The answer is 2." → "2": a scorer such as reasoning-gym's gives partial credit to "2."
            return found[-1].strip().rstrip(".").strip("*$ ").strip()
    numbers = NUMBER.findall(completion)
    return numbers[-1] if numbers else None


def normalize(answer: str) -> str:
    answer = answer.strip().rstrip(".").strip().lower()
    if NUMBER.fullmatch(answer):
        answer = answer.replace(",", "")
    return answer


def exact_match(completion: str, record: dict) -> float:
    predicted, expected = extract_answer(completion), record.get("answer")
    if expected is None:
        raise DistillError("exact verification needs an expected answer in every prompt record (prompts.answer_field)")
    return float(predicted is not None and normalize(predicted) == normalize(str(expected)))


def reasoning_gym_score(completion: str, record: dict) -> float:
    """reasoning-gym's own scorer for the dataset named in the entry's metadata (prompts made by
    ``reasoning_gym.create_dataset`` keep the whole entry under 'entry')."""
    try:
        import reasoning_gym
    except ImportError:
        raise DistillError(
            "verify.method reasoning_gym needs the reasoning-gym package: pip install reasoning-gym"
        ) from None
    entry = record.get("entry")
    if not isinstance(entry, dict) or "source_dataset" not in entry.get("metadata", {}):
        raise DistillError("reasoning_gym verification needs the reasoning-gym entry (with metadata) under 'entry'")
    score = reasoning_gym.get_score_answer_fn(entry["metadata"]["source_dataset"])
    return float(score(extract_answer(completion), entry))


def load_callable(name: str) -> Scorer:
    """'package.module:function' or 'path/to/file.py:function'."""
    module_name, sep, function = name.rpartition(":")
    if not sep or not module_name or not function:
        raise DistillError(f"verify.callable = {name!r}: expected 'module:function' or 'file.py:function'")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise DistillError(f"verify.callable: {path} does not exist")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except DistillError:
        raise
    except Exception as exc:  # the user's module failed to import: say which and why
        raise DistillError(f"verify.callable: cannot import {module_name}: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise DistillError(f"verify.callable: {module_name} has no function {function!r}")
    return fn


def make_scorer(spec: VerifySpec) -> Scorer | None:
    """The scorer (completion, prompt record) -> score for ``spec``; None when nothing is verified."""
    if spec.method == "none":
        return None
    if spec.method == "exact":
        return exact_match
    if spec.method == "reasoning_gym":
        return reasoning_gym_score
    return load_callable(spec.callable)


def verdict(scorer: Scorer | None, completion: str, record: dict, min_score: float) -> dict:
    """Fields added to a trace: the extracted answer, whether it is kept, and the scorer's error if it raised
    (a raising verifier drops that trace and is reported; it does not stop the run)."""
    if scorer is None:
        return {"predicted": extract_answer(completion), "correct": None}
    try:
        score = float(scorer(completion, record))
    except DistillError:
        raise
    except Exception as exc:
        return {
            "predicted": extract_answer(completion),
            "correct": False,
            "verify_error": f"{type(exc).__name__}: {exc}",
        }
    return {"predicted": extract_answer(completion), "correct": score >= min_score, "score": score}
