"""MMLU subject -> category map of the original MMLU release (Hendrycks et al., categories.py).

Four categories. Note that lm-evaluation-harness groups a few subjects differently (e.g. anatomy under STEM);
both protocols here report the original grouping so the numbers compare with the MMLU paper's table.
"""

from __future__ import annotations

CATEGORIES: dict[str, tuple[str, ...]] = {
    "STEM": (
        "abstract_algebra", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
        "college_mathematics", "college_physics", "computer_security", "conceptual_physics",
        "electrical_engineering", "elementary_mathematics", "high_school_biology", "high_school_chemistry",
        "high_school_computer_science", "high_school_mathematics", "high_school_physics",
        "high_school_statistics", "machine_learning",
    ),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
        "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios",
        "philosophy", "prehistory", "professional_law", "world_religions",
    ),
    "social sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology", "human_sexuality",
        "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    ),
    "other": (
        "anatomy", "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
        "management", "marketing", "medical_genetics", "miscellaneous", "nutrition", "professional_accounting",
        "professional_medicine", "virology",
    ),
}

SUBJECT_TO_CATEGORY: dict[str, str] = {s: cat for cat, subjects in CATEGORIES.items() for s in subjects}


def category_of(subject: str) -> str:
    """Category of an MMLU subject; 'other' for a subject outside the 57 (a custom CSV in the same layout)."""
    return SUBJECT_TO_CATEGORY.get(subject, "other")
