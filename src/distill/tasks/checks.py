"""What a run says aloud, printed when it is known and put first in the report: a teacher no better than the student
trained alone, an adapted teacher that memorised its training blocks, a distilled student that lost to the baseline."""

from __future__ import annotations

CLEAR_LEAD = 2.0  # standard errors: a lead a teacher no better than the baseline shows by chance ~2 % of the time


def teacher_check(lead: dict) -> list[str]:
    """Classifiers: one line, printed now and put first in the report, unless the teacher is clearly better than
    the student trained alone on the validation split (``evaluate.paired_loss_lead``): at least as accurate, and its
    cross-entropy lower by more than ``CLEAR_LEAD`` standard errors of the paired difference ("not better": less
    accurate, or a cross-entropy higher by more than one error; "not clearly better": in between). The cross-entropy
    is the quality of the probabilities, what soft labels carry; the error bar keeps a split of a few dozen examples
    from deciding on noise. Two errors, not one: with one, a teacher no better than the baseline looked clearly
    better on one split in six (Reuters R8, seed 1 of bench/robustness.py: 32 validation texts, lead 1.6 errors,
    a teacher worse on the test split)."""
    teacher, baseline, n = lead["teacher_accuracy"], lead["baseline_accuracy"], lead["examples"]
    measured = (
        f"accuracy {teacher:.2%} vs {baseline:.2%}, cross-entropy lower by {lead['loss_lead']:.4f} ± "
        f"{lead['standard_error']:.4f} on {n} examples"
    )
    if (
        teacher < baseline or lead["loss_lead"] < -lead["standard_error"]
    ):  # less accurate, or clearly worse probabilities
        line = (
            f"the teacher is not better than the student trained alone on the validation split ({measured}): soft "
            "labels cannot lift a student above a teacher no better than itself; make the teacher stronger (train it "
            "longer or larger, or start from a better checkpoint)"
        )
    elif lead["loss_lead"] <= CLEAR_LEAD * lead["standard_error"]:  # no lead beyond the noise of the split
        line = (
            f"the teacher is not clearly better than the student trained alone on the validation split ({measured}: "
            f"within {CLEAR_LEAD:g} standard errors): distillation may not help; hold out more labeled examples "
            "(data.validation_fraction) to tell, or make the teacher stronger"
        )
    else:
        return []
    print(f"warning: {line}", flush=True)
    return [line]


def teacher_warnings(teacher: dict, baseline: dict) -> list[str]:
    """Language models: one line, printed now and put first in the report, when the teacher's held-out loss (the
    validation scores of each) is no lower than the student's trained alone. Soft labels cannot lift the student
    above such a teacher."""
    if teacher["loss"] < baseline["loss"]:
        return []
    line = (
        f"the teacher is not better than the student trained alone on the validation split (loss "
        f"{teacher['loss']:.4f} vs {baseline['loss']:.4f}): soft labels cannot lift a student above a teacher no "
        "better than itself; make the teacher stronger (train it longer or larger, or start from a better checkpoint)"
    )
    print(f"warning: {line}", flush=True)
    return [line]


MEMORISED = 1.5  # validation over training perplexity of an adapted LM teacher past which the run says so (a guard)


def memorised_teacher_warnings(fit: dict) -> list[str]:
    """Language models with ``teacher.train``: one line, printed now and put in the report, when the adapted teacher's
    perplexity on the validation split is more than ``MEMORISED`` times that on the training blocks (``fit``, as
    ``teacher_fit`` measures it). Its targets on the blocks the student trains on then lean towards their labels far
    more than on new text, and carry less than its held-out quality promises. Seen in bench/lm_students.py (20.8 on
    training blocks, 48.3 on validation): the weight of the hard labels (alpha 0, 0.5, 0.7) hardly moved the distilled
    student, and targets from teachers adapted without the block (two folds) did better (BENCHMARKS.md)."""
    train, validation = fit["training_perplexity"], fit["validation_perplexity"]
    if validation < MEMORISED * train:
        return []
    line = (
        f"the adapted teacher has memorised its training blocks: perplexity {train:.4g} on them vs {validation:.4g} "
        f"on the validation split ({validation / train:.2f}x); its targets on the blocks the student trains on lean "
        "towards their labels far more than on new text, so distillation adds less than its quality there promises; "
        "adapt it for fewer epochs or at a lower teacher.train.lr, or on other text in a run of its own (then give "
        "that run's teacher folder as teacher.path)"
    )
    print(f"warning: {line}", flush=True)
    return [line]


def student_warnings(
    results: dict,
    validation: dict,
    *,
    teacher_weak: bool,
    auto: bool = False,
    quality: str = "test_errors",
    noun: str = "test errors",
) -> list[str]:
    """When the distilled student loses to the baseline on the test split (a higher ``quality``, which is lower
    when better): that first, with the likely reason read from the numbers. When the teacher check fired and the
    distilled student wins all the same, that too: the report must not leave the check's doubt standing alone."""
    if "baseline" not in results:
        return []
    s, b = results["student"][quality], results["baseline"][quality]
    wins = s < b
    if isinstance(s, float):
        s, b = f"{s:.4g}", f"{b:.4g}"
    if wins and teacher_weak:
        return [
            f"the distilled student beats the student trained alone on the test split all the same ({noun} {s} vs "
            f"{b}): the validation split was too small to tell, or the teacher's soft labels help in another way (its "
            "labels of unlabeled inputs, smoother targets)"
        ]
    if s == b or wins:
        return []
    summary = validation.get("student") or {}
    if teacher_weak:
        reason = "the teacher is no better than the student alone (above)"
    elif summary.get("still_improving"):
        reason = "the student was still improving on validation when training ended: train it longer"
    elif auto:
        reason = (
            "the temperature and α were already the best of the sweep on validation (below), so the teacher's lead "
            "over the student alone is too small to carry over: a stronger teacher or more unlabeled inputs help most"
        )
    else:
        reason = "try another distill.temperature (e.g. 2-10) or a hard-label weight distill.alpha (e.g. 0.1-0.5)"
    return [
        f"the distilled student is worse than the student trained alone on the test split ({noun} {s} vs {b}): {reason}"
    ]
