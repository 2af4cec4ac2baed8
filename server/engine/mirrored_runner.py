"""Forward passes in lock step over the ranks of a world: `MirroredRunner` on rank 0, `RunnerFollower` on the rest.

Every rank holds its shard of the model (world.py) and a KV store of the same
number of blocks holding its shard of every block's heads. Rank 0 alone
schedules: its engine decides which sequences run, their block tables, what is
copied or written back, and samples every token. Before each of those runner
calls, `MirroredRunner` sends the other ranks that call (a `RunnerCall`: the
method, the sequences' block tables and positions, and exactly the tokens the
call reads) through the `StepChannel`; each follower makes the same call on its
own `ModelRunner` over stand-in sequences (`SequenceView`), and the collectives
inside the sharded forward meet. Block ids, hashing, conversation pins and
reuse are rank 0's decisions and hold for every rank, because every rank's
pool is written only by these calls.

Sampling is rank 0's; the other ranks compute the same logits (their sums are
the same all-reduced values) and discard them. A greedy step launched ahead
(`decode_ahead`) feeds each rank its own argmax of the step before, which is
the token rank 0 feeds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq
from typing import Any

import mlx.core as mx
import msgspec

from server.engine.paged_cache import KVStore
from server.engine.prefill_buckets import PrefillShape
from server.engine.runner import ModelRunner, PromptLogprob, greedy_tokens
from server.engine.sequence import Sequence
from server.engine.step_channel import RankLost, StepChannel

log = logging.getLogger(__name__)
BACKEND_ERRORS = ("[ring]", "[nccl]", "[jaccl]", "[mpi]")  # how MLX's backends start a lost-peer RuntimeError


class SequenceState(msgspec.Struct, array_like=True, frozen=True):
    """What a runner call reads of one sequence: its identity, block table, positions, and some tokens."""

    request_id: str
    index: int
    block_ids: list[int]
    num_computed_tokens: int
    num_tokens: int
    first: int  # the position of tokens[0]
    tokens: list[int]


class RunnerCall(msgspec.Struct, array_like=True, frozen=True):
    """One ModelRunner call for the followers to repeat (`method` names it; `stop` ends them)."""

    method: str
    sequences: list[SequenceState] = []
    counts: list[int] = []  # prefill chunk lengths, write-back counts, or warm shapes (rows, tokens, width)...
    copy: tuple[int, int, int] | None = None  # copy_prefix's (source block, target block, slots)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(RunnerCall)


def receive_call(channel: StepChannel) -> RunnerCall:
    """The next call rank 0 sends."""
    return _decoder.decode(channel.receive())


def open_followers(channel: StepChannel) -> None:
    """Tell the followers an engine is being built: they probe the model along with rank 0 (follower.py)."""
    channel.send(_encoder.encode(RunnerCall("open")))


def close_world(channel: StepChannel) -> None:
    """Tell followers waiting for an engine that none will come (they return from `follow`)."""
    channel.send(_encoder.encode(RunnerCall("exit")))


def _state(seq: Sequence, first: int, count: int) -> SequenceState:
    tokens = [seq.token_at(p) for p in range(first, first + count)]
    return SequenceState(
        seq.request_id, seq.index, list(seq.block_ids), seq.num_computed_tokens, seq.num_tokens, first, tokens
    )


def lost_rank(exc: BaseException) -> bool:
    """Whether an MLX error says a peer rank (or the link to it) is gone."""
    return isinstance(exc, RankLost) or (isinstance(exc, RuntimeError) and str(exc).startswith(BACKEND_ERRORS))


class MirroredRunner(ModelRunner):
    """Rank 0's runner: tells the followers each call, then makes it."""

    def __init__(self, model: Any, store: KVStore, channel: StepChannel, prefill_buckets: bool = False) -> None:
        """After `open_followers` and the probe: sends the followers this store's size, to build theirs alike."""
        super().__init__(model, store, prefill_buckets)
        self.channel = channel
        self._tell(RunnerCall("store", counts=[store.num_blocks, store.block_size, int(prefill_buckets)]))

    def _tell(self, call: RunnerCall) -> None:
        self.channel.send(_encoder.encode(call))

    def copy_prefix(self, src_block: int, dst_block: int, num_slots: int) -> None:
        self._tell(RunnerCall("copy_prefix", copy=(src_block, dst_block, num_slots)))
        super().copy_prefix(src_block, dst_block, num_slots)

    def write_back(self, seqs: Seq[Sequence], counts: Seq[int]) -> None:
        if not seqs:
            return
        self._tell(RunnerCall("write_back", [_state(s, 0, 0) for s in seqs], list(counts)))
        super().write_back(seqs, counts)

    def prefill(self, seq: Sequence, num_tokens: int) -> list[PromptLogprob]:
        self._tell(RunnerCall("prefill", [_state(seq, seq.num_computed_tokens, num_tokens)], [num_tokens]))
        return super().prefill(seq, num_tokens)

    def prefill_rows(self, chunks: Seq[tuple[Sequence, int]]) -> None:
        if not chunks:
            return
        states = [_state(seq, seq.num_computed_tokens, n) for seq, n in chunks]
        self._tell(RunnerCall("prefill_rows", states, [n for _, n in chunks]))
        super().prefill_rows(chunks)

    def warm_prefill(self, shapes: Seq[PrefillShape]) -> None:
        self._tell(RunnerCall("warm_prefill", counts=[n for s in shapes for n in (s.rows, s.tokens, s.width)]))
        super().warm_prefill(shapes)

    def decode(self, seqs: Seq[Sequence]) -> mx.array:
        self._tell(RunnerCall("decode", [_state(s, s.num_computed_tokens, 1) for s in seqs]))
        return super().decode(seqs)

    def decode_ahead(self, seqs: Seq[Sequence], tokens: mx.array) -> mx.array:
        self._tell(RunnerCall("decode_ahead", [_state(s, 0, 0) for s in seqs]))
        return super().decode_ahead(seqs, tokens)

    def stop_followers(self) -> None:
        """End the followers' loops (the engine is shutting down)."""
        self._tell(RunnerCall("stop"))
        mx.synchronize()


