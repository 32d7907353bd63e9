"""File helpers shared by every stage: atomic writes, output locks, whole-folder publishing, content
digests, input checks, progress bars."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tqdm.auto import tqdm

from dsel.errors import file_error

log = logging.getLogger(__name__)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` only if the block succeeds.

    Readers never see a half-written file, and a failed or killed write leaves any previous
    version of `path` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike):
    """Read a JSON file, with a one-line error naming the file when it is missing or malformed."""
    path = require_file(path, "JSON file")
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise file_error(path, f"not valid JSON ({e.msg} at line {e.lineno})") from None


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    """Return `path` as a Path, or raise a DselError if it does not exist."""
    path = Path(path)
    if not path.is_file():
        raise file_error(path, f"{what} not found")
    return path


def progress(iterable=None, **kwargs):
    """A tqdm progress bar on stderr (DSEL_PROGRESS=0 hides it); sparse updates in log files."""
    kwargs.setdefault("disable", os.environ.get("DSEL_PROGRESS") == "0")
    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else 10.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


# ----- one writer per output, published whole -------------------------------------------------------
_HELD: dict[str, int] = {}  # lock file -> how many nested `output_lock` blocks of this process hold it
_STALE = re.compile(r"\.(tmp|old)-(\d+)$")
RENAME_EXCHANGE = 2  # renameat2 flag: swap two paths atomically (Linux >= 3.15)


def lock_file(out: str | os.PathLike, tag: str = "") -> Path:
    """The advisory lock of output `out` (a folder, file or dataset prefix): a hidden sibling."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}{tag}.lock"


@contextmanager
def output_lock(out: str | os.PathLike, tag: str = "") -> Iterator[Path]:
    """Hold the lock of output `out` for the block: a second writer gets "in use by pid N".

    The lock is an flock on a hidden sibling file holding the writer's pid; the kernel drops it when
    the writer dies, so a killed writer's lock is taken over by the next one. Taking the lock first
    checks that `out` can be written (one line when not) and removes temporary files that killed
    writers of `out` left behind. Nested blocks of one process on the same output share the lock.
    """
    out = Path(out).absolute()
    path = lock_file(out, tag)
    if str(path) in _HELD:
        _HELD[str(path)] += 1
        try:
            yield out
        finally:
            _HELD[str(path)] -= 1
        return
    created = check_writable(out)
    try:
        fd = _acquire(path, out)
    except BaseException:
        remove_empty(created)
        raise
    _HELD[str(path)] = 1
    try:
        remove_stale(out)
        yield out
    finally:
        del _HELD[str(path)]
        path.unlink(missing_ok=True)  # still holding the flock: a waiting writer re-checks the inode
        os.close(fd)
        remove_empty(created)  # a command refused on a bad input leaves no output folder behind


