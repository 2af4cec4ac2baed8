"""`/v1/files`: upload (multipart), list (paged), retrieve, content, delete; each scoped to the caller's tenant.

An upload over the tenant's storage quota (--max-storage-gb-per-tenant) is a 400 `storage_quota_exceeded`."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from server.errors import InvalidRequestError, NotFoundError, PayloadTooLargeError
from server.persistence.files import PURPOSES, FileStore, FileTooLargeError, StorageQuotaError, StoredFile
from server.serving.scope import RequestScope
from server.wire.codec import json_response
from server.wire.files import FileDeleted, FileList, FileObject

MAX_LIST_LIMIT = 10_000


def file_object(stored: StoredFile) -> FileObject:
    return FileObject(
        id=stored.id, bytes=stored.bytes, created_at=stored.created_at, filename=stored.filename, purpose=stored.purpose
    )


def _store(request: Request) -> FileStore:
    return request.app.state.files


def _found(request: Request) -> StoredFile:
    file_id = request.path_params["file_id"]
    stored = _store(request).get(RequestScope.of(request).tenant, file_id)
    if stored is None:
        raise NotFoundError(f"No such File object: {file_id}", param="file_id")
    return stored


async def upload(request: Request) -> Response:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequestError("Upload files as multipart/form-data with the fields 'file' and 'purpose'.")
    settings = request.app.state.settings
    async with request.form(max_files=1, max_fields=16) as form:  # malformed bodies: Starlette's 400
        purpose = form.get("purpose")
        upload_file = form.get("file")
        if not isinstance(purpose, str) or not purpose:
            raise InvalidRequestError("Missing required parameter: 'purpose'.", param="purpose")
        if purpose not in PURPOSES:
            raise InvalidRequestError(
                f"'{purpose}' is not a supported purpose; use one of {', '.join(PURPOSES)}.", param="purpose"
            )
        if not isinstance(upload_file, UploadFile):
            raise InvalidRequestError("Missing required parameter: 'file'.", param="file")
        filename = (upload_file.filename or "upload").rsplit("/", 1)[-1][:255]
        try:
            stored = await run_in_threadpool(
                _store(request).add,
                RequestScope.of(request).tenant,
                filename,
                purpose,
                upload_file.file,
                settings.max_file_bytes,
                settings.max_storage_bytes_per_tenant,
            )
        except FileTooLargeError as exc:
            raise PayloadTooLargeError(str(exc), param="file") from exc
        except StorageQuotaError as exc:
            raise InvalidRequestError(str(exc), param="file", code="storage_quota_exceeded") from exc
    return json_response(file_object(stored))


async def list_files(request: Request) -> Response:
    q = request.query_params
    try:
        limit = int(q.get("limit", MAX_LIST_LIMIT))
    except ValueError:
        raise InvalidRequestError("'limit' must be an integer.", param="limit") from None
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise InvalidRequestError(f"'limit' must be between 1 and {MAX_LIST_LIMIT}.", param="limit")
    order = q.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequestError("'order' must be 'asc' or 'desc'.", param="order")
    files, more = _store(request).page(
        RequestScope.of(request).tenant,
        after=q.get("after"),
        limit=limit,
        descending=order == "desc",
        purpose=q.get("purpose"),
    )
    data = [file_object(f) for f in files]
    return json_response(
        FileList(data=data, has_more=more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None)
    )


async def get_file(request: Request) -> Response:
    return json_response(file_object(_found(request)))


async def get_content(request: Request) -> Response:
    stored = _found(request)
    return FileResponse(
        _store(request).path(stored.id), media_type="application/octet-stream", filename=stored.filename
    )


async def delete_file(request: Request) -> Response:
    stored = _found(request)
    _store(request).delete(stored.tenant, stored.id)
    return json_response(FileDeleted(id=stored.id, deleted=True))


routes = [
    Route("/v1/files", upload, methods=["POST"]),
    Route("/v1/files", list_files, methods=["GET"]),
    Route("/v1/files/{file_id}", get_file, methods=["GET"]),
    Route("/v1/files/{file_id}", delete_file, methods=["DELETE"]),
    Route("/v1/files/{file_id}/content", get_content, methods=["GET"]),
]
