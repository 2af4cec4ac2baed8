"""One decode step's samples for the running batch, with all-greedy batches launched a step ahead.

A greedy batch needs nothing from the host between steps: its next tokens are an argmax on the
device. So after computing step N, the engine launches step N+1 from those device-side tokens
(ModelRunner.decode_ahead) before handing step N's tokens to the host, and the host's work
(accepting tokens, stop checks, events) overlaps the device's. The step launched ahead is used
only when the next step decodes exactly the same sequences; otherwise it is dropped (its KV writes
repeat what the next step writes, with the same tokens).
"""

from __future__ import annotations

from typing import Any

from server.engine.kv_manager import KVCacheManager
from server.engine.runner import ModelRunner, greedy_tokens
from server.engine.sampling import TokenSample, sample_batch
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence


class DecodeStepper:
    """Samples each decode step, running all-greedy batches one step ahead when `run_ahead` is on."""

    def __init__(
        self, runner: ModelRunner, scheduler: Scheduler, kv: KVCacheManager, context_length: int, run_ahead: bool
    ) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.kv = kv
        self.context_length = context_length
        self.run_ahead = run_ahead
        self.steps_ahead = 0  # decode steps whose forward was launched a step early (overlapped)
        self._ahead: tuple[list[Sequence], Any] | None = None  # (sequences, their next greedy tokens on device)

    def drop(self) -> None:
        """Forget the step launched ahead (after a failed step)."""
        self._ahead = None

    def step(self, decodes: list[Sequence]) -> list[TokenSample]:
        """The samples of one decode step over `decodes`, in their order."""
        ahead, self._ahead = self._ahead, None
        if not all(_greedy_on_device(s) for s in decodes):
            return sample_batch(self.runner.decode(decodes), [s.sampler for s in decodes])
        if ahead is not None and ahead[0] == decodes:
            tokens = ahead[1]
            self.steps_ahead += 1
        else:
            tokens = greedy_tokens(self.runner.decode(decodes))
        if self._worth_running_ahead(decodes):
            self._ahead = (list(decodes), self.runner.decode_ahead(decodes, tokens))
        return [TokenSample(token, None, None) for token in tokens.tolist()]

    def _worth_running_ahead(self, decodes: list[Sequence]) -> bool:
        """No sequence is certain to finish this step, no other sequence is about to join the batch (which
        would change the next step's members), and every sequence gets a slot for the next position.

        That slot is reserved now, a step early: in a batch whose members started at different times some
        sequence crosses a block boundary at almost every step, and waiting for the scheduler to allocate
        its block would keep the batch from ever running ahead.
        """
        if not self.run_ahead or self.scheduler.waiting or any(s.num_pending_prefill for s in self.scheduler.running):
            return False
        if not all(
            len(s.output_token_ids) + 1 < s.max_tokens and s.num_tokens + 1 < self.context_length for s in decodes
        ):
            return False
        return all(self.kv.grow(seq, seq.num_tokens + 1) for seq in decodes)


def _greedy_on_device(seq: Sequence) -> bool:
    """Argmax alone picks the token: nothing needs the host between steps."""
    sampler = seq.sampler
    return sampler.argmax and not sampler.has_processors and sampler.constraint is None and not seq.params.logprobs
