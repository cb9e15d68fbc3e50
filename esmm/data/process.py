"""The input process: batches assembled in a child process and handed over in shared memory.

In a thread beside the training step, every Python-level operation of the input would
compete with the step for the GIL (issue #8). :class:`_InputProcess` runs the batch source
(the reader, the conversion and the shuffling buffer) in a child forked from a
``forkserver`` that has already imported this package, Petastorm and pyarrow, and receives
the batches :data:`_CHUNK_BATCHES` at a time, one shared-memory block per dtype
(:func:`_pack` / :func:`_unpack`).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import pickle
import queue
import sys
import types
from collections import deque
from collections.abc import Callable, Iterator

import torch

from esmm.data.config import DataConfig, DataError

__all__ = ["start_input_server"]

# Batches packed into one shared-memory block per dtype and handed over together: the cost of
# a hand-over (a file descriptor per block, received through a socket) is paid per chunk.
_CHUNK_BATCHES = 8


def _pack(batches: list[dict[str, torch.Tensor]]) -> tuple[dict, list]:
    """Batches as one flat shared-memory tensor per dtype and where each column lies in them:
    ``({dtype: flat}, [[(name, dtype, offset, shape), ...] per batch])``."""
    ends: dict[torch.dtype, int] = {}
    layout = []
    for batch in batches:
        places = []
        for name, tensor in batch.items():
            offset = ends.get(tensor.dtype, 0)
            places.append((name, tensor.dtype, offset, tuple(tensor.shape)))
            ends[tensor.dtype] = offset + tensor.numel()
        layout.append(places)
    flats = {dtype: torch.empty(end, dtype=dtype).share_memory_() for dtype, end in ends.items()}
    for batch, places in zip(batches, layout, strict=True):
        for name, dtype, offset, shape in places:
            flats[dtype][offset : offset + math.prod(shape)].view(shape).copy_(batch[name])
    return flats, layout


def _unpack(flats: dict, layout: list) -> list[dict[str, torch.Tensor]]:
    """The batches of :func:`_pack`, as views of its blocks (no copy)."""
    return [
        {
            name: flats[dtype][offset : offset + math.prod(shape)].view(shape)
            for name, dtype, offset, shape in places
        }
        for places in layout
    ]


def _produce(channel, stop, source: Callable, args: tuple) -> None:
    """The input process: the batches of ``source(*args)`` (a context manager yielding an
    iterator of batches, such as train_batches' :func:`esmm.data.batches._local_batches`), in
    chunks, onto ``channel`` until the end of the epoch, ``stop`` or an error (which is sent
    instead, and re-raised by the trainer).

    The trainer fetches each chunk's shared memory from this process when it receives the
    chunk, so the process stays alive until the trainer says ``stop`` (or dies itself).
    """
    torch.set_num_threads(1)  # the trainer's cores are for its step
    parent = mp.parent_process()

    def running() -> bool:
        return not stop.is_set() and (parent is None or parent.is_alive())

    def send(item) -> bool:
        while running():
            try:
                channel.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        with source(*args) as batches:
            chunk = []
            for batch in batches:
                chunk.append(batch)
                if len(chunk) == _CHUNK_BATCHES:
                    if not send(("batches", *_pack(chunk))):
                        return
                    chunk = []
            if chunk and not send(("batches", *_pack(chunk))):
                return
        send(("done",))
    except BaseException as exc:
        try:
            pickle.dumps(exc)
        except Exception:  # the trainer gets its text then
            exc = DataError(f"input process: {type(exc).__name__}: {exc}")
        send(("error", exc))
    while running():
        stop.wait(0.5)


# What the forkserver imports before it forks any input process: the modules of the code the
# child runs (_produce, and the batch source train_batches hands it, both pickled by module
# path), Petastorm and pyarrow. A name that does not import is skipped silently by
# multiprocessing, and every child would then import it itself (seconds per epoch).
_PRELOAD = ("esmm.data.process", "esmm.data.batches", "petastorm", "pyarrow.parquet")


def _input_context():
    """The multiprocessing context of the input processes: a forkserver that has imported
    :data:`_PRELOAD`, so each epoch's process starts in milliseconds."""
    import torch.multiprocessing as torch_mp

    context = torch_mp.get_context("forkserver")
    context.set_forkserver_preload(list(_PRELOAD))
    return context


@contextlib.contextmanager
def _without_main() -> Iterator[None]:
    """A forkserver child re-imports the caller's main module (by path or name), and a script
    without an ``if __name__ == "__main__":`` guard would run again in it. The input process
    needs nothing of it: processes are started with a bare stand-in for that module."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _use_input_process(cfg: DataConfig) -> bool:
    # (a daemonic process, such as a multiprocessing pool's worker, may not start one)
    return bool(cfg.prefetch_batches and cfg.input_process and not mp.current_process().daemon)


def start_input_server(cfg: DataConfig) -> None:
    """Start the server of the input processes now (it imports torch and Petastorm, about two
    seconds), so that it does so while the caller sets up rather than before the first batch.
    Optional: train_batches starts it when it is not running yet."""
    if _use_input_process(cfg):
        from multiprocessing import forkserver

        _input_context()
        with _without_main():
            forkserver.ensure_running()


class _InputProcess:
    """The batches of ``source(*args)`` assembled in a child process, received in shared memory.

    ``source`` is a module-level function (pickled by its module path, which
    :data:`_PRELOAD` names) that returns a context manager yielding an iterator of batches:
    train_batches passes :func:`esmm.data.batches._local_batches`, the Petastorm reader, the
    conversion and the shuffling buffer. The child (forked from a ``forkserver`` that has
    imported those modules, so it starts in milliseconds and inherits none of the trainer's
    threads or Horovod state) runs it with one torch thread, and sends
    :data:`_CHUNK_BATCHES` batches at a time as one block per dtype (:func:`_pack`). The
    trainer's side only unpickles a few handles per chunk and slices views, so the input
    takes next to nothing from the training step's core or GIL.

    Leaving the ``with`` block early stops the child and drains what it had sent; an error in
    the child is re-raised here; a child that dies (killed, out of memory) is a DataError,
    not a hang.
    """

    def __init__(self, source: Callable, args: tuple, depth: int) -> None:
        context = _input_context()
        self._channel = context.Queue(maxsize=max(1, math.ceil(depth / _CHUNK_BATCHES)))
        self._stop = context.Event()
        self._process = context.Process(
            target=_produce,
            args=(self._channel, self._stop, source, args),
            name="esmm-input",
            daemon=True,
        )
        self._pending: deque = deque()
        self._done = False

    def __enter__(self) -> Iterator[dict[str, torch.Tensor]]:
        with _without_main():
            self._process.start()
        return self

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        while not self._pending:
            if self._done:
                raise StopIteration
            item = self._receive()
            if item[0] == "batches":
                self._pending.extend(_unpack(item[1], item[2]))
                continue
            self._done = True  # "done" or "error": the child may exit now
            self._stop.set()
            if item[0] == "error":
                raise item[1]
        return self._pending.popleft()

    def _receive(self) -> tuple:
        while True:
            try:
                return self._channel.get(timeout=1.0)
            except queue.Empty:
                if not self._process.is_alive():
                    try:  # it may have sent its last item just before exiting
                        return self._channel.get(timeout=1.0)
                    except queue.Empty:
                        raise self._exited() from None
            except (OSError, EOFError) as exc:  # a chunk whose sender died as it was sent
                self._process.join(timeout=5.0)
                raise self._exited() from exc

    def _exited(self) -> DataError:
        return DataError(
            f"the input process exited (code {self._process.exitcode}) before the end of the "
            "epoch; a negative code is the signal that ended it (-9: killed, often for memory)"
        )

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._pending.clear()
        while self._process.is_alive():
            # (a chunk whose sender has just exited cannot be received: nothing is lost, the
            # rest of the epoch is being dropped anyway)
            with contextlib.suppress(queue.Empty, OSError, EOFError):
                self._channel.get(timeout=0.1)
            self._process.join(timeout=0.1)
        self._channel.close()
