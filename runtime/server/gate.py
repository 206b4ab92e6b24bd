"""Answers before rounds: a readers-writer gate where the writer (the worker's round) yields between steps.

Readers are answers (`ask`): any number at once. The writer is whatever mutates streams (the worker's round,
a delete, the final save): one at a time, and never while a reader runs. The worker calls `yield_to_readers`
between two train steps (Stream.step_hook): when answers wait, it parks (still the writer, so no other writer
gets in), lets them run, and resumes when they are done. An answer therefore waits at most one train step (or
one teacher pass), never a whole round. Starvation is bounded both ways: a writer that waited `max_yield_s`
stops new readers from entering, and a parked writer resumes after `max_yield_s` once the running answers end.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager


class Gate:
    def __init__(self, max_yield_s: float = 5.0):
        self._c = threading.Condition()
        self._readers = 0
        self._rwait = 0
        self._writer = False
        self._parked = False
        self._wprio = 0
        self.max_yield_s = max_yield_s

    @contextmanager
    def read(self):
        c = self._c
        with c:
            self._rwait += 1
            try:
                while (self._writer and not self._parked) or self._wprio:
                    c.wait(0.1)
            finally:
                self._rwait -= 1
            self._readers += 1
        try:
            yield
        finally:
            with c:
                self._readers -= 1
                c.notify_all()

    @contextmanager
    def write(self):
        c = self._c
        with c:
            t0 = time.monotonic()
            prio = False
            try:
                while self._writer or self._readers or (self._rwait and not prio):
                    if not prio and self._rwait and time.monotonic() - t0 > self.max_yield_s:
                        prio = True
                        self._wprio += 1
                        continue
                    c.wait(0.05)
            finally:
                if prio:
                    self._wprio -= 1
            self._writer = True
        try:
            yield
        finally:
            with c:
                self._writer = False
                c.notify_all()

    def yield_to_readers(self) -> None:
        """Called by the writer between steps: let waiting readers run, then take the gate back."""
        if not self._rwait:          # the common case, without the lock
            return
        c = self._c
        with c:
            if not self._rwait:
                return
            self._parked = True
            c.notify_all()
            t0 = time.monotonic()
            while (self._rwait or self._readers) and time.monotonic() - t0 < self.max_yield_s:
                c.wait(0.05)
            self._parked = False
            while self._readers:
                c.wait(0.05)
