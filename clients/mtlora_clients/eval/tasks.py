r"""One small Task class per benchmark and protocol.

A Task owns its few-shot prompt and its scoring; the runner only schedules `evaluate` calls. Contract:
- `task.items`: the scored items (few-shot exemplars excluded), in file order, after `--limit`.
- `task.prompt(i)`: the exact prompt text for item i (its hash keys the resume file).
- `await task.evaluate(client, model, i)` -> a JSON-able record with at least `correct` (bool); server failures
  propagate as `ServerReplyError` and are never turned into a wrong answer.

Protocol differences (see docs/eval.md):
- BBH paper: shots `Q: {input}\nA: {target}\n\n`, greedy 32 tokens, lenient substring match.
- BBH harness: the same shots, generation stops at `Q:` / a blank line (256 tokens at most), exact match after
  answer extraction.
- MMLU paper: shots `Question: ...\nA. ..\nD. ..\nAnswer: X\n\n`, greedy 1 token, first character.
- MMLU harness: subject header, shots `{question}\nA. ..\nAnswer: X` joined by a blank line, the answer is the
  letter whose continuation " X" has the highest log-likelihood.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from mtlora.errors import ConfigError

from ..http import CompletionClient
from . import scoring
from .data import LETTERS, MCQ, Example

PAPER, HARNESS = "paper", "harness"


class Task:
    """Base: a named list of items with a prompt per item."""

    default_shots: int = 0

    def __init__(self, name: str, items: list, shots: list, limit: int | None = None):
        self.name = name
        self.shots = shots
        self.items = items[:limit] if limit is not None else items

    def prompt(self, i: int) -> str:
        raise NotImplementedError

    def prompt_sha(self, i: int) -> str:
        """Keys the resume file: the prompt plus everything else that shapes the record (protocol, budget, stops),
        so paper and harness runs (same BBH prompt, different scoring) never reuse each other's lines."""
        sig = f"{type(self).__name__}|{getattr(self, 'max_tokens', '')}|{getattr(self, 'stop', '')}|"
        return hashlib.sha256((sig + self.prompt(i)).encode()).hexdigest()[:16]

    async def evaluate(self, client: CompletionClient, model: str, i: int) -> dict[str, Any]:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------- BBH --
def _bbh_prompt(shots: list[Example], ex: Example) -> str:
    return "".join(f"Q: {s.input}\nA: {s.target}\n\n" for s in shots) + f"Q: {ex.input}\nA:"


class BBHPaper(Task):
    """Official mtLoRA BBH: lenient substring match of the target in a 32-token greedy generation."""

    default_shots, max_tokens = 3, 32

    def prompt(self, i: int) -> str:
        return _bbh_prompt(self.shots, self.items[i])

    async def evaluate(self, client, model, i):
        out = await client.complete(model, self.prompt(i), self.max_tokens)
        target = self.items[i].target
        return {"output": out, "target": target, "correct": scoring.bbh_paper_correct(out, target)}


class BBHHarness(Task):
    """lm-evaluation-harness BBH few-shot, answer only: stop at `Q:`/blank line, exact match after extraction."""

    default_shots, max_tokens = 3, 256
    stop = ["</s>", "Q:", "\n\n"]

    def prompt(self, i: int) -> str:
        return _bbh_prompt(self.shots, self.items[i])

    async def evaluate(self, client, model, i):
        out = await client.complete(model, self.prompt(i), self.max_tokens, stop=self.stop)
        target = self.items[i].target
        return {"output": out, "extracted": scoring.bbh_harness_extract(out), "target": target,
                "correct": scoring.bbh_harness_correct(out, target)}


# --------------------------------------------------------------------------------------------------- MMLU --
def _choices(q: MCQ) -> str:
    return "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, q.choices))


class MMLUPaper(Task):
    """Official mtLoRA MMLU: 5 dev shots, greedy 1 token, first character of the stripped output."""

    default_shots = 5

    def prompt(self, i: int) -> str:
        shots = "".join(f"Question: {s.question}{_choices(s)}\nAnswer: {s.answer}\n\n" for s in self.shots)
        q = self.items[i]
        return f"{shots}Question: {q.question}{_choices(q)}\nAnswer:"

    async def evaluate(self, client, model, i):
        out = await client.complete(model, self.prompt(i), 1)
        pred, answer = scoring.mmlu_paper_prediction(out), self.items[i].answer
        return {"output": out, "prediction": pred, "answer": answer, "correct": pred == answer}


class MMLUHarness(Task):
    """lm-evaluation-harness MMLU: log-likelihood of " A".." D" after a subject header and 5 dev shots."""

    default_shots = 5

    def prompt(self, i: int) -> str:
        header = f"The following are multiple choice questions (with answers) about {self.name.replace('_', ' ')}.\n\n"
        shots = "".join(f"{s.question.strip()}{_choices(s)}\nAnswer: {s.answer}\n\n" for s in self.shots)
        q = self.items[i]
        return f"{header}{shots}{q.question.strip()}{_choices(q)}\nAnswer:"

    async def evaluate(self, client, model, i):
        context = self.prompt(i)
        scores = await asyncio.gather(*(client.loglikelihood(model, context, f" {c}") for c in LETTERS))
        logprobs = dict(zip(LETTERS, scores))
        pred, answer = scoring.argmax_letter(logprobs), self.items[i].answer
        return {"logprobs": logprobs, "prediction": pred, "answer": answer, "correct": pred == answer}


PROTOCOLS = {("bbh", PAPER): BBHPaper, ("bbh", HARNESS): BBHHarness,
             ("mmlu", PAPER): MMLUPaper, ("mmlu", HARNESS): MMLUHarness}


def build_tasks(suite: str, protocol: str, data: dict, num_fewshot: int | None, limit: int | None,
                max_new_tokens: int | None = None) -> list[Task]:
    """Tasks for `suite` ('mmlu', 'bbh' or 'tasks', the latter scored like BBH) from loaded data.

    `max_new_tokens` overrides the BBH generation budget (32 paper, 256 harness), e.g. for small-context models.
    """
    cls = PROTOCOLS[("mmlu" if suite == "mmlu" else "bbh", protocol)]
    k = cls.default_shots if num_fewshot is None else num_fewshot
    tasks: list[Task] = []
    for name, value in data.items():
        pool = value.dev if suite == "mmlu" else value
        if k < 0 or k > len(pool) or (suite != "mmlu" and k >= len(pool)):
            raise ConfigError(f"task {name}: --num-fewshot {k} needs more than the {len(pool)} examples available",
                              field="--num-fewshot")
        if suite == "mmlu":
            shots, items = value.dev[:k], value.test  # shots come from the dev split
        else:
            shots, items = value[:k], value[k:]  # the first k examples of each file are the shots
        task = cls(name, items, shots, limit)
        if max_new_tokens is not None and hasattr(task, "max_tokens"):
            task.max_tokens = max_new_tokens
        tasks.append(task)
    return tasks
