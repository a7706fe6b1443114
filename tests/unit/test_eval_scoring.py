"""Scoring functions of both protocols on the cases where they differ or usually go wrong."""

from __future__ import annotations

import pytest

from mtlora_clients.eval import scoring as s


@pytest.mark.parametrize("output,target,want", [
    (" True", "True", True),                      # leading space of a greedy continuation
    ("  true\n", " True ", True),                 # case and whitespace on both sides
    ("False\nTrue", "True", True),                # multi-line: lenient substring finds it on line 2
    ("invalid", "valid", True),                   # LENIENT: 'valid' inside 'invalid' counts as right
    ("A", "(A)", False),                          # bare letter is not the parenthesised target
    ("(A) because", "(A)", True),                 # prefix
    ("", "True", False),                          # empty output
    ("Tru", "True", False),                       # truncated answer
])
def test_bbh_paper_lenient_substring(output, target, want):
    assert s.bbh_paper_correct(output, target) is want


def test_bbh_paper_refuses_empty_target():
    with pytest.raises(ValueError, match="empty"):
        s.bbh_paper_correct("anything", "  ")


@pytest.mark.parametrize("output,target,want", [
    (" True", "True", True),
    (" TRUE.", "True", True),                     # ignore case and a trailing period, as the harness does
    ("invalid", "valid", False),                  # exact match: no substring leniency
    (" A", "(A)", False),                         # "(A)" vs "A" stays wrong
    (" (A)", "(A)", True),
    ("", "True", False),                          # empty output
    ("\n\n  False\nTrue", "False", True),         # multi-line: first non-empty line is the answer
    ("False\nTrue", "True", False),
    (" so A: (B)\nmore", "(B)", True),            # an explicit 'A: ' answer is extracted
    (' "1, 2"', "1 2", True),                     # quotes and commas are ignored on both sides
    (" sort these words", "sort these", False),
])
def test_bbh_harness_exact_after_extraction(output, target, want):
    assert s.bbh_harness_correct(output, target) is want


@pytest.mark.parametrize("output,want", [
    (" B", "B"), ("B. because", "B"), ("\n  C\n", "C"), ("", ""), ("   ", ""),
    ("(B)", "("),   # the paper protocol takes the first character, nothing smarter
    ("b", "b"),     # and does not fold case: 'b' is not 'B'
])
def test_mmlu_paper_first_character(output, want):
    assert s.mmlu_paper_prediction(output) == want


def test_argmax_letter_highest_and_ties_to_first():
    assert s.argmax_letter({"A": -3.0, "B": -0.5, "C": -1.0, "D": -9.0}) == "B"
    assert s.argmax_letter({"D": -1.0, "C": -1.0, "B": -2.0, "A": -7.0}) == "C"
    with pytest.raises(ValueError):
        s.argmax_letter({})


def test_harness_normalise():
    assert s.harness_normalise(' "Yes". ') == "yes"
    # the patterns apply in the harness's order: the period goes first, so one inside quotes stays
    assert s.harness_normalise('"Yes."') == "yes."
    assert s.harness_normalise("a\\b,c\nd") == "abcd"
    assert s.harness_normalise("1.5") == "1.5"  # only a trailing period goes
