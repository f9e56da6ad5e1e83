"""ListOps generator: deterministic, lengths within bounds, and labels equal an independent evaluation."""
import statistics

import pytest

from tasks.classification.listops import example


def evaluate_by_stack(text: str) -> int:
    """An evaluator independent of the generator: a stack machine over the tokens of the text."""
    ops = {"MIN": min, "MAX": max, "MED": lambda xs: int(statistics.median(xs)), "SM": lambda xs: sum(xs) % 10}
    stack = []
    for tok in text.split():
        if tok.startswith("["):
            stack.append([tok[1:]])
        elif tok == "]":
            op, *args = stack.pop()
            result = ops[op](args)
            if not stack:
                return result
            stack[-1].append(result)
        else:
            stack[-1].append(int(tok))
    raise ValueError("unbalanced expression")


@pytest.mark.parametrize("lo,hi", [(10, 60), (200, 400), (500, 2000)])
def test_listops_lengths_labels_and_determinism(lo, hi):
    labels = []
    for seed in range(20):
        text, label = example(seed, lo, hi)
        assert lo <= len(text) <= hi and (text, label) == example(seed, lo, hi)
        assert label == evaluate_by_stack(text) and 0 <= label <= 9
        assert text.startswith("[") and text.count("[") == text.count("]")
        labels.append(label)
    assert len(set(labels)) >= 3  # not a constant


def test_operator_semantics():
    assert evaluate_by_stack("[MED 1 2 ]") == 1 and evaluate_by_stack("[SM 9 8 ]") == 7
    assert evaluate_by_stack("[MAX 4 3 [MIN 2 3 ] 1 0 ]") == 4


def test_bad_lengths():
    with pytest.raises(ValueError):
        example(0, 100, 50)
