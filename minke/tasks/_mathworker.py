"""The math-verify worker behind mathcheck.math_equal, run as a script (python _mathworker.py) so that it
imports math-verify and sympy only, not minke or torch. Protocol, one JSON line each way:
  request  [gold, prediction, seconds]  — gold text, the contents of the response's last box (null: none,
           only parse the gold), a budget in seconds
  reply    "1" equal, "0" not equal (or out of time, or an error), "N" the gold has no parse
It works in its own main thread, so its own interval timer can interrupt sympy between bytecodes; a
computation stuck in C (a huge integer power) is the parent's to kill. math-verify's own timeouts stay
off: they set signal.alarm, which would replace this timer."""

import json
import logging
import os
import signal
import sys

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # this script's folder (minke/tasks) must not shadow top-level modules


class Deadline(BaseException):  # BaseException: math-verify's `except Exception` must not swallow it
    pass


def _fire(signum, frame):
    raise Deadline


def judge(parse, verify, gold: str, pred: str) -> str:
    try:  # a gold that is a solution text keeps its own box; a bare answer is boxed
        target = parse(gold if "\\boxed{" in gold else "\\boxed{" + gold + "}", parsing_timeout=None)
    except Deadline:
        return "N"  # no parse within the budget
    if not target:
        return "N"
    if pred is None:  # the response has no usable box: only the gold's parse was asked for
        return "0"
    answer = parse("\\boxed{" + pred + "}", parsing_timeout=None)
    return "1" if answer and verify(target, answer, timeout_seconds=None) else "0"


def main() -> None:
    out = sys.stdout.buffer
    try:
        import resource

        # A runaway sympy expression fails with MemoryError here instead of swapping the machine.
        limit = int(os.environ.get("MINKE_MATHCHECK_MEMORY", 4 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    except (ImportError, ValueError, OSError):
        pass
    try:
        logging.disable(logging.CRITICAL)  # math-verify warns per unparsable answer and about timeouts
        from math_verify import parse, verify

        judge(parse, verify, "\\frac{1}{2}", "0.5")  # sympy imports lazily: pay for it before "ready"
    except Exception as e:  # noqa: BLE001 — reported to the parent, which raises it
        out.write(f"error {type(e).__name__}: {e}\n".encode("ascii", "backslashreplace"))
        out.flush()
        return
    signal.signal(signal.SIGALRM, _fire)
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        reply = "0"
        try:
            gold, pred, seconds = json.loads(line)
            signal.setitimer(signal.ITIMER_REAL, seconds)
            try:
                reply = judge(parse, verify, gold, pred)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except Deadline:
            pass
        except Exception:  # noqa: BLE001 — anything math-verify or sympy raises: not equal
            pass
        out.write(reply.encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    main()
