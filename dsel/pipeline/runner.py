"""Resumable stages: each writes run_dir/<stage>/ and a done marker; a finished stage is skipped.

A stage's reuse key hashes its result-changing settings (speed-only ones such as `workers` are left
out), the content digests of the files it reads from outside the run (the corpus) and the content
digests of the outputs of the stages it reads. So a changed setting or input reruns that stage and,
when its outputs change, everything downstream of it (a stage's directory is cleared first), while a
killed run resumes at the first unfinished stage (whose own resume logic, e.g. training state or
finished score shards, picks up inside it). A stage counts as done only while every file its marker
lists is still there, unchanged: deleted or altered outputs make it run again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

from dsel.io import file_digest, read_json, tree_digest, write_json

log = logging.getLogger(__name__)

MARKER = "DONE.json"
STARTED = "STARTED.json"
SPEED_ONLY = ("workers", "chunk_rows", "shards", "overwrite")  # stage settings that never change results
NOT_OUTPUT = (MARKER, STARTED, "state")  # resume state is not what later stages read
INPUT_DIGESTS = ".input-digests.json"  # run_dir cache: external file -> (size, mtime, sha256)


def fingerprint(settings, inputs: Sequence[str]) -> str:
    """A short hash of a stage's result-changing settings and its inputs' digests."""
    kept = {k: v for k, v in settings.items() if k not in SPEED_ONLY} if isinstance(settings, dict) else settings
    text = json.dumps({"settings": kept, "inputs": list(inputs)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def output_files(out: Path) -> dict[str, list[int]]:
    """relative path -> [size, mtime_ns] of every output file of a stage directory."""
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out)
        if rel.parts[0] not in NOT_OUTPUT and not any(part.startswith(".") for part in rel.parts):
            stat = path.stat()
            files[str(rel)] = [stat.st_size, stat.st_mtime_ns]
    return files


class StageRunner:
    """Runs named stages under `run_dir`, skipping those whose done marker matches their reuse key."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.digests: dict[str, str] = {}  # stage -> content digest of its outputs

    def path(self, name: str) -> Path:
        return self.run_dir / name

    def run(self, name: str, settings, after: Sequence[str], body: Callable[[Path], object],
            reads: Sequence[str] = ()) -> Path:
        """Run `body(out_dir)` unless stage `name` is done with the same settings and inputs: the
        outputs of stages `after` and the external files `reads`."""
        out = self.path(name)
        stamp = fingerprint(settings, [self.digests[a] for a in after] + [self.input_digest(p) for p in reads])
        marker, started = out / MARKER, out / STARTED
        if marker.is_file():
            done = read_json(marker)
            if done.get("fingerprint") == stamp and outputs_intact(out, done):
                log.info("stage %s: done (%.1f s), skipped", name, done.get("seconds", 0.0))
                self.digests[name] = done["digest"]
                return out
            why = "settings or inputs changed" if done.get("fingerprint") != stamp else "outputs missing or changed"
            log.info("stage %s: %s since it ran; running it again from scratch", name, why)
            shutil.rmtree(out)
        elif out.exists() and (not started.is_file() or read_json(started).get("fingerprint") != stamp):
            log.info("stage %s: settings or inputs changed since it started; running it again from scratch", name)
            shutil.rmtree(out)
        elif started.is_file():
            log.info("stage %s: resuming an unfinished run", name)
        log.info("stage %s: running", name)
        start = time.time()
        write_json(started, {"stage": name, "fingerprint": stamp})
        body(out)
        seconds = time.time() - start
        digest = tree_digest(out, skip=NOT_OUTPUT)
        write_json(marker, {"stage": name, "fingerprint": stamp, "seconds": round(seconds, 2), "digest": digest,
                            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": settings,
                            "outputs": output_files(out)})
        log.info("stage %s: finished in %.1f s", name, seconds)
        self.digests[name] = digest
        return out

    def input_digest(self, path: str) -> str:
        """sha256 of an external input file, cached in run_dir by (size, mtime) so reruns skip the hash
        (a remote fsspec URL counts by its name alone)."""
        if not os.path.isfile(path):
            return path
        stat = os.stat(path)
        cache_file = self.run_dir / INPUT_DIGESTS
        cache = read_json(cache_file) if cache_file.is_file() else {}
        key = os.path.abspath(path)
        size_mtime = [stat.st_size, stat.st_mtime_ns]
        if cache.get(key, [None])[:2] != size_mtime:
            cache[key] = [*size_mtime, file_digest(path)]
            write_json(cache_file, cache)
        return cache[key][2]

    def timings(self) -> dict[str, float]:
        """Seconds of every finished stage (from the markers), in run order."""
        return {read_json(m)["stage"]: read_json(m)["seconds"]
                for m in sorted(self.run_dir.rglob(MARKER), key=lambda p: p.stat().st_mtime)}


def outputs_intact(out: Path, done: dict) -> bool:
    """Whether every output file a done marker lists is still there unchanged (sizes, then the content
    digest when a file's time changed, e.g. after a copy)."""
    listed = done.get("outputs")
    if not listed or "digest" not in done:
        return False
    now = output_files(out)
    if any(f not in now or now[f][0] != listed[f][0] for f in listed):
        return False
    return all(now[f] == listed[f] for f in listed) or tree_digest(out, skip=NOT_OUTPUT) == done["digest"]
