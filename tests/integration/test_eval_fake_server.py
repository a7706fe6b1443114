"""mtlora-eval against a fake OpenAI-compatible server that knows the answers.

The fake re-states the prompt formats of docs/eval.md independently of the client: it only answers prompts it
can rebuild from the data files (anything else is a 400, which the client reports as an error and the test
sees), and checks the request fields each protocol must send. Its replies follow a fixed pattern by item
position j, so the exact expected accuracy of each protocol is computed here from j alone:
  BBH  j%4: 0 " {target}\n\nQ: ..." | 1 " {TARGET}." | 2 " so the answer is {target} maybe" | 3 " zzz"
       paper (lenient substring) counts 0,1,2; harness (stop at Q:/blank line, exact match) counts 0,1.
  MMLU paper  j%4: 0 " X" | 1 "X. because" | 2 " x" (lower case) | 3 a wrong letter  -> counts 0,1
  MMLU harness: the gold letter gets the highest logprob when j%4 in (0,1), a wrong letter otherwise.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from fastapi import Request  # module level: FastAPI resolves the handler's string annotation here

from mtlora_clients.eval import cli
from mtlora_clients.eval.runner import run_eval

REPO = Path(__file__).resolve().parents[2]
BBH_TASKS = ["boolean_expressions", "snarks", "word_sorting"]
MMLU_SUBJECTS = ["abstract_algebra", "high_school_us_history", "marketing"]
MT_TASKS = ["logical_fallacy_detection", "winowhy"]
LETTERS = "ABCD"


# ------------------------------------------------------------------------------------------ the fake model --
class FakeLM:
    """Maps every prompt the protocols should send to (task, j, answer) and replies by the pattern above."""

    def __init__(self, models=("m1",), always_right=()):
        self.models, self.always_right = list(models), set(always_right)
        self.gen: dict[str, tuple[str, int, str, str]] = {}  # prompt -> (task, j, gold, kind)
        self.ll: dict[str, tuple[str, int, str]] = {}  # harness MMLU context -> (task, j, gold)
        self.answered: list[str] = []  # prompts answered (resume test: no duplicates)
        self.fail_plan: dict[str, list[int]] = {}  # prompt -> statuses to return before answering
        self.malformed: dict[str, str] = {}  # prompt -> how to break the reply
        self.lock = threading.Lock()

    # -- expected prompts, written from the spec --
    def add_bbh(self, root: Path, tasks, shots=3, limit=None):
        for t in tasks:
            ex = json.loads((root / f"{t}.json").read_text())["examples"]
            head = "".join(f"Q: {e['input']}\nA: {e['target']}\n\n" for e in ex[:shots])
            for j, e in enumerate(ex[shots:][:limit]):
                self.gen[f"{head}Q: {e['input']}\nA:"] = (t, j, e["target"], "bbh")

    def add_mmlu(self, root: Path, subjects, protocol, limit=None):
        def rows(split, s):
            with open(root / split / f"{s}_{split}.csv", newline="") as f:
                return list(csv.reader(f))

        for s in subjects:
            dev, test = rows("dev", s), rows("test", s)[:limit]
            if protocol == "paper":
                fmt = lambda r: f"Question: {r[0]}\nA. {r[1]}\nB. {r[2]}\nC. {r[3]}\nD. {r[4]}\nAnswer:"
                head = "".join(f"{fmt(r)} {r[5]}\n\n" for r in dev)
                for j, r in enumerate(test):
                    self.gen[head + fmt(r)] = (s, j, r[5], "mmlu")
            else:
                fmt = lambda r: f"{r[0].strip()}\nA. {r[1]}\nB. {r[2]}\nC. {r[3]}\nD. {r[4]}\nAnswer:"
                head = (f"The following are multiple choice questions (with answers) about {s.replace('_', ' ')}."
                        "\n\n" + "".join(f"{fmt(r)} {r[5]}\n\n" for r in dev))
                for j, r in enumerate(test):
                    self.ll[head + fmt(r)] = (s, j, r[5])

    # -- replies --
    def _bbh_text(self, j, gold, right):
        if right:
            return f" {gold}"
        return [f" {gold}\n\nQ: next question", f" {gold.upper()}.", f" so the answer is {gold} maybe", " zzz"][j % 4]

    def _mmlu_text(self, j, gold, right):
        wrong = LETTERS[(LETTERS.index(gold) + 1) % 4]
        if right:
            return f" {gold}"
        return [f" {gold}", f"{gold}. because", f" {gold.lower()}", f" {wrong}"][j % 4]

    def _loglik(self, prompt, context, cont, j, gold, right):
        chosen = gold if right or j % 4 in (0, 1) else LETTERS[(LETTERS.index(gold) + 2) % 4]
        tokens = re.findall(r"\s?\S+|\s+", prompt)  # " A" stays one token after "Answer:"
        offsets, pos = [], 0
        for tok in tokens:
            offsets.append(pos)
            pos += len(tok)
        lps = [None] + [-1.0] * (len(tokens) - 1)
        lps[-1] = -0.25 if cont.strip() == chosen else -4.0
        return {"text": prompt, "logprobs": {"tokens": tokens, "token_logprobs": lps, "text_offset": offsets,
                                             "top_logprobs": None}}

    def reply(self, payload: dict) -> tuple[int, dict | str, dict]:
        """(status, body, headers) for one /v1/completions request."""
        prompt, model = payload.get("prompt"), payload.get("model")
        if model not in self.models:
            return 404, {"error": {"message": f"The model `{model}` does not exist."}}, {}
        with self.lock:
            plan = self.fail_plan.get(prompt)
            if plan:
                status = plan.pop(0)
                return status, {"error": {"message": f"injected {status}"}}, {"Retry-After": "0"}
        right = model in self.always_right
        if prompt in self.gen:
            task, j, gold, kind = self.gen[prompt]
            want = {"bbh": (32, None), "bbh-h": (256, ["</s>", "Q:", "\n\n"]), "mmlu": (1, None)}
            key = "bbh-h" if kind == "bbh" and payload.get("stop") else kind
            if (payload.get("max_tokens"), payload.get("stop")) != want[key] or payload.get("temperature") != 0:
                return 400, {"error": {"message": f"unexpected sampling fields {payload}"}}, {}
            text = (self._bbh_text if kind == "bbh" else self._mmlu_text)(j, gold, right)
            for stop in payload.get("stop") or []:  # like a real server: cut at the first stop string
                text = text.split(stop)[0]
            choice = {"text": text, "index": 0, "finish_reason": "stop", "logprobs": None}
        elif prompt and prompt[:-2] in self.ll and re.fullmatch(r" [ABCD]", prompt[-2:]):
            if not (payload.get("echo") and payload.get("max_tokens") == 0 and payload.get("logprobs") == 1):
                return 400, {"error": {"message": "log-likelihood needs echo, max_tokens=0, logprobs=1"}}, {}
            task, j, gold = self.ll[prompt[:-2]]
            choice = {"index": 0, "finish_reason": "length", **self._loglik(prompt, prompt[:-2], prompt[-2:], j,
                                                                             gold, right)}
        else:
            return 400, {"error": {"message": "fake server does not know this prompt (format mismatch?)"}}, {}
        how = self.malformed.get(prompt)
        if how == "not-json":
            return 200, "<html>oops</html>", {}
        if how == "no-choices":
            return 200, {"id": "x", "object": "text_completion"}, {}
        if how == "text-null":
            choice["text"] = None
        with self.lock:
            self.answered.append(prompt)
        return 200, {"id": "cmpl-1", "object": "text_completion", "model": model, "choices": [choice],
                     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}, {}

    def models_body(self):
        return {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]}

    def transport(self) -> httpx.MockTransport:
        def handler(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/v1/models":
                return httpx.Response(200, json=self.models_body())
            status, body, headers = self.reply(json.loads(request.content))
            if isinstance(body, str):
                return httpx.Response(status, text=body, headers=headers)
            return httpx.Response(status, json=body, headers=headers)

        return httpx.MockTransport(handler)


def expected(lm: FakeLM, counts) -> dict[str, float]:
    """Per-task accuracy the fake's pattern implies: items whose j%4 is in `counts` are correct."""
    per: dict[str, list[int]] = {}
    for task, j, *_ in list(lm.gen.values()) + list(lm.ll.values()):
        per.setdefault(task, []).append(int(j % 4 in counts))
    return {t: sum(v) / len(v) for t, v in per.items()}


