"""Two replicas of the server behind HAProxy, sharing one PostgreSQL database and one data directory, behave as
one service: started together they migrate each schema exactly once; the OpenAI SDK (and the conformance kit)
works through the proxy; a file uploaded on one replica is listed, read and deleted on the other; a conversation
(X-Conversation-Id, which the proxy hashes on) sticks to one replica and reuses its KV cache turn after turn; a
fine-tuning job trains exactly once and its model answers on both replicas; and when the replica training a job
is SIGKILLed, its training worker ends too and the surviving replica requeues and finishes the job.

Real processes throughout: `python -m server serve` twice (the real SmolLM2-135M-Instruct and all-MiniLM-L6-v2),
the distribution's `postgres` and `haproxy` (tests/services.py). The failover test kills a replica, so it runs
last.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from server.models.cache import ModelCache
from server.models.defaults import MINILM
from tests.services import HAProxy, PostgresServer, find_haproxy, free_port, require_service
from tests.serving import alive, run_conformance_kit

ROOT = Path(__file__).resolve().parents[2]
CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
LEASE_S = 4
SCHEMAS = ("files", "fine_tuning", "responses")
TRAINING = [
    {"messages": [{"role": "user", "content": f"Say {word}."}, {"role": "assistant", "content": word}]}
    for word in ("red", "green", "blue", "cyan", "pink", "gold", "gray", "teal", "lime", "navy")
]


@dataclass
class Replica:
    """One `python -m server serve` process of the pair; `name` is its HAProxy server name."""

    name: str
    port: int
    log: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self) -> str:
        return self.text()[-4000:]

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"{self.name} exited early:\n{self.tail()}"
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{self.name} never became ready:\n{self.tail()}"
            time.sleep(0.25)

    def children(self) -> list[int]:
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.process.pid)], capture_output=True, text=True, check=False
        )
        return [int(pid) for pid in out.stdout.split()]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Cluster:
    replicas: list[Replica]
    proxy: HAProxy
    database_url: str

    def by_name(self, name: str) -> Replica:
        return next(r for r in self.replicas if r.name == name)


def start_replica(name: str, model_args: list[str], data_dir: Path, log_dir: Path, env: dict[str, str]) -> Replica:
    port = free_port()
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--port", str(port), "--offline", "--no-default-models"]
            + model_args
            + ["--data-dir", str(data_dir), "--fine-tuning-lease-seconds", str(LEASE_S)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return Replica(name, port, log, process)


def haproxy_config(port: int, replicas: list[Replica]) -> str:
    servers = "\n".join(f"    server {r.name} 127.0.0.1:{r.port} check inter 1s fall 2 rise 1" for r in replicas)
    return f"""global
    maxconn 256

defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-request 30s

