"""mtlora-serve: the serving engine (scheduler, KV pool, runner, batched adapter ops) and the OpenAI-compatible API."""
