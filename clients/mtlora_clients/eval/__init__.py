"""`mtlora-eval`: score served models on MMLU, BBH and BBH-format task folders over HTTP.

Modules: `data` (on-disk / hub loaders), `scoring` (pure answer-matching functions), `tasks` (one small Task class
per benchmark and protocol), `runner` (`run_eval(args) -> results dict`: concurrency, retries, resume),
`report` (terminal table, results.json, report.md, PNG chart), `cli` (argument parsing).
"""
