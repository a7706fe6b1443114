"""`mtlora-eval {mmlu,bbh,tasks}`: command-line entry point (see docs/eval.md).

Exit codes: 0 all items scored; 1 some items failed (server error or malformed reply: see report.md);
2 bad arguments or data (the message names the flag or file), including a server that answers 404 (no such route
or model: check --base-url and --model), which stops the run at once.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mtlora.errors import MtloraError

from .runner import default_args, run_eval

SUITES = {
    "mmlu": "MMLU (57 subjects; --data-dir holds dev/ and test/ CSV folders)",
    "bbh": "BIG-Bench Hard (27 tasks; --data-dir holds one <task>.json per task)",
    "tasks": "any folder of BBH-format <task>.json files, scored like BBH (--data-dir required)",
}


def build_parser() -> argparse.ArgumentParser:
    d = default_args()
    p = argparse.ArgumentParser(prog="mtlora-eval", description="Score served models over an OpenAI-compatible "
                                "HTTP API. Results go to OUTPUT/results.json, report.md and, with several models, "
                                "comparison.png; predictions to OUTPUT/<model>/<task>.jsonl (reruns resume).")
    p.add_argument("suite", choices=list(SUITES), help="; ".join(f"{k}: {v}" for k, v in SUITES.items()))
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000; the OpenAI spelling "
                   "http://127.0.0.1:8000/v1 works too")
    p.add_argument("--model", required=True, help="served model or adapter name; comma-separated to compare")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY' when given")
    p.add_argument("--data-dir", default=None, help="benchmark folder in its standard layout; without it MMLU/BBH "
                   "come from the Hugging Face hub (needs `datasets` and network)")
    p.add_argument("--protocol", choices=["paper", "harness"], default=d.protocol,
                   help="paper: official mtLoRA scoring (lenient BBH substring match, MMLU first character); "
                        "harness: lm-evaluation-harness style (MMLU log-likelihood, BBH exact match)")
    p.add_argument("--num-fewshot", type=int, default=None,
                   help="few-shot exemplars per task (default: 5 for MMLU from dev/, 3 for BBH: the first examples "
                        "of each file, which are then not scored)")
    p.add_argument("--tasks", default=None, help="comma-separated subset of tasks (MMLU subjects) to run")
    p.add_argument("--limit", type=int, default=None, help="score at most N items per task (the first N)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="BBH/tasks generation budget (default: 32 paper, 256 harness); MMLU paper always uses 1")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="requests in flight at once")
    p.add_argument("--output", default=d.output, help="folder for predictions and reports")
    p.add_argument("--timeout", type=float, default=d.timeout,
                   help="seconds per HTTP request (time queued on the server included) before it is abandoned and "
                        "retried; default %(default)s, as the openai client. Too short a limit on a busy server "
                        "only re-queues the same work")
    p.add_argument("--max-retries", type=int, default=d.max_retries,
                   help="retries on 429/5xx/time-outs, exponential backoff from 0.5 s (Retry-After honoured)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging (retries are logged as warnings either way)")
    return p


def _check_numbers(args: argparse.Namespace) -> str | None:
    """The first numeric flag out of range, as a message naming it; None when all are fine."""
    for flag in ("limit", "concurrency", "max_new_tokens", "timeout"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            return f"--{flag.replace('_', '-')} must be positive, got {value}"
    for flag in ("max_retries", "num_fewshot"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            return f"--{flag.replace('_', '-')} must be >= 0, got {value}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request drowns the progress bar
    problem = _check_numbers(args)
    if problem:
        print(f"mtlora-eval: {problem}", file=sys.stderr)
        return 2
    try:
        results = run_eval(args)
    except MtloraError as e:
        print(f"mtlora-eval: {e}", file=sys.stderr)
        return 2
    if results["n_errors"]:
        print(f"mtlora-eval: {results['n_errors']} item(s) failed (see {args.output}/report.md); "
              "rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
