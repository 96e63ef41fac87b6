"""A Google Cloud Storage emulator on localhost, for tests of gs:// workdirs without a network.

gcp-storage-emulator serves GCS's JSON API from memory; gcsfs (etils.epath's gs:// backend) finds
it through STORAGE_EMULATOR_HOST and TensorStore (orbax's array writer) through
TENSORSTORE_GCS_HTTP_URL, so the real gs:// code paths of both run against it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from typing import Iterator

BUCKET = "jfacerec-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


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
