"""The prefetch thread: batches assembled ahead of the training step, in a thread.

Used when the input runs in the training process (``data.input_process: false``); the input
process (:mod:`esmm.data.process`) is the default.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator

import torch


class _Prefetcher:
    """Iterate ``source`` in a background thread, ``depth`` items ahead of the consumer.

    Exceptions of the source are re-raised in the consumer; leaving the ``with`` block early
    (an error in the training step, a rank that stops first) stops the thread and drains the
    queue so it never blocks forever on a full queue.
    """

    _DONE = object()

    def __init__(self, source: Iterator, depth: int):
        self._source = source
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="esmm-prefetch", daemon=True)

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
            self._put(self._DONE)
        except BaseException as exc:  # handed to the consumer and re-raised there
            self._put(exc)

    def __enter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._thread.start()
        return self

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        item = self._queue.get()
        if item is self._DONE:
            self._queue.put(self._DONE)  # later next() calls keep answering "done"
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get_nowait()
            self._thread.join(timeout=0.1)
