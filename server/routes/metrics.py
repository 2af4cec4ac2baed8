"""`GET /metrics`: the app's Prometheus metrics in the text exposition format.

Open like /health unless the server has a metrics key (--metrics-key), which
AuthMiddleware then requires; API keys never open it. Nothing in it names a
tenant: fine-tuned models share one `model="fine-tuned"` label (server.metrics).
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.metrics import CONTENT_TYPE, Metrics


async def metrics(request: Request) -> Response:
    observed: Metrics = request.app.state.metrics
    body = await run_in_threadpool(observed.render)  # reads the fine-tuning jobs from SQLite
    return Response(body, headers={"content-type": CONTENT_TYPE})


routes = [Route("/metrics", metrics, methods=["GET"])]
