"""Answer checkers: turn a model's reply and a gold `reference` into a satisfaction label.

The daemon labels a request automatically when the client sends `reference`; which checker it uses
is configurable. Checkers are pure functions of two strings, so they are easy to test and to reuse
in evaluation tools.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

Checker = Callable[[str, str], bool]

_WS = re.compile(r"\s+")
_PUNCT_EDGES = re.compile(r"^[\W_]+|[\W_]+$", re.UNICODE)
_NUMBER = re.compile(r"[-+−]?\s*\d[\d,]*(?:\.\d+)?|[-+−]?\s*\.\d+")
_CHOICE = re.compile(r"\b([A-Ja-j])\b")


class UnknownCheckerError(ValueError):
    """The configuration names a checker that does not exist."""


def normalise(text: str) -> str:
    """Case-fold, NFKC-normalise, collapse whitespace and strip punctuation at both ends."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _WS.sub(" ", text).strip()
    return _PUNCT_EDGES.sub("", text)


def exact(reply: str, reference: str) -> bool:
    """Equal after `normalise`."""
    return normalise(reply) == normalise(reference)


def _first_number(text: str) -> float | None:
    match = _NUMBER.search(unicodedata.normalize("NFKC", text))
    if match is None:
        return None
    token = match.group(0).replace("−", "-").replace(",", "").replace(" ", "")
    try:
        return float(token)
    except ValueError:
        return None


def number(reply: str, reference: str) -> bool:
    """The first number in the reply equals the reference number.

    Tolerates spaces, an explicit `+`, thousands separators, leading zeros and trailing text
    ("0042 apples" matches "42"); `-7` never matches `7`.
    """
    expected = _first_number(reference)
    got = _first_number(reply)
    if expected is None or got is None:
        return False
    return abs(got - expected) <= 1e-9 * max(1.0, abs(expected))


def choice(reply: str, reference: str) -> bool:
    """The first stand-alone option letter (A-J) in the reply equals the reference letter."""
    expected = _CHOICE.search(reference.strip())
    got = _CHOICE.search(reply.strip())
    if expected is None or got is None:
        return False
    return got.group(1).upper() == expected.group(1).upper()


CHECKERS: dict[str, Checker] = {"exact": exact, "number": number, "choice": choice}


def get_checker(name: str) -> Checker:
    """The checker called `name`; raises `UnknownCheckerError` naming the valid ones."""
    try:
        return CHECKERS[name]
    except KeyError:
        valid = ", ".join(sorted(CHECKERS))
        raise UnknownCheckerError(f"unknown checker {name!r}; valid: {valid}") from None
