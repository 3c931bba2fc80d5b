"""The VQA evaluator's scoring: one question per answered user turn, its type from the record,
exact match after normalisation, accuracy per type."""
import pytest

from megatron_patch.data.energon_reader import iter_split_samples
from megatron_patch.evaluation import vqa


def test_normalise_ignores_case_and_surrounding_punctuation():
    assert vqa.normalise("  Red.\n") == "red"
    assert vqa.normalise("top-left!") == "top-left"
    assert vqa.normalise("red square") != vqa.normalise("red")


class _Sample:
    __key__ = "k"
    meta = {"question_types": ["colour", "count"]}
    image_names, images = [], []
    conversations = [
        {"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "two"},
        {"from": "human", "value": "unanswered"},
    ]


def test_questions_are_the_answered_user_turns_with_their_context():
    found = list(vqa.questions(_Sample()))
    assert [(q.question_type, q.answer, len(q.turns)) for q in found] == [("colour", "red", 1),
                                                                         ("count", "two", 3)]


class _Oracle:
    """Answers from a fixed table: the reference itself, or a constant."""

    def __init__(self, constant=None):
        self.constant = constant

    def answer(self, turns, images):
        return self.constant


def test_scores_count_every_val_question(converted_demo, monkeypatch):
    samples = list(iter_split_samples(str(converted_demo), "val"))
    expected = [q for s in samples for q in vqa.questions(s)]
    assert len(expected) >= len(samples)

    # an answerer that is right exactly on the colour questions whose answer is "red"
    scores = vqa.evaluate(_Oracle("Red"), str(converted_demo))
    assert sum(scores.total.values()) == len(expected)
    reds = [q for q in expected if q.answer == "red"]
    assert sum(scores.correct.values()) == len(reds)
    accuracy = scores.accuracy()
    assert accuracy["overall"] == pytest.approx(len(reds) / len(expected))
    assert "overall" in scores.table() and "colour" in scores.table()
    limited = vqa.evaluate(_Oracle("x"), str(converted_demo), limit=3)
    assert sum(limited.total.values()) == 3
