"""Free-form math answers (MATH-500, GSM8K, JSONL sets) judged by math-verify, bounded in time from any
thread.

`math_equal(gold, response)` takes the LAST balanced \\boxed{} of the response (`extract_boxed`, as every
built-in task does; a response without one is wrong, no fallback to math-verify's own extraction, which
would also have to parse megabytes) and asks math-verify whether it equals the gold answer:
`verify(gold, pred)` in that order (the comparison is not symmetric). A bare gold answer is parsed as
\\boxed{gold}; a gold that already holds a \\boxed{} (a solution text) is parsed as it is.

Bounded: math-verify's own timeout is signal.alarm, which works only in a main thread, and nothing can
interrupt sympy stuck in C (\\boxed{9^{9^{9^{9}}}}). So the parse and the comparison run in one persistent
worker process (`_mathworker.py`, math-verify and sympy only), which stops itself at 0.8 x timeout and is
killed and restarted (lazily, on the next call) if it has not answered at the timeout. A call costs about
a millisecond more than math-verify in-process; starting the worker costs about a second, once, bounded by
STARTUP_TIMEOUT and not counted in `timeout`. Calls from several threads take turns on the one worker.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import selectors
import subprocess
import sys
import threading
import time
from pathlib import Path

from .base import extract_boxed

MAX_ANSWER_CHARS = 2000  # a longer boxed answer counts as wrong unparsed: final answers are short
MAX_GOLD_CHARS = 100_000
STARTUP_TIMEOUT = 60.0
_WORKER = Path(__file__).with_name("_mathworker.py")


class _Worker:
    """One `_mathworker.py` subprocess and the pipe protocol to it (one JSON line each way)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.buf = b""

    def _readline(self, deadline: float) -> bytes | None:
        """The worker's next line, or None at EOF or the deadline (time.monotonic())."""
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self.buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    return None
                chunk = os.read(fd, 65536)
                if not chunk:
                    return None
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(_WORKER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.buf = b""
        line = self._readline(time.monotonic() + STARTUP_TIMEOUT)
        if line != b"ready":
            self.stop()
            why = line.decode("ascii", "replace") if line else f"no answer within {STARTUP_TIMEOUT:.0f} s"
            raise RuntimeError(f"math-verify worker ({_WORKER}) did not start: {why} "
                               "(is math-verify installed? pip install 'math-verify>=0.9')")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                f.close()
            self.proc = None

    def ask(self, gold: str, pred: str | None, timeout: float) -> str | None:
        """The worker's reply ("1", "0", "N"), or None if it did not answer in time (it is then killed)."""
        if self.proc is None or self.proc.poll() is not None:
            self.stop()
            self.start()
        try:
            self.proc.stdin.write(json.dumps([gold, pred, 0.8 * timeout]).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:  # it died since the poll
            self.stop()
            return None
        line = self._readline(time.monotonic() + timeout)
        if line is None:
            self.stop()
        return None if line is None else line.decode()


_lock = threading.Lock()
_worker = _Worker()


def _after_fork_in_child() -> None:
    """A forked process must not share the parent's pipes (or inherit a held lock): it starts its own."""
    global _lock, _worker
    _lock, _worker = threading.Lock(), _Worker()


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _kill_at_exit() -> None:
    _worker.stop()  # without the lock: a daemon thread may be inside a call


def math_equal(gold: str, response: str, timeout: float = 2.0) -> bool | None:
    """Whether the response's last \\boxed{} equals the gold answer by math-verify: True or False, or None
    when the gold answer cannot be parsed (callers count those apart), whatever the response. Never raises
    on any gold or response (RuntimeError only if the worker cannot start: math-verify missing); returns
    within `timeout` seconds of getting the worker (plus its one-time start); a timeout is False. A gold
    given as an int or float is formatted with str()."""
    if not 0 < timeout < math.inf:
        raise ValueError(f"math_equal: timeout must be a positive, finite number of seconds, got {timeout!r}")
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):
        gold = str(gold)
    if not isinstance(gold, str) or not gold.strip() or len(gold) > MAX_GOLD_CHARS:
        return None
    try:
        pred = extract_boxed(response) if isinstance(response, str) else None
    except Exception:  # noqa: BLE001 — never raises by construction; a grader must not crash regardless
        pred = None
    if pred is not None and (not pred.strip() or len(pred) > MAX_ANSWER_CHARS):
        pred = None  # wrong whatever the gold; the worker still parses the gold, to return None for it
    with _lock:
        reply = _worker.ask(gold, pred, timeout)
    return None if reply == "N" else reply == "1"


def close() -> None:
    """Stops the worker (it also ends by itself when this process exits: its stdin closes)."""
    with _lock:
        _worker.stop()
