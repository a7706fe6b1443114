"""mtlora HTTP clients: `mtlora-eval` (benchmark scoring) and `mtlora-bench` (load generation).

Contract: this package talks to an OpenAI-compatible server over HTTP only. It never imports torch (nor the
`mtlora` core beyond the torch-free `mtlora.errors`), so it installs and runs on a laptop with `.[eval]`.
"""

__all__ = ["http"]
