import pytest

from alvts_calib.answers import answer_matches, normalise_answer


def test_normalise_answer_drops_case_punctuation_and_spacing():
    assert normalise_answer("  The RED,  circle. ") == "the red circle"
    assert normalise_answer("?!") == ""


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("Red.", "red", True),
        ("red circle", "red", True),  # starts with the answer as a whole word
        ("reddish", "red", False),  # not a whole word
        ("blue", "red", False),
        ("", "red", False),
        ("anything", "?", False),  # an answer without words matches nothing
    ],
)
def test_answer_matches(prediction, answer, expected):
    assert answer_matches(prediction, answer) is expected
