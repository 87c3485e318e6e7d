"""math-verify (sympy) under a deadline: it can take unbounded time on adversarial input (`9^{9^{9^9}}`), so
`verify_within(pred, gold, timeout)` never waits longer than about `timeout` seconds:
  * main thread, SIGALRM free: in-process, under a float `setitimer` alarm;
  * any other thread (signals only work in the main thread), or SIGALRM already taken by
    someone else: in a long-lived helper process (`python -c ...` over pipes); the parent
    waits at most `timeout + _GRACE_S` and kills (then lazily restarts) the helper on overrun,
    which also stops hangs inside C code that no signal can interrupt.
A timed-out comparison is False. POSIX only (signals, select on pipes). answers.is_equivalent calls this only
after its string, integer and rational fast paths; tests/test_answers.py exercises both routes.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time


class _Deadline(BaseException):
    """Raised by our SIGALRM handler; a BaseException so `except Exception` in sympy can't eat it."""


_GRACE_S = 0.5  # helper-process slack over the in-helper alarm before it is killed
_STARTUP_TIMEOUT_S = 120.0  # importing sympy + math-verify in a fresh helper
_MV_LOCK = threading.Lock()
_MV: dict = {}  # math-verify's parse/verify once loaded and warmed up


def _math_verify() -> dict:
    """Import and warm up math-verify once, outside any deadline.

    The first import (sympy) and first parse (grammar set-up) take a second or more; under an
    alarm they would eat the budget, and an import interrupted half-way leaves broken modules.
    Its one-off "timeout is disabled" warning is dropped: we enforce the deadline ourselves.
    """
    with _MV_LOCK:
        if not _MV:
            from math_verify import parse, verify

            class _DropTimeoutDisabled(logging.Filter):
                def filter(self, record: logging.LogRecord) -> bool:
                    return not str(record.msg).startswith("Timeout is disabled")

            for name in ("math_verify.parser", "math_verify.grader"):
                logging.getLogger(name).addFilter(_DropTimeoutDisabled())
            verify(parse("$x+1$", parsing_timeout=None), parse("$1+x$", parsing_timeout=None), timeout_seconds=None)
            _MV.update(parse=parse, verify=verify)
    return _MV


def _verify_unbounded(pred: str, gold: str) -> bool:
    """math-verify on two normalised answers, without any time limit of its own."""
    mv = _math_verify()
    gold_parsed = mv["parse"](f"${gold}$", parsing_timeout=None)
    pred_parsed = mv["parse"](f"${pred}$", parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(mv["verify"](gold_parsed, pred_parsed, timeout_seconds=None))


def _alarm_usable() -> bool:
    if threading.current_thread() is not threading.main_thread():
        return False
    # A handler someone else installed (or one set from C: None) is theirs; don't clobber it.
    free = signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, signal.SIG_IGN)
    return free and signal.getitimer(signal.ITIMER_REAL)[0] == 0.0


def _verify_with_alarm(pred: str, gold: str, timeout: float) -> bool:
    """`_verify_unbounded` under a one-shot SIGALRM deadline (main thread only)."""
    armed = [True]

    def on_alarm(signum, frame):
        if armed[0]:
            armed[0] = False  # raise at most once, so the cleanup below cannot be interrupted
            raise _Deadline()

    _math_verify()  # loading is not part of the budget
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(timeout, 1e-3))
    try:
        try:
            result = _verify_unbounded(pred, gold)
        finally:
            armed[0] = False
    except _Deadline:
        result = False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        signal.signal(signal.SIGALRM, previous)
    return result


def _worker_loop() -> None:
    """Helper-process main: one JSON request per stdin line, one JSON bool per reply line."""
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol
    _math_verify()  # pay the import before announcing readiness

    channel.write("ready\n")
    channel.flush()
    for line in sys.stdin:
        req = json.loads(line)
        ok = _verify_with_alarm(req["p"], req["g"], float(req["t"]))
        channel.write("true\n" if ok else "false\n")
        channel.flush()


class _VerifyWorker:
    """Owns the helper process; one request at a time (a lock serialises threads)."""

    def __init__(self, command: list[str] | None = None) -> None:
        self._command = command or [
            sys.executable, "-c", "from mathgrpo.timed_verify import _worker_loop; _worker_loop()",
        ]
        self._forget()

    def _forget(self) -> None:
        """Drop the handle without killing: after fork() the helper belongs to the parent."""
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._buffer = b""

    def start(self) -> None:
        with self._lock:
            self._ensure_started()

    def _ensure_started(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self._proc = subprocess.Popen(self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._buffer = b""
        if self._read_line(_STARTUP_TIMEOUT_S) != "ready":
            self._kill()
            raise RuntimeError("mathgrpo.timed_verify: the math-verify helper process failed to start")

    def _read_line(self, timeout: float) -> str | None:
        """One reply line, or None on deadline or EOF."""
        deadline = time.monotonic() + timeout
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc.stdin.close()
            self._proc.stdout.close()
            self._proc = None

    def verify(self, pred: str, gold: str, timeout: float) -> bool:
        with self._lock:
            self._ensure_started()
            request = json.dumps({"p": pred, "g": gold, "t": timeout}) + "\n"
            try:
                self._proc.stdin.write(request.encode())
                self._proc.stdin.flush()
            except BrokenPipeError:
                self._kill()
                return False
            reply = self._read_line(timeout + _GRACE_S)
            if reply is None:  # overran its own alarm (stuck in C) or died: start afresh next time
                self._kill()
                return False
            return reply == "true"

    def close(self) -> None:
        with self._lock:
            self._kill()


_WORKER = _VerifyWorker()
atexit.register(_WORKER.close)
os.register_at_fork(after_in_child=_WORKER._forget)


def verify_within(pred: str, gold: str, timeout: float) -> bool:
    """math-verify on two normalised answers, False when it does not finish within `timeout` seconds."""
    if _alarm_usable():
        return _verify_with_alarm(pred, gold, timeout)
    return _WORKER.verify(pred, gold, timeout)
