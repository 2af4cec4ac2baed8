"""Fuzzing every endpoint of a live server with the real default models (hypothesis).

Bodies are drawn from the schemas of `GET /openapi.json` (so every documented field is exercised),
with a few fields steered so requests reach the engine often while staying cheap on a CPU: generation
lengths are always tiny (or absurd, which must be refused), models are real ids or unknown ones, and a
share of bodies get one field replaced by arbitrary JSON. The rules checked on every answer: no 5xx;
every non-2xx body is OpenAI's error shape (validated against the document's `ErrorResponse`); every
2xx JSON body validates against the operation's documented answer; streams end properly. After all of
it, each chat engine's KV pool is back to its baseline. Explicit hostile inputs follow the fuzzers.
"""

from __future__ import annotations

import collections
import io
import json
import os
import re
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.app import create_app
from server.config import Settings
from server.persistence.files import PURPOSES
from server.registry import ModelRegistry
from tests.serving import running_server

CHAT, EMBED = "smollm2-135m-instruct", "all-minilm-l6-v2"
MAX_BODY_MB = 8
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))  # per endpoint; FUZZ_EXAMPLES=1000 for a long hunt
# A fixed example sequence by default (CI stays reproducible); FUZZ_RANDOM=1 explores new ones each run.
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=not os.environ.get("FUZZ_RANDOM"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
INTS = st.one_of(st.integers(-2, 5), st.integers(), st.sampled_from([10**30, -(10**30), 2**63, 2**31]))
NUMBERS = st.one_of(st.floats(-3, 3), st.floats(allow_nan=False, allow_infinity=False), st.just(1e308))
TEXT = st.text(max_size=24)


def often(usual: st.SearchStrategy[Any], rare: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`usual` seven times in eight: enough valid values that requests get past validation to the engine
    (the rare draw is an inner value, as hypothesis favours the ends of a range)."""
    return st.integers(0, 7).flatmap(lambda i: rare if i == 5 else usual)


# a generation is tiny, or so absurd that it must be refused before it starts
LENGTH = often(st.integers(1, 4), st.sampled_from([-1, 0, 10**30, -(10**30), 2**63, 9000]))
ROLES = often(st.sampled_from(["system", "developer", "user", "assistant"]), st.sampled_from(["tool", "bogus", ""]))
LENGTHS = {"max_tokens", "max_completion_tokens", "max_output_tokens"}
COUNT = often(st.none() | st.integers(1, 2), st.sampled_from([-1, 0, 3, 129, 10**9]))


def inputs(vocab: int) -> st.SearchStrategy[Any]:
    """A prompt or embedding input: text, texts, token ids, lists of them; now and then empty or out of range."""
    ids = st.lists(
        often(st.integers(0, vocab - 1), st.sampled_from([-1, vocab, 2**31, 10**30])), min_size=1, max_size=4
    )
    usual = st.one_of(
        TEXT.filter(str.strip),
        st.lists(TEXT.filter(str.strip), min_size=1, max_size=3),
        ids,
        st.lists(ids, min_size=1, max_size=2),
    )
    return often(usual, st.one_of(st.sampled_from(["", [], [[]], [""]]), JSON))


def models(kind: str) -> st.SearchStrategy[str | None]:
    """Mostly the right model (or none: the default), sometimes the other kind or an unknown id."""
    right, wrong = (CHAT, EMBED) if kind == "chat" else (EMBED, CHAT)
    return often(st.sampled_from([right, None]), st.sampled_from([wrong, "nope", "", "ft:x:y::z", "org/name"]))


MODELS = models("chat")


class Fuzz:
    """The live server, its OpenAPI document, and ids of real objects for the fuzzers to hit (fixed before
    fuzzing starts: hypothesis needs the same strategies on every run)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.http = httpx.Client(base_url=base, timeout=60)
        self.doc = self.http.get("/openapi.json").json()
        self.components = self.doc["components"]
        self.ids: dict[str, list[str]] = {"file": [], "job": [], "response": []}
        self.seen: collections.Counter[tuple[str, str, int]] = collections.Counter()  # (method, route, status)

    # -- schemas ------------------------------------------------------------------------------
    def schema(self, name: str) -> dict[str, Any]:
        return self.components["schemas"][name]  # type: ignore[no-any-return]

    def draw_schema(self, schema: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
        """Values shaped like the JSON schema (loosely: integers and numbers range wide)."""
        if "$ref" in schema:
            return st.deferred(lambda: self.draw_schema(self.schema(schema["$ref"].rsplit("/", 1)[-1]), depth + 1))
        if "anyOf" in schema:
            return st.one_of([self.draw_schema(s, depth) for s in schema["anyOf"]])
        if "enum" in schema:
            return st.sampled_from(schema["enum"])
        if "const" in schema:
            return st.just(schema["const"])
        kind = schema.get("type")
        if kind == "string":
            return TEXT
        if kind == "integer":
            return INTS
        if kind == "number":
            return NUMBERS
        if kind == "boolean":
            return st.booleans()
        if kind == "null":
            return st.none()
        if kind == "array":
            return st.lists(self.draw_schema(schema.get("items", {}), depth + 1), max_size=0 if depth > 4 else 3)
        if kind == "object" and "properties" in schema:
            return self.draw_object(schema, {}, depth)
        if kind == "object":
            return st.dictionaries(TEXT, JSON, max_size=3)
        return JSON

    def draw_object(
        self, schema: dict[str, Any], steer: dict[str, st.SearchStrategy[Any]], depth: int = 0
    ) -> st.SearchStrategy[dict[str, Any]]:
        """The required fields, the steered ones, and up to two optional others (more would make
        nearly every body invalid somewhere, and the server would never get past validation)."""
        props = schema["properties"]
        required = [k for k in schema.get("required", ()) if k not in steer]
        free = sorted(k for k in props if k not in required and k not in steer)

        def build(extra: list[str]) -> st.SearchStrategy[dict[str, Any]]:
            drawn = {k: self.draw_schema(props[k], depth + 1) for k in [*required, *extra]}
            return st.fixed_dictionaries({**drawn, **steer})

        return st.lists(st.sampled_from(free), max_size=2, unique=True).flatmap(build) if free else build([])

    def body(self, name: str, **steer: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
        """A request body from the named schema, some fields steered; one in five has a field made arbitrary."""
        shaped = self.draw_object(self.schema(name), steer)

        def spoil(body: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
            keys = sorted(set(body) - LENGTHS) or ["model"]  # a null length would generate for minutes
            return st.tuples(st.sampled_from(keys), JSON).map(lambda kv: {**body, kv[0]: kv[1]})

        return st.integers(0, 4).flatmap(lambda i: shaped.flatmap(spoil) if i == 3 else shaped)

    # -- checks -------------------------------------------------------------------------------
    def validate(self, name: str, value: Any) -> None:
        jsonschema.validate(value, {"$ref": f"#/components/schemas/{name}", "components": self.components})

    def check(self, response: httpx.Response, method: str, path: str) -> None:
        """No 5xx; errors in OpenAI's shape; JSON answers as documented; streams end properly."""
        where = f"{method} {path} -> {response.status_code}: {response.text[:300]}"
        assert response.status_code < 500, where
        kind = response.headers.get("content-type", "")
        if response.status_code >= 400:
            assert kind.startswith("application/json"), where
            self.validate("ErrorResponse", response.json())
            return
        if kind.startswith("text/event-stream"):
            check_stream(response.text, path, where)
            return
        operation = self.doc["paths"].get(documented(self.doc["paths"], path), {}).get(method.lower())
        schema = (operation or {}).get("responses", {}).get("200", {}).get("content", {}).get("application/json")
        if schema is not None and "$ref" in schema["schema"]:
            self.validate(schema["schema"]["$ref"].rsplit("/", 1)[-1], response.json())

    def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self.http.request(method, path, **kwargs)
        self.seen[(method, documented(self.doc["paths"], path) or "unknown", response.status_code)] += 1
        self.check(response, method, path)
        return response


def documented(paths: dict[str, Any], path: str) -> str | None:
    """The document's template for a concrete path (`/v1/files/file-1/content` -> `/v1/files/{file_id}/content`)."""
    for template in paths:
        pattern = re.sub(r"{model_id}", ".+", re.sub(r"{(?!model_id)[^}]+}", "[^/]+", template))
        if re.fullmatch(pattern, path):
            return template
    return None


def check_stream(text: str, path: str, where: str) -> None:
    data = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert data, where
    if path.startswith("/v1/responses"):
        last = json.loads(data[-1])
        assert last["type"] in ("response.completed", "response.incomplete", "response.failed"), where
        return
    assert data[-1] == "[DONE]" or "error" in json.loads(data[-1]), where
    for payload in data[:-1]:
        json.loads(payload)


def quoted(value: str) -> str:
    return urllib.parse.quote(value, safe="")


@pytest.fixture(scope="module")
def fuzz(registry: ModelRegistry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    settings_ = Settings(data_dir=tmp_path_factory.mktemp("fuzz"), max_body_mb=MAX_BODY_MB, max_file_mb=1)
    with running_server(create_app(settings_, registry)) as base:
        f = Fuzz(base)
        bad = f.http.post(
            "/v1/files", files={"file": ("bad.jsonl", io.BytesIO(b"not json\n"))}, data={"purpose": "fine-tune"}
        )
        f.ids["file"].append(bad.json()["id"])
        job = f.http.post("/v1/fine_tuning/jobs", json={"model": CHAT, "training_file": f.ids["file"][0]})
        f.ids["job"].append(job.json()["id"])
        stored = f.http.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 2})
        f.ids["response"].append(stored.json()["id"])
        yield f


# -- engine pools ---------------------------------------------------------------------------------
def idle_leftover(registry: ModelRegistry, submitted: dict[str, int] | None = None) -> dict[str, int]:
    """Per chat engine, once idle: blocks in use that no conversation pin explains (0 when nothing leaked).

    Idle means every submitted request finished and the engine thread published that state; `submitted` waits
    first for requests the server may still be handing to the engine (a client that timed out early)."""
    out = {}
    for served in registry.list():
        if served.engine is None:
            continue
        deadline = time.monotonic() + 60
        while True:
            stats = served.engine.stats()
            idle = (
                stats.requests_finished == stats.requests_submitted >= (submitted or {}).get(served.id, 0)
                and stats.running == stats.waiting == 0
            )
            if idle or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert idle, f"{served.id} never went idle: {stats}"
        served.engine.check_integrity()
        out[served.id] = stats.blocks_used - stats.blocks_pinned
    return out


@pytest.fixture(scope="module")
def baseline(registry: ModelRegistry) -> dict[str, int]:
    return idle_leftover(registry)


# -- the fuzzers ----------------------------------------------------------------------------------
def message(f: Fuzz) -> st.SearchStrategy[dict[str, Any]]:
    parts = f.draw_schema(f.schema("ChatMessage")["properties"]["content"])
    return f.draw_object(f.schema("ChatMessage"), {"role": ROLES, "content": st.one_of(TEXT, TEXT, st.none(), parts)})


@FUZZ
@given(data=st.data())
def test_fuzz_chat_completions(fuzz: Fuzz, baseline: dict[str, int], data: st.DataObject) -> None:
    body = data.draw(
        fuzz.body(
            "ChatCompletionRequest",
            model=MODELS,
            messages=often(st.lists(message(fuzz), min_size=1, max_size=3), st.just([])),
            max_tokens=LENGTH | st.none(),
            max_completion_tokens=LENGTH,
            n=COUNT,
            stream=st.booleans() | st.none(),
        )
    )
    headers = data.draw(
        st.fixed_dictionaries(
            {},
            optional={"x-conversation-id": TEXT.filter(str.isprintable), "x-request-id": TEXT.filter(str.isprintable)},
        )
    )
    fuzz.send("POST", "/v1/chat/completions", json=body, headers={k: v.encode() for k, v in headers.items()})


@FUZZ
@given(data=st.data())
def test_fuzz_completions(fuzz: Fuzz, baseline: dict[str, int], data: st.DataObject) -> None:
    body = data.draw(
        fuzz.body(
            "CompletionRequest",
            model=MODELS,
            max_tokens=LENGTH,
            prompt=inputs(49_151),
            n=COUNT,
            best_of=often(st.none(), COUNT),
            logprobs=often(st.none(), st.integers(-1, 6)),
            stream=st.booleans() | st.none(),
        )
    )
    fuzz.send("POST", "/v1/completions", json=body)


@FUZZ
@given(data=st.data())
def test_fuzz_embeddings(fuzz: Fuzz, data: st.DataObject) -> None:
    body = data.draw(
        fuzz.body(
            "EmbeddingRequest",
            model=models("embedding"),
            input=inputs(30_521),
            encoding_format=st.sampled_from(["float", "base64", "x"]) | st.none(),
            dimensions=often(st.none() | st.integers(1, 384), st.sampled_from([-1, 0, 385, 10**30])),
        )
    )
    fuzz.send("POST", "/v1/embeddings", json=body)


@FUZZ
@given(data=st.data())
def test_fuzz_responses(fuzz: Fuzz, baseline: dict[str, int], data: st.DataObject) -> None:
    item = fuzz.draw_object(
        fuzz.schema("InputItem"),
        {
            "type": st.sampled_from(["message", "function_call", "function_call_output", "reasoning"]) | st.none(),
            "role": ROLES,
        },
    )
    body = data.draw(
        fuzz.body(
            "ResponseRequest",
            model=MODELS,
            max_output_tokens=LENGTH,
            input=TEXT | st.lists(item, max_size=3),
            stream=st.booleans() | st.none(),
            previous_response_id=often(st.none(), st.sampled_from([*fuzz.ids["response"], "resp_nope"])),
            background=often(st.none() | st.just(False), st.just(True)),
        )
    )
    fuzz.send("POST", "/v1/responses", json=body)


@FUZZ
@given(data=st.data())
def test_fuzz_files_upload(fuzz: Fuzz, data: st.DataObject) -> None:
    purpose = often(st.sampled_from(PURPOSES), TEXT)
    fields = data.draw(often(st.fixed_dictionaries({"purpose": purpose}), st.fixed_dictionaries({})))
    upload = data.draw(often(st.just("file"), st.sampled_from(["none", "json", "raw"])))
    payload = data.draw(st.binary(max_size=200))
    if upload == "file":
        name = data.draw(TEXT)
        fuzz.send("POST", "/v1/files", files={"file": (name or "x", io.BytesIO(payload))}, data=fields)
    elif upload == "none":
        fuzz.send("POST", "/v1/files", data=fields or {"purpose": "batch"}, files={"other": ("a", b"b")})
    elif upload == "json":
        fuzz.send("POST", "/v1/files", json=fields)
    else:
        fuzz.send(
            "POST",
            "/v1/files",
            content=payload,
            headers={
                "content-type": data.draw(
                    st.sampled_from(["multipart/form-data; boundary=xx", "multipart/form-data", "text/plain"])
                )
            },
        )


@FUZZ
@given(data=st.data())
def test_fuzz_fine_tuning_create(fuzz: Fuzz, data: st.DataObject) -> None:
    files = often(st.just(fuzz.ids["file"][0]), st.just("file-nope") | TEXT)
    epochs = often(st.integers(1, 3) | st.just("auto"), st.integers(-1, 0) | st.just(10**9) | TEXT | JSON)
    hyper = fuzz.body("HyperparametersIn", n_epochs=epochs)
    model = often(st.sampled_from([CHAT, EMBED]), st.sampled_from([None, "nope", ""]))
    body = data.draw(
        fuzz.body(
            "JobCreateRequest",
            model=model,
            training_file=files,
            validation_file=often(st.none(), files),
            hyperparameters=often(st.none(), hyper),
        )
    )
    fuzz.send("POST", "/v1/fine_tuning/jobs", json=body)


def _path_for(fuzz: Fuzz, template: str, draw: Any) -> str:
    kinds = {"file_id": "file", "job_id": "job", "response_id": "response"}
    path = template
    for name, kind in kinds.items():
        if "{" + name + "}" in path:
            value = draw(st.sampled_from(fuzz.ids[kind]) | TEXT.filter(bool))
            path = path.replace("{" + name + "}", quoted(value))
    if "{model_id}" in path:
        path = path.replace("{model_id}", quoted(draw(MODELS.filter(bool) | TEXT.filter(bool))))
    return path


@settings(FUZZ, max_examples=2 * EXAMPLES)
@given(data=st.data())
def test_fuzz_reads_deletes_and_wrong_methods(fuzz: Fuzz, data: st.DataObject) -> None:
    """Every documented GET/DELETE and the cancel POST with real and made-up ids and query values, plus
    arbitrary methods on documented paths."""
    operations = [
        (m, p) for p, item in fuzz.doc["paths"].items() for m in item if m in ("get", "delete") or p.endswith("/cancel")
    ]
    method, template = data.draw(st.sampled_from(operations))
    if data.draw(st.booleans()):
        method = data.draw(st.sampled_from(["get", "post", "put", "patch", "delete", "options"]))
    path = _path_for(fuzz, template, data.draw)
    query = {}
    for parameter in fuzz.doc["paths"][template].get(method, {}).get("parameters", []):
        if parameter["in"] == "query" and data.draw(st.booleans()):
            value = data.draw(st.one_of(st.integers().map(str), TEXT, st.sampled_from(fuzz.ids["file"] + ["asc"])))
            name = "metadata[k]" if parameter["name"] == "metadata" else parameter["name"]
            query[name] = value
    fuzz.send(method.upper(), path, params=query)


def test_fuzzing_left_every_chat_engine_pool_at_its_baseline(
    fuzz: Fuzz, registry: ModelRegistry, baseline: dict[str, int]
) -> None:
    # a client leaving mid-stream and one timing out on a JSON answer must free their sequences too
    engine = registry.get(CHAT).engine
    submitted = {CHAT: engine.stats().requests_submitted + 2}
    with fuzz.http.stream(
        "POST",
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Story?"}], "max_tokens": 200, "stream": True},
    ) as stream:
        next(stream.iter_lines())
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(fuzz.base + "/v1/completions", json={"prompt": "Once", "max_tokens": 30}, timeout=0.5)
    assert idle_leftover(registry, submitted) == baseline
    print("\n".join(f"{n:5d} {m} {p} {s}" for (m, p, s), n in sorted(fuzz.seen.items())))  # shown with -s
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"):
        assert fuzz.seen["POST", path, 200], f"no fuzzed request to {path} got past validation"


# -- explicit hostile inputs ----------------------------------------------------------------------
USER = [{"role": "user", "content": "Hi"}]
NESTED = b"[" * 10_000 + b"]" * 10_000


def chat(**fields: Any) -> bytes:
    return json.dumps({"messages": USER, "max_tokens": 2, **fields}).encode()


HOSTILE: list[tuple[str, str, str, bytes, dict[str, str], int]] = [
    # (case, method, path, body, headers, status)
    ("malformed JSON", "POST", "/v1/chat/completions", b'{"messages": [', {}, 400),
    ("not UTF-8 at all", "POST", "/v1/chat/completions", b"\xff\xfe\xfd", {}, 400),
    (
        "invalid UTF-8 in a string",
        "POST",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
        {},
        400,
    ),
    ("NaN literal", "POST", "/v1/chat/completions", b'{"messages": [], "temperature": NaN}', {}, 400),
    ("number beyond float", "POST", "/v1/chat/completions", chat()[:-1] + b', "temperature": 1e400}', {}, 400),
    ("max_tokens -1", "POST", "/v1/chat/completions", chat(max_tokens=-1), {}, 400),
    ("max_tokens 10**30", "POST", "/v1/chat/completions", chat(max_tokens=10**30), {}, 400),
    ("temperature 1e308", "POST", "/v1/chat/completions", chat(temperature=1e308), {}, 400),
    ("n 10**9", "POST", "/v1/chat/completions", chat(n=10**9), {}, 400),
    ("top_logprobs 10**9", "POST", "/v1/chat/completions", chat(logprobs=True, top_logprobs=10**9), {}, 400),
    ("logit_bias beyond vocab", "POST", "/v1/chat/completions", chat(logit_bias={str(10**20): 1}), {}, 400),
    ("10000 nested lists as messages", "POST", "/v1/chat/completions", b'{"messages": ' + NESTED + b"}", {}, 400),
    (
        "10000 nested lists in an unknown field",
        "POST",
        "/v1/chat/completions",
        chat()[:-1] + b', "extra": ' + NESTED + b"}",
        {},
        400,
    ),
    (
        "10000 nested lists in metadata",
        "POST",
        "/v1/responses",
        b'{"input": "Hi", "metadata": {"a": ' + NESTED + b"}}",
        {},
        400,
    ),
    ("no messages", "POST", "/v1/chat/completions", json.dumps({"messages": []}).encode(), {}, 400),
    (
        "5 MB message (under the body limit): context too long",
        "POST",
        "/v1/chat/completions",
        json.dumps({"messages": [{"role": "user", "content": "lorem ipsum " * 436_907}]}).encode(),
        {},
        400,
    ),
    (
        "9 MB message (over the body limit)",
        "POST",
        "/v1/chat/completions",
        json.dumps({"messages": [{"role": "user", "content": "z" * (9 << 20)}]}).encode(),
        {},
        413,
    ),
    ("unknown chat model", "POST", "/v1/chat/completions", chat(model="nope"), {}, 404),
    ("unknown completions model", "POST", "/v1/completions", b'{"prompt": "Hi", "model": "nope"}', {}, 404),
    ("unknown embeddings model", "POST", "/v1/embeddings", b'{"input": "Hi", "model": "nope"}', {}, 404),
    ("unknown responses model", "POST", "/v1/responses", b'{"input": "Hi", "model": "nope"}', {}, 404),
    (
        "unknown model to fine-tune",
        "POST",
        "/v1/fine_tuning/jobs",
        b'{"model": "nope", "training_file": "file-x"}',
        {},
        404,
    ),
    ("negative prompt token ids", "POST", "/v1/completions", b'{"prompt": [[-5]], "max_tokens": 2}', {}, 400),
    (
        "huge prompt token ids",
        "POST",
        "/v1/completions",
        b'{"prompt": [1' + b"0" * 30 + b'], "max_tokens": 2}',
        {},
        400,
    ),
    ("huge embedding token ids", "POST", "/v1/embeddings", b'{"input": [[1' + b"0" * 30 + b"]]}", {}, 400),
    (
        "huge fine-tuning seed",
        "POST",
        "/v1/fine_tuning/jobs",
        b'{"model": "smollm2-135m-instruct", "training_file": "FILE", "seed": 1' + b"0" * 30 + b"}",
        {},
        400,
    ),
    ("not JSON, labelled text/plain", "POST", "/v1/chat/completions", b"hello", {"content-type": "text/plain"}, 400),
    (
        "multipart to a JSON endpoint",
        "POST",
        "/v1/responses",
        b"--b\r\n\r\n--b--",
        {"content-type": "multipart/form-data; boundary=b"},
        415,
    ),
    ("JSON to the upload endpoint", "POST", "/v1/files", b'{"purpose": "batch"}', {}, 400),
    ("GET on chat", "GET", "/v1/chat/completions", b"", {}, 405),
    ("GET on completions", "GET", "/v1/completions", b"", {}, 405),
    ("GET on embeddings", "GET", "/v1/embeddings", b"", {}, 405),
    ("GET on cancel", "GET", "/v1/fine_tuning/jobs/ftjob-x/cancel", b"", {}, 405),
    ("PUT on models", "PUT", "/v1/models", b"", {}, 405),
    ("unknown path", "GET", "/v1/nope", b"", {}, 404),
    ("unknown path under a known one", "POST", "/v1/chat/completions/extra", chat(), {}, 404),
    ("root", "GET", "/", b"", {}, 404),
]


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain"])
def test_json_labelled_as_a_form_is_read_as_json(fuzz: Fuzz, content_type: str) -> None:
    """`curl -d '{...}'` without -H labels its JSON as a form: the body is still read as JSON."""
    response = fuzz.send("POST", "/v1/embeddings", content=b'{"input": "Hi"}', headers={"content-type": content_type})
    assert response.status_code == 200, response.text[:300]


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status"), [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE]
)
def test_hostile_input_is_an_openai_shaped_4xx(
    fuzz: Fuzz, method: str, path: str, body: bytes, headers: dict[str, str], status: int
) -> None:
    sent = {"content-type": "application/json", **headers} if body and method == "POST" else headers
    response = fuzz.send(
        method, path, content=body.replace(b'"FILE"', json.dumps(fuzz.ids["file"][0]).encode()), headers=sent
    )
    assert response.status_code == status, response.text[:300]
