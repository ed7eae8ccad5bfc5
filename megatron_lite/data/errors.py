"""The exception type for bad data found on disk, whose message stays one line even when a
DataLoader worker raised it, so that any caller can report it as `error: {e}`."""
from __future__ import annotations

_WORKER_PREFIX = "Caught "
_TRACEBACK_MARK = "\nOriginal Traceback"


class DataError(ValueError):
    """Bad data on disk (dataset files, index caches, token ids); `str()` is one line naming the
    file, and the sample or line where there is one.

    A DataLoader worker's exception reaches the main process as `type(e)(text)`, where `text` is
    "Caught X in DataLoader worker process N.\\nOriginal Traceback ..." ending in the line
    `module.X: <message>` (torch `ExceptionWrapper.reraise`). The constructor keeps only that
    original message: the worker's traceback says nothing about the data, and the one-line
    message already names the file and sample.
    """

    def __init__(self, message: str = ""):
        super().__init__(_original_message(type(self), str(message)))


def _original_message(cls: type, message: str) -> str:
    if not (message.startswith(_WORKER_PREFIX) and _TRACEBACK_MARK in message):
        return message
    last = message.rstrip().splitlines()[-1]
    head, sep, tail = last.partition(": ")
    # The traceback's last line names the class with its module (`pkg.mod.Class: msg`).
    if sep and head.split(".")[-1] == cls.__qualname__.split(".")[-1]:
        return tail
    return last