frontend api
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    balance hdr(X-Conversation-Id)
    hash-type consistent
    option httpchk GET /ready
    http-response set-header X-Replica %s
{servers}
"""


@pytest.fixture(scope="module")
def cluster(
    postgres_server: PostgresServer,
    smollm2_dir: Path,
    model_cache: ModelCache,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    if find_haproxy() is None:
        require_service("haproxy")
    minilm_dir = model_cache.ready(MINILM.id)
    model_args = ["--model", f"{CHAT}={smollm2_dir}"]
    if minilm_dir is not None:
        model_args += ["--model", f"{EMBED}={minilm_dir}"]
    name = f"r_{uuid.uuid4().hex[:12]}"
    database_url = postgres_server.create_database(name)
    root = tmp_path_factory.mktemp("replicas")
    data_dir, log_dir = root / "data", root / "logs"
    data_dir.mkdir()
    log_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_DROPIN_")}
    env.update(MLX_DROPIN_DATABASE_URL=database_url, PYTHONUNBUFFERED="1")
    replicas: list[Replica] = []
    proxy: HAProxy | None = None
    try:
        for replica_name in ("replica_a", "replica_b"):  # both start at once: their migrations race
            replicas.append(start_replica(replica_name, model_args, data_dir, log_dir, env))
        for replica in replicas:
            replica.wait_ready(300)
        proxy = HAProxy.start(haproxy_config(free_port(), replicas), root / "haproxy")
        yield Cluster(replicas, proxy, database_url)
    finally:
        if proxy is not None:
            proxy.stop()
        for replica in replicas:
            replica.stop()
        postgres_server.drop_database(name)


def sdk(url: str, conversation: str | None = None) -> openai.OpenAI:
    headers = {"X-Conversation-Id": conversation} if conversation else None
    return openai.OpenAI(
        base_url=url + "/v1", api_key="sk-replicas", max_retries=0, timeout=300, default_headers=headers
    )


def jsonl(lines: list[dict]) -> io.BytesIO:
    return io.BytesIO("".join(json.dumps(line) + "\n" for line in lines).encode())


def wait_job(client: openai.OpenAI, job_id: str, statuses: tuple[str, ...], timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job.status} after {timeout:.0f} s"
        time.sleep(0.5)


def event_messages(client: openai.OpenAI, job_id: str) -> list[str]:
    return [e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=1000).data]


def job_row(database_url: str, job_id: str) -> dict:
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        row = conn.execute("SELECT * FROM ft_jobs WHERE id = %s", (job_id,)).fetchone()
    assert row is not None, job_id
    return row


# -- 1 ---------------------------------------------------------------------------------------------
def test_starting_together_migrates_each_schema_once(cluster: Cluster) -> None:
    """Every store migrates at startup, exactly once across the two replicas; both then answer a lookup of
    stored state at the same moment."""
    import concurrent.futures

    missing = f"resp_{uuid.uuid4().hex}"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        statuses = list(
            pool.map(lambda r: httpx.get(f"{r.url}/v1/responses/{missing}", timeout=30).status_code, cluster.replicas)
        )
    assert statuses == [404, 404]
    lines = [line for r in cluster.replicas for line in r.text().splitlines() if "database: migrated" in line]
    for schema in SCHEMAS:
        mine = [line for line in lines if re.search(rf"database: migrated {schema} from version \d+ to \d+", line)]
        assert len(mine) == 1, f"{schema}: {mine or lines}"
    for replica in cluster.replicas:
        assert httpx.get(replica.url + "/ready", timeout=5).status_code == 200


# -- 2 ---------------------------------------------------------------------------------------------
def test_openai_sdk_through_the_proxy(cluster: Cluster) -> None:
    client = sdk(cluster.proxy.url, f"conv-{uuid.uuid4()}")
    ids = [m.id for m in client.models.list().data]
    assert CHAT in ids
    messages = [{"role": "user", "content": "Say hello."}]
    raw = client.chat.completions.with_raw_response.create(model=CHAT, messages=messages, max_tokens=6, temperature=0)
    assert raw.headers.get("x-replica") in ("replica_a", "replica_b")
    reply = raw.parse()
    assert reply.choices[0].message.content and reply.usage.completion_tokens <= 6
    chunks = list(
        client.chat.completions.create(
            model=CHAT,
            messages=messages,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage is not None
    if EMBED not in ids:
        return  # no embedding model in the cache: the embeddings part does not apply
    vectors = client.embeddings.create(model=EMBED, input=["a cat", "a dog"], encoding_format="float").data
    assert len(vectors) == 2 and len(vectors[0].embedding) == 384


def test_conformance_kit_through_the_proxy(cluster: Cluster) -> None:
    """The whole kit through the proxy (its reasoning and native-tool checks skip themselves: this setup serves no
    thinking or tool-format model). It sends no X-Conversation-Id, so its requests spread over both replicas."""
    env = dict(os.environ)
    if EMBED in [m.id for m in sdk(cluster.proxy.url).models.list().data]:
        env["COMPAT_EMBEDDING_MODEL"] = EMBED
    run_conformance_kit(cluster.proxy.url + "/v1", CHAT, "-x", env=env)


# -- 3 ---------------------------------------------------------------------------------------------
def test_file_uploaded_on_one_replica_is_served_by_the_other(cluster: Cluster) -> None:
    a, b = (sdk(r.url) for r in cluster.replicas)
    content = b'{"hello": "replicas"}\n'
    uploaded = a.files.create(file=("shared.jsonl", io.BytesIO(content)), purpose="batch")
    assert uploaded.id in [f.id for f in b.files.list().data]
    assert b.files.retrieve(uploaded.id).bytes == len(content)
    assert b.files.content(uploaded.id).content == content
    assert b.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        a.files.retrieve(uploaded.id)


# -- 4 ---------------------------------------------------------------------------------------------
def test_a_conversation_sticks_to_one_replica_and_reuses_its_cache(cluster: Cluster) -> None:
    client = sdk(cluster.proxy.url, f"conv-{uuid.uuid4()}")
    messages = [{"role": "system", "content": "You are a terse assistant. " * 4}]
    replicas, cached = [], []
    for turn in range(5):
        messages.append({"role": "user", "content": f"Turn {turn}: name a colour."})
        raw = client.chat.completions.with_raw_response.create(
            model=CHAT, messages=messages, max_tokens=6, temperature=0
        )
        reply = raw.parse()
        replicas.append(raw.headers.get("x-replica"))
        details = reply.usage.prompt_tokens_details
        cached.append(details.cached_tokens if details and details.cached_tokens else 0)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
    assert len(set(replicas)) == 1 and replicas[0] in ("replica_a", "replica_b"), replicas
    assert all(later > earlier for earlier, later in zip(cached[1:], cached[2:])), cached
    assert cached[1] > 0, cached


# -- 4b --------------------------------------------------------------------------------------------
def test_a_stored_response_continues_on_either_replica(cluster: Cluster) -> None:
    """The replica holding a chain's KV reuses it; the other recomputes it: the same answer, fewer cached tokens."""
    a, b = cluster.replicas
    instructions = f"Answer briefly. {uuid.uuid4().hex}"
    first = openai.OpenAI(base_url=a.url + "/v1", api_key="unused", max_retries=0).responses.create(
        model=CHAT, input="Name three fruits.", instructions=instructions, max_output_tokens=8, temperature=0
    )
    follow = {"input": "And three vegetables?", "previous_response_id": first.id, "instructions": instructions}

    def continued(replica: Replica) -> tuple[str, int]:
        r = openai.OpenAI(base_url=replica.url + "/v1", api_key="unused", max_retries=0).responses.create(
            model=CHAT, max_output_tokens=8, temperature=0, store=False, **follow
        )
        assert r.usage is not None
        return r.output_text, r.usage.input_tokens_details.cached_tokens

    elsewhere_text, elsewhere_cached = continued(b)
    here_text, here_cached = continued(a)
    assert elsewhere_text == here_text
    assert here_cached > elsewhere_cached


