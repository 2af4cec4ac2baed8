"""Run the conformance kit against a base URL: `python -m compat --base-url URL [--api-key KEY]`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m compat")
    parser.add_argument("--base-url", help="an OpenAI-compatible base URL ending in /v1; default: start this server")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--model", default=None, help="chat model id to use (default: the server's first)")
    parser.add_argument(
        "--thinking-model", default=None, help="a model that reasons, for the reasoning checks (skipped without one)"
    )
    parser.add_argument(
        "--tool-model", default=None, help="a model with a native tool format, for the native tool checks"
    )
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args()
    if args.base_url:
        os.environ["COMPAT_BASE_URL"] = args.base_url
    if args.api_key:
        os.environ["COMPAT_API_KEY"] = args.api_key
    if args.model:
        os.environ["COMPAT_MODEL"] = args.model
    if args.thinking_model:
        os.environ["COMPAT_THINKING_MODEL"] = args.thinking_model
    if args.tool_model:
        os.environ["COMPAT_TOOL_MODEL"] = args.tool_model
    here = Path(__file__).parent
    return int(pytest.main([str(here), "-q", "-p", "no:cacheprovider", *args.pytest_args]))


if __name__ == "__main__":
    sys.exit(main())
