"""`python -m mtlora_server.vllm_backend ...`: mtlora-serve's flags, always on the vLLM engine.

The same as `mtlora-serve --engine vllm ...`; usable before (and independently of) the CLI hook.
"""

from __future__ import annotations

import logging
import os
import sys

from .launch import add_arguments, serve


def main(argv: list[str] | None = None) -> int:
    from mtlora_server.cli import build_parser

    parser = add_arguments(build_parser())
    parser.prog = "python -m mtlora_server.vllm_backend"
    parser.description = ("Serve ONE mtlora adapter with vLLM's OpenAI server (the adapter is built into the model; "
                          "vLLM brings tensor parallelism). Same flags as mtlora-serve; see docs/vllm-backend.md.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.api_key = args.api_key or os.environ.get("MTLORA_API_KEY") or None
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
