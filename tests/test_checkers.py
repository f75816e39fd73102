import pytest

from edged.checkers import UnknownCheckerError, choice, exact, get_checker, number


@pytest.mark.parametrize(
    ("reply", "reference", "ok"),
    [
        ("42", "42", True),
        (" 42 ", "42", True),
        ("0042", "42", True),
        ("+42", "42", True),
        ("42 apples", "42", True),
        ("the answer is 42.", "42", True),
        ("-42", "42", False),
        ("-42", "-42", True),
        ("- 42", "-42", True),
        ("−42", "-42", True),
        ("1,234", "1234", True),
        ("4 2", "42", False),
        ("", "42", False),
        ("forty-two", "42", False),
        ("3.50", "3.5", True),
    ],
)
def test_number(reply: str, reference: str, ok: bool) -> None:
    assert number(reply, reference) is ok


def test_exact_normalises_case_space_and_edge_punctuation() -> None:
    assert exact("  Paris. ", "paris")
    assert not exact("Paris, France", "paris")


def test_choice_letters() -> None:
    assert choice("B) because", "b")
    assert choice("The answer is C", "C")
    assert not choice("A", "B")
    assert not choice("", "B")


def test_unknown_checker_is_typed() -> None:
    with pytest.raises(UnknownCheckerError, match="valid: choice, exact, number"):
        get_checker("fuzzy")
