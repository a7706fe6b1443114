"""Pure answer-matching functions for the two evaluation protocols (no I/O, unit-tested on tricky cases).

paper   : the official mtLoRA evaluation. BBH is LENIENT: the lower-cased stripped target only has to occur
          somewhere in the lower-cased output ("valid" is found inside "invalid"). MMLU takes the first
          character of the stripped output, case-sensitive ("b" is not "B").
harness : lm-evaluation-harness style. BBH extracts the answer (text after an "A: " if the model wrote one,
          else the first non-empty line), then exact match ignoring case and the harness's ignored patterns
          (a trailing period, commas, newlines, backslashes, double quotes). MMLU picks the letter whose
          continuation has the highest log-likelihood.
"""

from __future__ import annotations

import re

# The patterns the harness's BBH exact_match removes from prediction and reference before comparing.
_HARNESS_IGNORE = [re.compile(p) for p in (r"\.$", r",", r"\n", r"\\", r'"')]
_ANSWER_AFTER_A = re.compile(r"(?<=A: )(.*?)(?=\n|$)")


def bbh_paper_correct(output: str, target: str) -> bool:
    """Paper BBH: stripped, lower-cased target is a substring (a prefix being a special case) of the output."""
    t = target.strip().lower()
    if not t:
        raise ValueError("empty BBH target: every output would match it")
    return t in output.lower()


def mmlu_paper_prediction(output: str) -> str:
    """Paper MMLU: the first character of the stripped output ('' for an empty output)."""
    stripped = output.strip()
    return stripped[0] if stripped else ""


def bbh_harness_extract(output: str) -> str:
    """The answer a harness-style filter keeps: text after 'A: ' when present, else the first non-empty line."""
    match = _ANSWER_AFTER_A.search(output)
    if match:
        return match.group(1).strip()
    for line in output.split("\n"):
        if line.strip():
            return line.strip()
    return ""


def harness_normalise(text: str) -> str:
    """Lower-case, drop the ignored patterns, strip (applied to prediction and reference alike)."""
    text = text.strip()
    for pattern in _HARNESS_IGNORE:
        text = pattern.sub("", text)
    return text.strip().lower()


def bbh_harness_correct(output: str, target: str) -> bool:
    """Harness BBH: exact match of the extracted answer against the target after normalisation."""
    return harness_normalise(bbh_harness_extract(output)) == harness_normalise(target)


def argmax_letter(logprobs: dict[str, float]) -> str:
    """The choice with the highest log-likelihood; ties go to the earliest letter (A before B), like argmax."""
    if not logprobs:
        raise ValueError("no choices scored")
    return max(sorted(logprobs), key=lambda k: (logprobs[k], -ord(k[0])))