# -- 5 ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def training_file(cluster: Cluster) -> str:
    return sdk(cluster.proxy.url).files.create(file=("colours.jsonl", jsonl(TRAINING)), purpose="fine-tune").id


def test_a_job_trains_once_and_its_model_answers_on_both_replicas(cluster: Cluster, training_file: str) -> None:
    client = sdk(cluster.proxy.url)
    job = client.fine_tuning.jobs.create(
        model=CHAT, training_file=training_file, suffix="once", seed=7, hyperparameters={"n_epochs": 1}
    )
    job = wait_job(client, job.id, ("succeeded", "failed", "cancelled"), timeout=300)
    assert job.status == "succeeded", job.error
    messages = event_messages(client, job.id)
    assert messages.count("Fine-tuning job started") == 1, messages
    started = [r.name for r in cluster.replicas if f"fine-tuning job {job.id} started" in r.text()]
    assert len(started) == 1, started
    for replica in cluster.replicas:
        direct = sdk(replica.url)
        deadline = time.monotonic() + 10  # the other replica learns of the model within ~2 s
        while job.fine_tuned_model not in [m.id for m in direct.models.list().data]:
            assert time.monotonic() < deadline, f"{job.fine_tuned_model} never listed on {replica.name}"
            time.sleep(0.25)
        reply = direct.chat.completions.create(
            model=job.fine_tuned_model, messages=[{"role": "user", "content": "Say red."}], max_tokens=4, temperature=0
        )
        assert reply.model == job.fine_tuned_model and reply.choices[0].message.content is not None


# -- 6 (last: it kills a replica) ------------------------------------------------------------------
def test_the_survivor_retrains_a_job_whose_replica_was_killed(cluster: Cluster, training_file: str) -> None:
    client = sdk(cluster.proxy.url)
    job = client.fine_tuning.jobs.create(
        model=CHAT, training_file=training_file, suffix="failover", seed=7, hyperparameters={"n_epochs": 3}
    )
    job = wait_job(client, job.id, ("running", "succeeded", "failed", "cancelled"), timeout=120)
    assert job.status == "running", job.error
    deadline = time.monotonic() + 60
    while not (trainers := [r for r in cluster.replicas if f"fine-tuning job {job.id} started" in r.text()]):
        assert time.monotonic() < deadline, "no replica logged the job's start"
        time.sleep(0.2)
    assert len(trainers) == 1
    victim = trainers[0]
    survivor = next(r for r in cluster.replicas if r is not victim)
    worker_pid = job_row(cluster.database_url, job.id)["worker_pid"]
    assert worker_pid and worker_pid in victim.children(), (worker_pid, victim.children())
    orphans = victim.children()  # the engine processes and the training worker

    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(10)
    deadline = time.monotonic() + 30
    while still := [pid for pid in orphans if alive(pid)]:
        assert time.monotonic() < deadline, f"children of the killed replica still running: {still}"
        time.sleep(0.2)

    survivor_client = sdk(survivor.url)
    done = wait_job(survivor_client, job.id, ("succeeded", "failed", "cancelled"), timeout=420)
    assert done.status == "succeeded", done.error
    messages = event_messages(survivor_client, job.id)
    assert any("queued again" in m for m in messages), messages
    assert f"fine-tuning job {job.id} started" in survivor.text()
    reply = survivor_client.chat.completions.create(
        model=done.fine_tuned_model, messages=[{"role": "user", "content": "Say red."}], max_tokens=4, temperature=0
    )
    assert reply.choices[0].message.content is not None
