"""The worker: one thread that runs every stream's rounds, taking turns (round-robin, one round per stream
per turn), so that a chatty stream cannot starve the others. Each turn holds the gate's write side; between
train steps the round yields to waiting answers (Stream.step_hook = Gate.yield_to_readers)."""
from __future__ import annotations

import threading
import traceback


def round_event(stream_id: str, r) -> dict:
    return {"type": "round", "stream": stream_id, "round": r.round, "tokens_absorbed": r.tokens_absorbed,
            "loss_first": r.loss_first, "loss_last": r.loss_last, "seconds": round(r.seconds, 4),
            "steps": r.steps, "rolled_back": r.rolled_back}


class Scheduler:
    def __init__(self, registry, gate, metrics, compact_bytes: int, log=print):
        self.registry = registry
        self.gate = gate
        self.metrics = metrics
        self.compact_bytes = compact_bytes
        self.log = log
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="absorber-rounds", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self.registry.work.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _on_round(self, live):
        def cb(r):
            self.metrics.rounds.inc()
            self.metrics.round_seconds.observe(r.seconds)
            live.publish(round_event(live.id, r))
        return cb

    def turn_once(self) -> int:
        """One turn over every stream: returns how many rounds ran."""
        ran = 0
        for live in self.registry.snapshot():
            if self._stop.is_set():
                break
            if live.closed or live.error or not live.has_work():
                continue
            with self.gate.write():
                if live.closed:
                    continue
                try:
                    if live.turn(self._on_round(live), self.compact_bytes) is not None:
                        ran += 1
                except Exception as e:  # noqa: BLE001 - one stream's failure stops that stream only
                    live.error = f"{type(e).__name__}: {e}"
                    self.log(f"absorber serve: stream {live.id} stopped: {live.error}\n{traceback.format_exc()}")
        return ran

    def _run(self) -> None:
        work = self.registry.work
        while not self._stop.is_set():
            if self.turn_once() == 0:
                work.wait(0.5)
                work.clear()
