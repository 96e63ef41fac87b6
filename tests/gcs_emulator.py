"""A Google Cloud Storage emulator on localhost, for tests of gs:// workdirs without a network.

gcp-storage-emulator serves GCS's JSON API from memory; gcsfs (etils.epath's gs:// backend) finds
it through STORAGE_EMULATOR_HOST and TensorStore (orbax's array writer) through
TENSORSTORE_GCS_HTTP_URL, so the real gs:// code paths of both run against it.

The emulator ignores GCS's generation preconditions (`ifGenerationMatch`, `ifGenerationNotMatch`)
and sends no `x-goog-generation` header with a download; TensorStore's OCDBT driver, which orbax
uses, relies on both to update a checkpoint's manifest safely. `_keep_generations` adds them as
GCS documents them (412 for a failed precondition, 304 for an unchanged object on a read).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
from http import HTTPStatus
from typing import Callable, Iterator

BUCKET = "jfacerec-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _generation(storage, bucket: str, name: str) -> int:
    """The object's generation, 0 when there is none (GCS's meaning of ifGenerationMatch=0)."""
    from gcp_storage_emulator.exceptions import NotFound

    try:
        return int(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return 0


def _object_name(request) -> str | None:
    if "object_id" in request.params:
        return request.params["object_id"]
    return request.query.get("name", [None])[0]


def _with_generation(handler: Callable, *, read: bool) -> Callable:
    @functools.wraps(handler)
    def handle(request, response, storage, *args, **kwargs):
        bucket, name = request.params.get("bucket_name"), _object_name(request)
        if bucket is not None and name is not None:
            current = _generation(storage, bucket, name)
            match = request.query.get("ifGenerationMatch")
            not_match = request.query.get("ifGenerationNotMatch")
            if match and int(match[0]) != current:
                response.status = HTTPStatus.PRECONDITION_FAILED
                return None
            if not_match and int(not_match[0]) == current:
                response.status = HTTPStatus.NOT_MODIFIED if read else \
                    HTTPStatus.PRECONDITION_FAILED
                return None
        result = handler(request, response, storage, *args, **kwargs)
        if read and bucket is not None and name is not None:
            if generation := _generation(storage, bucket, name):
                response["x-goog-generation"] = str(generation)
                response["x-goog-metageneration"] = "1"
        return result

    handle.keeps_generations = True
    return handle


def _keep_generations() -> None:
    """Routes the emulator's object reads, uploads and deletes through `_with_generation`."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    if getattr(objects.download, "keeps_generations", False):
        return
    wrapped = {objects.download: _with_generation(objects.download, read=True),
               objects.get: _with_generation(objects.get, read=True),
               objects.insert: _with_generation(objects.insert, read=False),
               objects.delete: _with_generation(objects.delete, read=False)}
    objects.download = wrapped[objects.download]  # objects.get calls it for alt=media
    server.HANDLERS = tuple((regex, {method: wrapped.get(h, h) for method, h in handlers.items()})
                            for regex, handlers in server.HANDLERS)


def environment(url: str) -> dict[str, str]:
    """What a process needs in its environment to use the emulator at `url` for gs://."""
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            # gcsfs would ask the storage-control API (absent here) for the bucket type.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            # array_record's own Google Cloud C++ client ignores STORAGE_EMULATOR_HOST.
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": url}


@contextlib.contextmanager
def running(bucket: str = BUCKET) -> Iterator[str]:
    """Serves an empty in-memory store with one bucket; yields its URL."""
    from gcp_storage_emulator.server import create_server

    _keep_generations()
    # Clients that stop reading early (TensorStore's range reads) make the server log a
    # BrokenPipeError per request: noise, not failure.
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    port = _free_port()
    server = create_server("localhost", port, in_memory=True, default_bucket=bucket)
    server.start()
    try:
        yield f"http://localhost:{port}"
    finally:
        server.stop()


@contextlib.contextmanager
def serving(bucket: str = BUCKET) -> Iterator[dict[str, str]]:
    """The emulator running, with this process's environment pointed at it (restored after);
    yields that environment, for subprocesses."""
    import gcsfs
    import pytest

    with running(bucket) as url, pytest.MonkeyPatch.context() as mp:
        env = environment(url)
        for key, value in env.items():
            mp.setenv(key, value)
        gcsfs.GCSFileSystem.clear_instance_cache()  # none made before the variables were set
        yield env
        gcsfs.GCSFileSystem.clear_instance_cache()
