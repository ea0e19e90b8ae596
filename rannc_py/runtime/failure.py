"""A failure on one rank ends every rank, with that rank's message.

Without this, the other ranks would wait forever in a receive or collective
for the rank that raised. Three mechanisms cover the three ways a rank stops
taking part:

- an error inside a library call that is a bug or an MPI failure
  (:func:`abort_on_error`) prints the traceback with the rank and aborts the
  job; with one process there is nobody to wait, so it propagates as usual;
- an error that the user can correct in a collective library call
  (``load_state_dict``, ``state_dict``, option checks) is first agreed across
  the ranks (:func:`agreed`): every rank learns whether any failed and raises
  the message of the lowest failing rank, so the error stays catchable and no
  rank is left waiting;
- an exception in the user's own code, outside any library call, reaches the
  interpreter's top level, where the hook :func:`install_excepthook` installs
  prints it with the rank and aborts, as ``python -m mpi4py script.py`` does;
- a rank that stops progressing (a peer that never arrives, a collective
  called on only some ranks) is ended by the :class:`Watchdog` when the
  module was given ``timeout=``: its message names the rank, the call, and
  the function and schedule action it was waiting in.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType
from typing import Any, TypeVar

from mpi4py import MPI

from rannc_py import errors
from rannc_py.errors import ConfigError, RaNNCError

T = TypeVar("T")


def _report(rank: int, size: int, headline: str, text: str) -> None:
    """Write ``headline`` and ``text`` to stderr, each line prefixed with the rank, and flush."""
    sys.stderr.write(
        f"[rannc_py] rank {rank} {headline}; aborting all {size} ranks\n"
        + "".join(f"[rank {rank}] {line}\n" for line in text.rstrip().splitlines())
    )
    sys.stderr.flush()


# Seconds between printing a failure and aborting: the launcher forwards each rank's
# output through a pipe, and an abort that comes at once can end the launcher
# before it has read the message (seen under MPICH's hydra on a busy machine).
_FORWARD_GRACE_S = 0.5


def _abort(comm: MPI.Comm) -> None:
    """End every rank of ``comm``'s job, after giving the launcher time to forward this rank's message."""
    time.sleep(_FORWARD_GRACE_S)
    comm.Abort(1)


@contextmanager
def abort_on_error(comm: MPI.Comm, what: str) -> Iterator[None]:
    """Run the body; if it raises on a multi-rank ``comm``, print the traceback
    prefixed with this rank and ``what`` was being done, then abort the job."""
    try:
        yield
    except BaseException:
        if comm.Get_size() == 1:
            raise
        _report(comm.Get_rank(), comm.Get_size(), f"failed during {what}", traceback.format_exc())
        _abort(comm)


# ----------------------------------------------------------- agreement
def agreed(comm: MPI.Comm, what: str, body: Callable[[], T]) -> T:
    """Run ``body`` on every rank of ``comm`` and agree on whether it failed (collective).

    ``what`` names the call (e.g. ``"load_state_dict"``); every rank must be
    in the same call. Any other exception than a :class:`RaNNCError` is a bug
    and aborts the job (:func:`abort_on_error`).

    Returns:
        ``body()``'s value, when it succeeded on every rank.

    Raises:
        RaNNCError: of the class and with the message of the lowest rank whose
            ``body`` raised one, on every rank; ConfigError when the ranks are
            in different calls.
    """
    failure: tuple[str, str] | None = None
    mine: RaNNCError | None = None
    result: T | None = None
    with abort_on_error(comm, what):
        try:
            result = body()
        except RaNNCError as e:
            mine, failure = e, (type(e).__name__, str(e))
        gathered = comm.allgather((what, failure))
    # A rank in another collective on this communicator (a forward call's own allgather) sends
    # something else: that is a rank in a different call too.
    reports = [r if isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], str)
               else ("another collective call (e.g. the forward call)", None) for r in gathered]
    calls = sorted({w for w, _ in reports})
    if len(calls) > 1:
        by_rank = ", ".join(f"rank {r}: {w}" for r, (w, _) in enumerate(reports))
        raise ConfigError(f"the ranks are in different collective calls ({by_rank}); call each "
                          "collective method of RaNNCModule on every rank, in the same order")
    failed = [(r, f) for r, (_, f) in enumerate(reports) if f is not None]
    if not failed:
        return result  # type: ignore[return-value]  # body returned on this rank
    first, (name, message) = failed[0]
    suffix = "" if comm.Get_size() == 1 else f" [raised on rank {first}; every rank raises this]"
    if first == comm.Get_rank() and mine is not None:
        mine.args = (message + suffix, *mine.args[1:])  # keep the class, its attributes and traceback
        raise mine
    cls = getattr(errors, name, RaNNCError)
    if not (isinstance(cls, type) and issubclass(cls, RaNNCError)):
        cls = RaNNCError
    raise cls(message + suffix)


# --------------------------------------------------------- excepthook
_installed = False


def install_excepthook() -> None:
    """Make an uncaught exception on any rank of a multi-rank job abort every rank.

    Chains to the hooks in place: a non-default ``sys.excepthook`` (or
    ``threading.excepthook``) still runs first, then this rank's traceback is
    printed with its rank and ``MPI.COMM_WORLD.Abort(1)`` ends the job, so the
    failing rank's message is the first one printed. Idempotent; does nothing
    in a one-process job.
    """
    global _installed
    if _installed or MPI.COMM_WORLD.Get_size() == 1:
        return
    _installed = True
    previous = sys.excepthook
    previous_thread = threading.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if previous is not sys.__excepthook__:
            previous(kind, value, tb)
        _abort_uncaught("raised an uncaught exception", "".join(traceback.format_exception(kind, value, tb)))

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if previous_thread is not threading.__excepthook__:
            previous_thread(args)
        text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
        name = args.thread.name if args.thread is not None else "?"
        _abort_uncaught(f"raised an uncaught exception in thread {name!r}", text)

    sys.excepthook = hook
    threading.excepthook = thread_hook


def _abort_uncaught(headline: str, text: str) -> None:
    world = MPI.COMM_WORLD
    _report(world.Get_rank(), world.Get_size(), headline, text)
    if not MPI.Is_finalized():
        _abort(world)


# ------------------------------------------------------------ watchdog
class Watchdog:
    """Ends the job when a library call on this rank takes longer than ``timeout`` seconds.

    A daemon thread sleeps until the deadline of the call being watched; if
    the call is still running then, it prints which rank, which call, how
    long, and where the main thread waits (the innermost rannc_py function
    and, inside the executor, the schedule action), then aborts every rank.
    The waiting itself happens in C++ or MPI without the GIL, so the thread
    runs while the main thread is blocked. ``timeout=None`` watches nothing.
    """

    def __init__(self, timeout: float | None, comm: MPI.Comm) -> None:
        self.timeout = timeout
        self._comm = comm
        self._lock = threading.Condition()
        self._call: tuple[str, float, int] | None = None  # (what, deadline, thread id)
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, what: str) -> Iterator[None]:
        """Watch the body, a library call named ``what``; nested watches keep the outer one."""
        if self.timeout is None or self._call is not None:
            yield
            return
        with self._lock:
            self._call = (what, time.monotonic() + self.timeout, threading.get_ident())
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="rannc_py-watchdog", daemon=True)
                self._thread.start()
            self._lock.notify()
        try:
            yield
        finally:
            with self._lock:
                self._call = None
                self._lock.notify()

    def _run(self) -> None:
        with self._lock:
            while True:
                call = self._call
                if call is None:
                    self._lock.wait()
                    continue
                left = call[1] - time.monotonic()
                if left > 0:
                    self._lock.wait(left)
                    continue
                self._expire(call[0], call[2])

    def _expire(self, what: str, thread_id: int) -> None:
        rank, size = self._comm.Get_rank(), self._comm.Get_size()
        where = waiting_point(sys._current_frames().get(thread_id))
        _report(rank, size, f"made no progress for {self.timeout:g} s (timeout=) in {what}",
                f"waiting in {where}\nevery rank must make the same library calls in the same order; "
                "a rank that failed or stopped above is the cause, or raise timeout= if a step is this slow")
        if size == 1:
            os._exit(1)  # one process: nobody to abort, but a hung process must still end
        _abort(self._comm)


def waiting_point(frame: FrameType | None) -> str:
    """Where ``frame``'s thread waits: its innermost rannc_py frames (up to 3, innermost first), and
    the schedule action when the executor is running one."""
    where: list[str] = []
    action: Any = None
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    while frame is not None:
        path = frame.f_code.co_filename
        if len(where) < 3 and path.startswith(package):
            where.append(f"{frame.f_code.co_name} ({os.path.relpath(path, os.path.dirname(package))}:"
                         f"{frame.f_lineno})")
        if action is None and frame.f_code.co_name == "run_actions" \
                and path.endswith(os.path.join("runtime", "executor.py")):
            action = frame.f_locals.get("a")  # the schedule action being executed
        frame = frame.f_back
    text = " called from ".join(where) or "user code"
    if action is None:
        return text
    return f"{text}, schedule action {action}" + (f" of stage {action.stage}" if hasattr(action, "stage") else "")