def remove_empty(folders: list[Path]) -> None:
    """Remove the folders (deepest first) that are still empty: the ones a refused command created."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def rank_tag() -> str:
    """The lock tag of this process: one lock per rank under torchrun, whose ranks write one output together."""
    return f".rank{os.environ.get('RANK', '0')}" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def writes_output(field: str = "out"):
    """Decorator of a command's `run(cfg)`: holds `output_lock(cfg.<field>)` while it runs (one lock per
    rank under torchrun, whose ranks write the same output together)."""
    def wrap(run):
        @functools.wraps(run)
        def locked(cfg, *args, **kwargs):
            with output_lock(getattr(cfg, field), rank_tag()):
                return run(cfg, *args, **kwargs)
        return locked
    return wrap


def _acquire(path: Path, out: Path) -> int:
    """An exclusive flock on `path` (created if need be) that still names the file at `path`; a lock held
    under a dead pid (a writer taking over or cleaning up a killed one's lock) is waited for, briefly."""
    attempts = 200
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise file_error(out.parent, f"output folder is not writable ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if not holder.isdigit() or not _alive(int(holder)):  # being taken over or cleaned up: a moment
                time.sleep(0.01)
                attempts -= 1
                if attempts > 0:
                    continue
            raise file_error(out, f"in use by pid {holder} (another dsel command writes it); wait for it to "
                                  "finish or choose another output") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            previous = os.pread(fd, 32, 0).decode(errors="replace").strip()
            if previous:
                log.info("%s: taking over the lock of pid %s, which is gone", out, previous)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # the previous holder removed that file after we opened it: lock the new one


def check_writable(out: str | os.PathLike) -> list[Path]:
    """One line, before any work, when output `out` cannot be written (read-only folder or filesystem).

    Creates the output's parent folder; returns the folders it created, deepest first (`remove_empty`).
    """
    out = Path(out).absolute()
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        remove_empty(created)
        raise file_error(out.parent, f"cannot create the output folder ({e.strerror})") from None
    for folder in [out.parent] + ([out] if out.is_dir() else []):
        probe = folder / f".dsel-write-probe-{os.getpid()}"
        try:
            os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            probe.unlink()
        except OSError as e:
            remove_empty(created)
            raise file_error(folder, f"output folder is not writable ({e.strerror})") from None
    return created


def check_free_space(out: str | os.PathLike, need: int, what: str = "the output") -> None:
    """One line, before any work, when the filesystem of `out` has less than `need` bytes free."""
    folder = Path(out).absolute()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < need:
        raise file_error(out, f"{what} needs about {need / 2**20:.1f} MiB but its filesystem has "
                              f"{free / 2**20:.1f} MiB free")


def remove_stale(out: str | os.PathLike) -> None:
    """Delete what killed writers of `out` left: `.<name>.tmp-PID` / `.<name>.*.tmp-PID` siblings of
    dead processes; a folder moved aside (`.<name>.old-PID`) just before a kill is moved back."""
    out = Path(out).absolute()
    if not out.parent.is_dir():
        return
    for path in sorted(out.parent.glob(f".{glob.escape(out.name)}.*")):
        if path.name.endswith(".lock"):
            remove_unheld_lock(path)
            continue
        match = _STALE.search(path.name)
        if not match or _alive(int(match.group(2))):
            continue
        if (path / STAGED).is_file():
            log.info("finishing the publishing of %s, interrupted by a kill", out)
            move_prefix_files(path, out)
        if match.group(1) == "old" and path.name == f".{out.name}.old-{match.group(2)}" and not out.exists():
            log.info("restoring %s, moved aside by a killed writer", out)
            os.replace(path, out)
            continue
        log.info("removing %s, left by a killed writer", path)
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (other than this one, whose leftovers are never in use here)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def publish_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling of folder `out`; when the block succeeds it replaces `out` as a
    unit, so readers see the old folder or the new one, never a mix. Hold `output_lock(out)` around it."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with previous_output_kept(out):
            yield tmp
            replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_unheld_lock(path: Path) -> None:
    """Delete a lock file no process holds (one a killed writer left, whatever its tag); a held one stays."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if holder.isdigit() and not _alive(int(holder)):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a writer taking it over right now keeps it
            log.info("removing %s, left by a killed writer", path)
            path.unlink(missing_ok=True)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)


@contextmanager
def publish_prefix(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging prefix (in a temporary sibling folder) for the files `<out>.*` of a dataset; when the
    block succeeds they replace the old ones as a unit: the old manifest `<out>.meta.json` goes first, the
    new one comes last, so the files beside a manifest are always one dataset. A kill while the files move
    is finished by the next writer of `out` (`remove_stale`). Hold `output_lock(out)` around it."""
    out = Path(out).absolute()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with previous_output_kept(out):
            yield tmp / out.name
            (tmp / STAGED).touch()  # complete: from here on the new dataset wins
            move_prefix_files(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


STAGED = "STAGED"  # in a staging folder of publish_prefix: its files are complete and to be moved in


def check_not_mid_publish(prefix: str | os.PathLike) -> None:
    """Refuse to read a dataset whose files are being moved into place (`publish_prefix`), or were when its
    writer was killed: until the move ends they are part old, part new."""
    prefix = Path(prefix)
    for staged in prefix.parent.glob(f".{glob.escape(prefix.name)}.tmp-*/{STAGED}"):
        raise file_error(prefix, f"is part old, part new: publishing it stopped midway ({staged.parent.name}); "
                                 "rerun the command that wrote it, which finishes the move")
MANIFEST = ".meta.json"
SIDECARS = (".docids.jsonl", ".domains.jsonl", ".fields.jsonl")  # optional: an old one the new dataset lacks goes


def move_prefix_files(staging: Path, out: Path) -> None:
    """Move the files `<staging>/<name>.*` onto `<out>.*`, the manifest last (see publish_prefix)."""
    staged = {p.name[len(out.name):]: p for p in staging.iterdir() if p.name.startswith(out.name + ".")}
    Path(f"{out}{MANIFEST}").unlink(missing_ok=True)
    for suffix in SIDECARS:
        if suffix not in staged:
            Path(f"{out}{suffix}").unlink(missing_ok=True)
    for suffix in sorted(staged, key=lambda s: s == MANIFEST):
        os.replace(staged[suffix], f"{out}{suffix}")
    shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def previous_output_kept(out: str | os.PathLike) -> Iterator[None]:
    """A full disk, quota or file-size limit while `out` is written: one line saying the old output is kept."""
    try:
        yield
    except OSError as e:
        if not out_of_space(e):
            raise
        raise file_error(out, f"could not be written ({e.strerror or e}); the previous output is kept") from None


def out_of_space(error: OSError) -> bool:
    """Whether a failed write is the machine's state, not a bug: a full disk or quota, a file size limit
    (errno, or numpy's short-write error, which carries none)."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    return error.errno is None and "requested and" in str(error) and "written" in str(error)


def replace_dir(new: Path, path: Path) -> None:
    """Move folder `new` onto `path`: an atomic swap where the kernel has one, else two renames (a kill
    between them leaves the old folder aside as `.<name>.old-PID`, which `remove_stale` moves back)."""
    new, path = Path(new), Path(path)
    if not path.exists():
        os.replace(new, path)
        return
    if _exchange(new, path):
        shutil.rmtree(new, ignore_errors=True)  # `new` now holds the old folder
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE)
    return result == 0


# ----- content digests -------------------------------------------------------------------------------
def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (the one such helper lives beside the tokenizer interface)."""
    from dsel.data.tokenizer import file_sha256

    return file_sha256(path)


def dataset_digest(prefix: str | os.PathLike) -> str:
    """Content digest of a Megatron dataset: sha256 of its .idx (every document length and offset)
    plus the .bin size; a headerless token file: its size and the sha256 of its first and last MiB."""
    prefix = str(prefix)
    if os.path.isfile(prefix + ".idx"):
        return f"idx:{file_digest(prefix + '.idx')[:32]}:bin:{os.path.getsize(prefix + '.bin')}"
    size = os.path.getsize(prefix)
    digest = hashlib.sha256()
    with open(prefix, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read(1 << 20))
    return f"file:{digest.hexdigest()[:32]}:size:{size}"


def tree_digest(folder: str | os.PathLike, skip: tuple[str, ...] = ()) -> str:
    """Content digest of every file under `folder` (relative names and bytes; a Megatron `.bin` by its
    size, its `.idx` by content), except hidden files and top-level entries named in `skip`."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        if rel.parts[0] in skip or any(part.startswith(".") for part in rel.parts):
            continue
        same_idx = path.suffix == ".bin" and path.with_suffix(".idx").is_file()
        content = f"size:{path.stat().st_size}" if same_idx else file_digest(path)
        digest.update(f"{rel}\0{content}\n".encode())
    return digest.hexdigest()[:32]


# ----- reuse keys: what a saved result was made from -------------------------------------------------
def differences(old, new, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) of every leaf in which two nested dicts differ."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return [] if old == new else [(prefix, old, new)]
    return [d for k in sorted(set(old) | set(new), key=str)
            for d in differences(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))]


def describe_differences(old, new) -> str:
    """The keys in which two reuse keys differ, for an error message: "inputs.data ['a'] -> ['b'], lr 0.1 -> 0.2"."""
    return ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in differences(old, new))
