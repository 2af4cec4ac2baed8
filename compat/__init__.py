"""The OpenAI conformance kit: wire-contract checks that run against ANY base URL.

    python -m compat --base-url http://127.0.0.1:8000/v1 [--api-key KEY]

Without a base URL (as in `make test`) it starts this server itself. It
prints a score table per client (openai SDK, LangChain, raw HTTP).
"""