def args(suite, data_dir, out, **kw):
    base = dict(suite=suite, base_url="http://fake", model="m1", data_dir=str(data_dir), protocol="paper",
                tasks=None, limit=None, concurrency=4, output=str(out), retry_base_s=0.0)
    return {**base, **kw}


# -------------------------------------------------------------------------------------- accuracy, exactly --
@pytest.mark.parametrize("protocol,counts", [("paper", (0, 1, 2)), ("harness", (0, 1))])
def test_bbh_exact_accuracy(shared_data, tmp_path, protocol, counts):
    lm = FakeLM()
    lm.add_bbh(shared_data / "bbh", BBH_TASKS, limit=9)
    res = run_eval(args("bbh", shared_data / "bbh", tmp_path, protocol=protocol, tasks=",".join(BBH_TASKS),
                        limit=9), transport=lm.transport())
    want = expected(lm, counts)
    got = res["models"]["m1"]
    assert got["n_errors"] == 0, got["errors"]
    assert {t: v["accuracy"] for t, v in got["tasks"].items()} == pytest.approx(want)
    assert got["average"] == pytest.approx(sum(want.values()) / len(want))  # macro over tasks
    assert got["n"] == 27
    # predictions were written as they finished, one line per item
    lines = (tmp_path / "m1" / "snarks.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["index"] for x in lines) == list(range(9))


@pytest.mark.parametrize("protocol", ["paper", "harness"])
def test_mmlu_exact_accuracy_and_categories(shared_data, tmp_path, protocol):
    lm = FakeLM()
    lm.add_mmlu(shared_data / "mmlu", MMLU_SUBJECTS, protocol, limit=10)
    res = run_eval(args("mmlu", shared_data / "mmlu", tmp_path, protocol=protocol, tasks=",".join(MMLU_SUBJECTS),
                        limit=10), transport=lm.transport())
    got = res["models"]["m1"]
    assert got["n_errors"] == 0, got["errors"]
    want = expected(lm, (0, 1))
    assert {t: v["accuracy"] for t, v in got["tasks"].items()} == pytest.approx(want)
    assert got["average"] == pytest.approx(sum(1 for j in range(10) if j % 4 < 2) * 3 / 30)  # micro
    cats = got["categories"]
    assert set(cats) == {"STEM", "humanities", "other"}  # algebra, US history, marketing
    assert cats["humanities"]["n"] == 10 and cats["STEM"]["accuracy"] == pytest.approx(want["abstract_algebra"])
    assert res["protocol"] == protocol and len(res["data_hash"]) == 64


@pytest.mark.parametrize("protocol,counts", [("paper", (0, 1, 2)), ("harness", (0, 1))])
def test_tasks_folder_exact_accuracy(shared_data, tmp_path, protocol, counts):
    root = shared_data / "bigbench_mt" / "test"
    lm = FakeLM()
    lm.add_bbh(root, MT_TASKS, limit=12)
    res = run_eval(args("tasks", root, tmp_path, protocol=protocol, tasks=",".join(MT_TASKS), limit=12),
                   transport=lm.transport())
    got = res["models"]["m1"]
    assert got["n_errors"] == 0, got["errors"]
    assert {t: v["accuracy"] for t, v in got["tasks"].items()} == pytest.approx(expected(lm, counts))


def test_several_models_compared_with_chart(shared_data, tmp_path):
    lm = FakeLM(models=("base", "adapter"), always_right=("adapter",))
    lm.add_bbh(shared_data / "bbh", BBH_TASKS[:2], limit=6)
    res = run_eval(args("bbh", shared_data / "bbh", tmp_path, model="base,adapter", tasks=",".join(BBH_TASKS[:2]),
                        limit=6), transport=lm.transport())
    assert res["models"]["adapter"]["average"] == 1.0
    assert res["models"]["base"]["average"] == pytest.approx(sum(1 for j in range(6) if j % 4 < 3) / 6)
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["models"]["adapter"]["tasks"]["snarks"]["n"] == 6 and saved["server"] == "http://fake"
    report = (tmp_path / "report.md").read_text()
    assert "| boolean_expressions | 83.3 | 100.0 |" in report  # 5 of 6 right by the fake's pattern
    assert "LENIENT" in report


def test_retries_on_429_and_500_then_scores(shared_data, tmp_path):
    lm = FakeLM()
    lm.add_bbh(shared_data / "bbh", BBH_TASKS[:1], limit=8)
    for prompt in lm.gen:
        lm.fail_plan[prompt] = [429, 500, 503]
    res = run_eval(args("bbh", shared_data / "bbh", tmp_path, tasks=BBH_TASKS[0], limit=8, max_retries=3),
                   transport=lm.transport())
    got = res["models"]["m1"]
    assert got["n_errors"] == 0 and got["n_retries"] == 24 and got["n_requests"] == 32
    assert got["average"] == pytest.approx(expected(lm, (0, 1, 2))[BBH_TASKS[0]])
    assert len(lm.answered) == 8


def test_gives_up_and_reports_item_when_retries_run_out(shared_data, tmp_path):
    lm = FakeLM()
    lm.add_bbh(shared_data / "bbh", BBH_TASKS[:1], limit=5)
    bad = [p for p, v in lm.gen.items() if v[1] == 2][0]
    lm.fail_plan[bad] = [500] * 10
    res = run_eval(args("bbh", shared_data / "bbh", tmp_path, tasks=BBH_TASKS[0], limit=5, max_retries=2),
                   transport=lm.transport())
    got = res["models"]["m1"]
    assert [(e["task"], e["index"]) for e in got["errors"]] == [(BBH_TASKS[0], 2)]
    assert "HTTP 500" in got["errors"][0]["error"]
    assert got["n"] == 4 and got["tasks"][BBH_TASKS[0]]["errors"] == 1  # not scored as wrong
    assert res["n_errors"] == 1


def test_malformed_replies_are_errors_with_their_item(shared_data, tmp_path):
    lm = FakeLM()
    lm.add_bbh(shared_data / "bbh", BBH_TASKS[:1], limit=8)
    by_j = {v[1]: p for p, v in lm.gen.items()}
    lm.malformed = {by_j[1]: "not-json", by_j[4]: "no-choices", by_j[6]: "text-null"}
    res = run_eval(args("bbh", shared_data / "bbh", tmp_path, tasks=BBH_TASKS[0], limit=8),
                   transport=lm.transport())
    got = res["models"]["m1"]
    errs = {e["index"]: e["error"] for e in got["errors"]}
    assert set(errs) == {1, 4, 6}
    assert "not JSON" in errs[1] and "choices" in errs[4] and "text" in errs[6]
    scored = [j for j in range(8) if j not in errs]
    assert got["n"] == len(scored)
    assert got["average"] == pytest.approx(sum(1 for j in scored if j % 4 < 3) / len(scored))
    # the failed items are not in the resume file, so a rerun retries them
    lines = (tmp_path / "m1" / f"{BBH_TASKS[0]}.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["index"] for x in lines) == scored
    lm.malformed = {}
    again = run_eval(args("bbh", shared_data / "bbh", tmp_path, tasks=BBH_TASKS[0], limit=8),
                     transport=lm.transport())["models"]["m1"]
    assert again["n_errors"] == 0 and again["n"] == 8 and again["resumed"] == len(scored)


def test_unknown_model_fails_fast(shared_data, tmp_path):
    from mtlora.errors import ConfigError

    lm = FakeLM()
    lm.add_bbh(shared_data / "bbh", BBH_TASKS[:1], limit=2)
    with pytest.raises(ConfigError, match="not served"):
        run_eval(args("bbh", shared_data / "bbh", tmp_path, model="nope", tasks=BBH_TASKS[0], limit=2),
                 transport=lm.transport())
    assert lm.answered == []


# ------------------------------------------------------------------------------- a real socket: uvicorn --
class _GatedServer:
    """The fake behind FastAPI/uvicorn on 127.0.0.1:<free port>; after `gate` answers, requests hang."""

    def __init__(self, lm: FakeLM, gate: int | None = None):
        import uvicorn
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse, PlainTextResponse

        self.lm, self.gate, self.release, self.hung = lm, gate, threading.Event(), 0
        app = FastAPI()

        @app.get("/v1/models")
        async def models():
            return lm.models_body()

        @app.post("/v1/completions")
        async def completions(request: Request):
            payload = await request.json()
            if self.gate is not None and len(lm.answered) >= self.gate:
                self.hung += 1
                while not self.release.is_set():
                    await asyncio.sleep(0.02)
                return JSONResponse({"error": {"message": "released"}}, status_code=503)
            status, body, headers = lm.reply(payload)
            if isinstance(body, str):
                return PlainTextResponse(body, status_code=status, headers=headers)
            return JSONResponse(body, status_code=status, headers=headers)

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "fake server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.server.should_exit = True
        self.thread.join(10)


def _wait(cond, timeout=60.0, what=""):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_resume_after_kill_same_results_no_duplicate_requests(shared_data, tmp_path):
    lm = FakeLM()
    tasks = BBH_TASKS[:2]
    lm.add_bbh(shared_data / "bbh", tasks, limit=6)
    out = tmp_path / "out"
    argv = ["bbh", "--data-dir", str(shared_data / "bbh"), "--model", "m1", "--tasks", ",".join(tasks),
            "--limit", "6", "--concurrency", "2", "--output", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "clients")])}
    with _GatedServer(lm, gate=5) as srv:
        proc = subprocess.Popen([sys.executable, "-m", "mtlora_clients.eval.cli", "--base-url", srv.url, *argv],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            files = [out / "m1" / f"{t}.jsonl" for t in tasks]
            lines = lambda: sum(len(f.read_text().splitlines()) for f in files if f.exists())
            def ready():
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # it must not have ended
                return srv.hung == 2 and lines() == 5

            _wait(ready, what="5 recorded answers and 2 hung requests")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
        srv.gate = None  # the server recovers; the rerun must only ask for what is missing
        srv.release.set()
        code = cli.main(["--base-url", srv.url, *argv])
    assert code == 0
    dupes = [p for p, n in Counter(lm.answered).items() if n > 1]
    assert dupes == [] and len(lm.answered) == 12
    res = json.loads((out / "results.json").read_text())["models"]["m1"]
    assert res["resumed"] == 5 and res["evaluated"] == 7
    want = expected(lm, (0, 1, 2))
    assert {t: v["accuracy"] for t, v in res["tasks"].items()} == pytest.approx(want)
    for f in [out / "m1" / f"{t}.jsonl" for t in tasks]:
        idx = [json.loads(x)["index"] for x in f.read_text().splitlines()]
        assert sorted(idx) == list(range(6))  # each item once: no duplicate lines after the resume


def test_cli_exit_code_nonzero_and_report_lists_errors(shared_data, tmp_path):
    lm = FakeLM()
    lm.add_mmlu(shared_data / "mmlu", MMLU_SUBJECTS[:1], "paper", limit=4)
    lm.malformed = {[p for p, v in lm.gen.items() if v[1] == 3][0]: "no-choices"}
    with _GatedServer(lm) as srv:
        code = cli.main(["mmlu", "--base-url", srv.url, "--model", "m1", "--data-dir", str(shared_data / "mmlu"),
                         "--tasks", MMLU_SUBJECTS[0], "--limit", "4", "--output", str(tmp_path)])
    assert code == 1
    report = (tmp_path / "report.md").read_text()
    assert f"m1 / {MMLU_SUBJECTS[0]} #3:" in report and "Errors (1" in report
