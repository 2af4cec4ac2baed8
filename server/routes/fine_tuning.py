"""`/v1/fine_tuning/jobs` (create, list, retrieve, cancel, events, checkpoints) and `DELETE /v1/models/{ft-id}`."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.errors import InvalidRequestError
from server.finetune.jobs import Job
from server.finetune.service import FineTuning
from server.serving.scope import RequestScope
from server.wire.codec import json_response, read_json
from server.wire.fine_tuning import (
    CheckpointList,
    EventList,
    FineTuningJob,
    Hyperparameters,
    JobCheckpoint,
    JobCreateRequest,
    JobError,
    JobEvent,
    JobList,
    MethodOut,
    SupervisedOut,
)
from server.wire.models import ModelDeleted


def job_object(job: Job) -> FineTuningJob:
    hp = Hyperparameters(
        n_epochs=job.hyperparameters.get("n_epochs", "auto"),
        batch_size=job.hyperparameters.get("batch_size", "auto"),
        learning_rate_multiplier=job.hyperparameters.get("learning_rate_multiplier", "auto"),
    )
    return FineTuningJob(
        id=job.id,
        created_at=job.created_at,
        error=JobError(**job.error) if job.error else None,
        fine_tuned_model=job.fine_tuned_model,
        finished_at=job.finished_at,
        hyperparameters=hp,
        model=job.model,
        organization_id=job.tenant,
        result_files=job.result_files,
        seed=job.seed,
        status=job.status,
        trained_tokens=job.trained_tokens,
        training_file=job.training_file,
        validation_file=job.validation_file,
        method=MethodOut(supervised=SupervisedOut(hyperparameters=hp)),
        metadata=job.metadata,
        estimated_finish=job.estimated_finish,
        user_provided_suffix=job.suffix,
    )


def _service(request: Request) -> FineTuning:
    return request.app.state.fine_tuning


def _tenant(request: Request) -> str:
    return RequestScope.of(request).tenant


def _limit(request: Request, default: int, most: int = 100) -> int:
    raw = request.query_params.get("limit", str(default))
    try:
        limit = int(raw)
    except ValueError:
        raise InvalidRequestError("'limit' must be an integer.", param="limit") from None
    if not 1 <= limit <= most:
        raise InvalidRequestError(f"'limit' must be between 1 and {most}.", param="limit")
    return limit


async def create_job(request: Request) -> Response:
    body = await read_json(request, JobCreateRequest)
    job = await run_in_threadpool(_service(request).create, body, _tenant(request))
    return json_response(job_object(job))


async def list_jobs(request: Request) -> Response:
    metadata = {
        key[len("metadata[") : -1]: value
        for key, value in request.query_params.items()
        if key.startswith("metadata[") and key.endswith("]")
    }
    jobs, more = _service(request).store.page(
        _tenant(request), request.query_params.get("after"), _limit(request, 20), metadata or None
    )
    return json_response(JobList(data=[job_object(j) for j in jobs], has_more=more))


async def get_job(request: Request) -> Response:
    return json_response(job_object(_service(request).get(request.path_params["job_id"], _tenant(request))))


async def cancel_job(request: Request) -> Response:
    job = await run_in_threadpool(_service(request).cancel, request.path_params["job_id"], _tenant(request))
    return json_response(job_object(job))


async def list_events(request: Request) -> Response:
    service = _service(request)
    job = service.get(request.path_params["job_id"], _tenant(request))
    events, more = service.store.events(job.id, request.query_params.get("after"), _limit(request, 20, 1000))
    return json_response(
        EventList(
            data=[
                JobEvent(id=e.id, created_at=e.created_at, level=e.level, message=e.message, data=e.data, type=e.type)
                for e in events
            ],
            has_more=more,
        )
    )


async def list_checkpoints(request: Request) -> Response:
    service = _service(request)
    job = service.get(request.path_params["job_id"], _tenant(request))
    items, more = service.store.checkpoints(job.id, request.query_params.get("after"), _limit(request, 10))
    data = [
        JobCheckpoint(
            id=c.id,
            created_at=c.created_at,
            fine_tuned_model_checkpoint=c.model_name,
            fine_tuning_job_id=c.job_id,
            metrics=c.metrics,
            step_number=c.step_number,
        )
        for c in items
    ]
    return json_response(
        CheckpointList(
            data=data, has_more=more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
        )
    )


async def delete_model(request: Request) -> Response:
    model_id = request.path_params["model_id"]
    await run_in_threadpool(_service(request).delete_model, model_id, _tenant(request))
    return json_response(ModelDeleted(id=model_id, deleted=True))


routes = [
    Route("/v1/fine_tuning/jobs", create_job, methods=["POST"]),
    Route("/v1/fine_tuning/jobs", list_jobs, methods=["GET"]),
    Route("/v1/fine_tuning/jobs/{job_id}", get_job, methods=["GET"]),
    Route("/v1/fine_tuning/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
    Route("/v1/fine_tuning/jobs/{job_id}/events", list_events, methods=["GET"]),
    Route("/v1/fine_tuning/jobs/{job_id}/checkpoints", list_checkpoints, methods=["GET"]),
    Route("/v1/models/{model_id:path}", delete_model, methods=["DELETE"]),
]
