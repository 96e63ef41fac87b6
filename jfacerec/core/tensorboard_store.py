"""TensorBoard event files on object storage, written through `core.storage`.

tensorboardX opens its event files through a writer registered per URI scheme. Its own gs://
writer builds a google-cloud-storage client of its own; this one goes through etils.epath like
every other workdir file, so one set of credentials (and one emulator in tests) serves all. An
object cannot be appended to, so each flush uploads the whole file, as tensorboardX's writers do.
"""

from __future__ import annotations

import io

from jfacerec.core import storage


class _ObjectWriter:
    """The file object tensorboardX's RecordWriter writes to: bytes kept in memory, uploaded whole
    on each flush."""

    def __init__(self, path: str):
        self.path = path
        self.buffer = io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        storage.epath_of(self.path).write_bytes(self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _ObjectWriterFactory:
    def open(self, path: str) -> _ObjectWriter:
        return _ObjectWriter(path)

    def directory_check(self, path: str) -> None:
        storage.makedirs(path)


def register() -> None:
    """Makes tensorboardX write gs:// (and the other stores') event files through storage."""
    from tensorboardX import record_writer
    for scheme in storage.REMOTE_SCHEMES:
        record_writer.register_writer_factory(scheme.split(":")[0], _ObjectWriterFactory())
