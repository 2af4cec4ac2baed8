"""TokenTimer.watch over event batches: TTFT once, at the first batch with a token; per sequence, the gap since
its previous batch shared by the tokens of this one (a reader that takes several tokens at once records one gap
per token, each its share); every token counted once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

from server.engine.request import TokenEvent
from server.metrics import Metrics

MODEL = "m"


def _event(index: int, token: int | None = 1, finish: str | None = None) -> TokenEvent:
    return TokenEvent(request_id="r", index=index, token_id=token, text="x", finish_reason=finish)


def _sample(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name, {"model": MODEL})
    return value if value is not None else 0.0


def test_a_batch_of_tokens_shares_its_gap() -> None:
    metrics = Metrics()
    pause = 0.2

    async def batches() -> AsyncGenerator[list[TokenEvent], None]:
        yield [_event(0), _event(1)]  # both sequences' first tokens
        await asyncio.sleep(pause)
        # a reader that fell behind: four of sequence 0; sequence 1's finish carries no token (no gap, no count)
        yield [_event(0), _event(0), _event(0), _event(0), _event(1, token=None, finish="stop")]

    async def main() -> int:
        timer = metrics.generation(MODEL, started=time.perf_counter())
        return sum([len(b) async for b in timer.watch(batches())])

    assert asyncio.run(main()) == 7
    assert _sample(metrics, "mlx_dropin_time_to_first_token_seconds_count") == 1
    assert _sample(metrics, "mlx_dropin_generated_tokens_total") == 6
    assert _sample(metrics, "mlx_dropin_inter_token_latency_seconds_count") == 4
    total = _sample(metrics, "mlx_dropin_inter_token_latency_seconds_sum")
    assert pause * 0.9 <= total <= pause * 2  # four shares of one 0.2 s gap, not four gaps of 0.2 s


def test_closing_the_watch_closes_the_engine_stream() -> None:
    closed = []

    async def batches() -> AsyncGenerator[list[TokenEvent], None]:
        try:
            while True:
                yield [_event(0)]
                await asyncio.sleep(0)
        finally:
            closed.append(True)  # the engine's stream aborts its request here

    async def main() -> None:
        watched = Metrics().generation(MODEL).watch(batches())
        await anext(watched)
        await watched.aclose()  # type: ignore[attr-defined]
        assert closed == [True]  # at once, not when the loop finalizes leftover generators

    asyncio.run(main())