class _Params:
    prompt_logprobs = None  # followers never compute prompt logprobs: rank 0 reads them


class _Tokens:
    """A sequence's tokens as far as one call reads them: `tokens[first:first + len]`."""

    def __init__(self, first: int, tokens: list[int]) -> None:
        self.first = first
        self.tokens = tokens

    def __getitem__(self, window: slice) -> list[int]:
        return self.tokens[window.start - self.first : window.stop - self.first]


class SequenceView:
    """A follower's stand-in for one of rank 0's sequences, for the length of one call."""

    params = _Params()

    def __init__(self, state: SequenceState) -> None:
        self.request_id = state.request_id
        self.index = state.index
        self.block_ids = state.block_ids
        self.num_computed_tokens = state.num_computed_tokens
        self.num_tokens = state.num_tokens
        self.token_ids = _Tokens(state.first, state.tokens)

    def token_at(self, position: int) -> int:
        return self.token_ids.tokens[position - self.token_ids.first]


class RunnerFollower:
    """A follower rank's loop: receive each call rank 0 makes, make it on this rank's shard, until told to stop."""

    def __init__(self, runner: ModelRunner, channel: StepChannel) -> None:
        self.runner = runner
        self.channel = channel
        self.calls = 0
        self._logits: mx.array | None = None  # the last decode's logits (their argmax feeds a step ahead)
        self._ahead: mx.array | None = None  # the last step-ahead's tokens

    def run(self) -> None:
        """Follow until rank 0 says stop; RankLost when rank 0 (or the link) is gone."""
        while True:
            call = receive_call(self.channel)
            if call.method == "stop":
                log.info("rank 0 stopped the engine after %d calls", self.calls)
                return
            try:
                self._make(call)
            except RuntimeError as exc:
                if lost_rank(exc):
                    raise RankLost(str(exc)) from exc
                raise
            self.calls += 1

    def _make(self, call: RunnerCall) -> None:
        views: list[Any] = [SequenceView(s) for s in call.sequences]
        runner = self.runner
        if call.method == "copy_prefix" and call.copy is not None:
            runner.copy_prefix(*call.copy)
        elif call.method == "write_back":
            runner.write_back(views, call.counts)
        elif call.method == "prefill":
            runner.prefill(views[0], call.counts[0])
        elif call.method == "prefill_rows":
            runner.prefill_rows(list(zip(views, call.counts)))
        elif call.method == "warm_prefill":
            runner.warm_prefill([PrefillShape(*call.counts[i : i + 3]) for i in range(0, len(call.counts), 3)])
        elif call.method == "decode":
            self._logits, self._ahead = runner.decode(views), None
        elif call.method == "decode_ahead":
            if self._ahead is not None:
                tokens = self._ahead
            elif self._logits is not None:
                tokens = greedy_tokens(self._logits)
            else:
                raise RuntimeError("rank 0 ran a step ahead with no step before it")
            self._ahead, self._logits = runner.decode_ahead(views, tokens), None
            mx.eval(self._ahead)
        else:
            raise RuntimeError(f"unknown runner call {call.method!r} from rank 0")
