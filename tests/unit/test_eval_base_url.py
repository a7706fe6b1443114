"""`--base-url` in both spellings (server root, or OpenAI's `.../v1`), and a run that stops at the first 404
instead of reporting every question as a failed item (issue 13, item 8)."""

from __future__ import annotations

from argparse import Namespace

import httpx
import pytest

from mtlora.errors import ConfigError
from mtlora_clients.eval.data import Example
from mtlora_clients.eval.runner import evaluate_model
from mtlora_clients.eval.tasks import BBHPaper
from mtlora_clients.http import CompletionClient, server_root

OK = {"choices": [{"text": " yes", "index": 0}]}


@pytest.mark.parametrize("url", ["http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/",
                                 " http://h:8000/v1 "])
def test_server_root_accepts_both_spellings(url):
    assert server_root(url) == "http://h:8000"


def test_server_root_keeps_other_prefixes():
    assert server_root("http://h/proxy/v1") == "http://h/proxy"
    assert server_root("http://h/v1x") == "http://h/v1x"


@pytest.mark.parametrize("base", ["http://x", "http://x/v1"])
async def test_requests_go_to_v1_completions_whatever_the_spelling(base):
    paths = []

    def handler(request):
        paths.append(request.url.path)
        return httpx.Response(200, json=OK)

    async with CompletionClient(base, transport=httpx.MockTransport(handler)) as c:
        assert await c.complete("m", "q", 4) == " yes"
    assert paths == ["/v1/completions"]


def _args(tmp_path, base_url: str, concurrency: int = 4) -> Namespace:
    return Namespace(output=str(tmp_path), max_retries=3, base_url=base_url, api_key=None, timeout=5.0,
                     concurrency=concurrency, retry_base_s=0.0)


async def test_a_404_stops_the_run_at_once_naming_the_flags(tmp_path):
    """A server without the route (here: the doubled /v1/v1 of a client that does not strip /v1) answers 404
    to everything; the run must stop at the first one, not send every question."""
    sent = []

    def handler(request):
        sent.append(request.url.path)
        return httpx.Response(404, json={"detail": "Not Found"})

    task = BBHPaper("t", [Example(f"q{i}", "yes") for i in range(50)], [])
    with pytest.raises(ConfigError, match="answered 404") as err:
        await evaluate_model(_args(tmp_path, "http://x"), "m", [task], transport=httpx.MockTransport(handler))
    assert err.value.field == "--base-url" and "--model" in str(err.value)
    completions = [p for p in sent if p.endswith("/completions")]
    assert 1 <= len(completions) <= 4                     # at most one per worker, never retried, never 50


async def test_a_v1_base_url_scores_every_item(tmp_path):
    def handler(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        assert request.url.path == "/v1/completions"
        return httpx.Response(200, json=OK)

    task = BBHPaper("t", [Example(f"q{i}", "yes") for i in range(5)], [])
    run = await evaluate_model(_args(tmp_path, "http://x/v1"), "m", [task], transport=httpx.MockTransport(handler))
    assert run["errors"] == [] and len(run["records"]["t"]) == 5
