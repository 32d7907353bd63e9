"""Resumable stages: each writes run_dir/<stage>/ and a done marker; a finished stage is skipped.

A stage's fingerprint hashes its settings and the fingerprints of the stages it reads, so changing
a setting re-runs that stage and everything downstream of it (its directory is cleared first),
while a killed run resumes at the first unfinished stage (whose own resume logic, e.g. training
state or finished score shards, picks up inside it).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

from dsel.io import read_json, write_json

log = logging.getLogger(__name__)

MARKER = "DONE.json"
STARTED = "STARTED.json"


def fingerprint(settings, inputs: Sequence[str]) -> str:
    """A short hash of a stage's settings and its inputs' fingerprints."""
    text = json.dumps({"settings": settings, "inputs": list(inputs)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StageRunner:
    """Runs named stages under `run_dir`, skipping those whose done marker matches their fingerprint."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.fingerprints: dict[str, str] = {}

    def path(self, name: str) -> Path:
        return self.run_dir / name

    def run(self, name: str, settings, after: Sequence[str], body: Callable[[Path], object]) -> Path:
        """Run `body(out_dir)` unless stage `name` is done with the same settings and inputs."""
        out = self.path(name)
        stamp = fingerprint(settings, [self.fingerprints[a] for a in after])
        marker, started = out / MARKER, out / STARTED
        if marker.is_file() and read_json(marker).get("fingerprint") == stamp:
            log.info("stage %s: done (%.1f s), skipped", name, read_json(marker).get("seconds", 0.0))
            self.fingerprints[name] = stamp
            return out
        if marker.is_file() or (started.is_file() and read_json(started).get("fingerprint") != stamp):
            log.info("stage %s: settings or inputs changed since it ran; running it again from scratch", name)
            shutil.rmtree(out)
        elif started.is_file():
            log.info("stage %s: resuming an unfinished run", name)
        log.info("stage %s: running", name)
        start = time.time()
        write_json(started, {"stage": name, "fingerprint": stamp})
        body(out)
        seconds = time.time() - start
        write_json(marker, {"stage": name, "fingerprint": stamp, "seconds": round(seconds, 2),
                            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": settings})
        log.info("stage %s: finished in %.1f s", name, seconds)
        self.fingerprints[name] = stamp
        return out

    def timings(self) -> dict[str, float]:
        """Seconds of every finished stage (from the markers), in run order."""
        return {read_json(m)["stage"]: read_json(m)["seconds"]
                for m in sorted(self.run_dir.rglob(MARKER), key=lambda p: p.stat().st_mtime)}
