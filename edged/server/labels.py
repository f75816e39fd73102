"""Label sources: where satisfaction labels come from when requests carry no reference.

MESS+ learns only from labels, and on a device almost no request carries one. Besides a
`reference` (checked by the manifest's checker) and client `feedback`, edged can make
pseudo-labels:

- agreement: when the zoo's top model ran on a request (an exploring decision), its answer is
  the reference for every other model that ran. Scored with the manifest's checker where it
  names one (number, choice), else by normalised text similarity (difflib's ratio, standard
  library: the answers are short, and it needs no dependency). The top model gets no label from
  it; the router treats it as the reference (`RouterConfig.for_agreement`).
- judge: a zoo model answers yes/no, from a prompt template, on whether the served reply
  satisfies the request.

Real labels (reference, feedback) override pseudo-labels of the same request and model.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from edged.checkers import Checker, get_checker, normalise

#: every source, in the order `edged stats` lists them
SOURCES = ("reference", "feedback", "agreement", "judge")
#: sources whose labels a real one replaces
PSEUDO = frozenset({"agreement", "judge"})

DEFAULT_JUDGE_TEMPLATE = (
    "Request: {prompt}\nReply: {reply}\n"
    "Does the reply correctly and fully answer the request? Answer yes or no.\nAnswer:"
)
_FIRST_WORD = re.compile(r"[a-z]+")


class LabelConfigError(ValueError):
    """A [labels] setting that cannot work with this zoo (the message names the key)."""


def similarity(a: str, b: str) -> float:
    """difflib's ratio of the two texts after `normalise` (1.0: equal)."""
    return difflib.SequenceMatcher(None, normalise(a), normalise(b), autojunk=False).ratio()


def similarity_checker(threshold: float) -> Checker:
    """A checker that accepts a reply at least `threshold` similar to the reference."""

    def check(reply: str, reference: str) -> bool:
        return similarity(reply, reference) >= threshold

    return check


def parse_judge(text: str) -> bool | None:
    """The judge's verdict: its first word is yes or no (anything else: no label)."""
    match = _FIRST_WORD.search(normalise(text))
    if match is None:
        return None
    return {"yes": True, "no": False}.get(match.group(0))


@dataclass(frozen=True)
class LabelSources:
    """The label sources a daemon uses, and how agreement and the judge score."""

    sources: frozenset[str] = frozenset({"reference", "feedback"})
    agree: Checker | None = None          # reply, top model's reply -> agrees
    judge_model: str | None = None
    judge_template: str = DEFAULT_JUDGE_TEMPLATE
    judge_max_new_tokens: int = 3

    def uses(self, source: str) -> bool:
        return source in self.sources

    def judge_prompt(self, prompt: str, reply: str) -> str:
        return self.judge_template.format(prompt=prompt, reply=reply)

    def agreement(
        self, texts: Mapping[str, str], top: str, skip: Iterable[str] = ()
    ) -> dict[str, bool]:
        """Pseudo-labels for every model in `texts` but the top one and those in `skip`: does
        its reply agree with the top model's?"""
        if self.agree is None or top not in texts:
            return {}
        skipped = set(skip) | {top}
        return {name: bool(self.agree(text, texts[top]))
                for name, text in texts.items() if name not in skipped}


def build_label_sources(
    sources: Iterable[str],
    *,
    checker_name: str,
    agreement_checker: str | None,
    similarity_threshold: float,
    judge_model: str | None,
    judge_template: str | None,
    zoo_names: Iterable[str],
) -> LabelSources:
    """Validate the [labels] settings against the zoo (LabelConfigError names the key).

    Agreement scores with `agreement_checker` if given, else the zoo's checker unless it is
    plain "exact" (too strict for free text), else text similarity >= the threshold.
    """
    chosen = frozenset(sources)
    unknown = sorted(chosen - set(SOURCES))
    if unknown:
        raise LabelConfigError(
            f"[labels] sources: unknown {', '.join(unknown)}; valid: {', '.join(SOURCES)}")
    names = list(zoo_names)
    agree: Checker | None = None
    if "agreement" in chosen:
        if len(names) < 2:
            raise LabelConfigError("[labels] sources: agreement needs a zoo of two models or more")
        name = agreement_checker or (checker_name if checker_name != "exact" else None)
        try:
            agree = get_checker(name) if name else similarity_checker(similarity_threshold)
        except ValueError as exc:
            raise LabelConfigError(f"[labels] agreement_checker: {exc}") from None
    template = judge_template or DEFAULT_JUDGE_TEMPLATE
    if "judge" in chosen:
        if judge_model is None:
            raise LabelConfigError("[labels] judge_model: needed with the judge source")
        if judge_model not in names:
            raise LabelConfigError(
                f"[labels] judge_model: {judge_model!r} is not in the zoo ({', '.join(names)})")
        try:
            template.format(prompt="", reply="")
        except (KeyError, IndexError, ValueError) as exc:
            raise LabelConfigError(
                f"[labels] judge_template: only {{prompt}} and {{reply}} may be used ({exc!r})"
            ) from None
    return LabelSources(sources=chosen, agree=agree, judge_model=judge_model,
                        judge_template=template)
