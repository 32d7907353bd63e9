"""The reader layer: corpus files (local or any fsspec URL) -> documents, streamed.

Formats: jsonl / json / ndjson (optionally .gz or .zst), plain text (.txt, optionally .gz/.zst),
parquet, arrow (IPC stream or file) and a Hugging Face `save_to_disk` folder (its .arrow shards
in the order its state.json lists). Paths are local paths or fsspec URLs (`file://`, `memory://`,
`s3://` with s3fs, `hf://` with huggingface_hub); a directory is searched recursively and a glob
is expanded, both in sorted order.

Each document carries its id (the id field, else `<path relative to the input root>:<record>`,
unique across folders), its text, its domain (`domain_field`) and any `keep_fields`. A file is
read as `Piece`s: the whole file, or a byte range of an uncompressed line file, or a range of
parquet row groups, so large files split across workers; a record number inside a piece counts
from the piece's start and `Piece.record_offset` (known after the earlier pieces are read) makes
it global. Every malformed input is a DselError naming the file.
"""
from __future__ import annotations

import gzip
import io
import json
import posixpath
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from dsel.errors import DselError, file_error

COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
LINE_KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".txt": "text"}
TABLE_KINDS = {".parquet": "parquet", ".arrow": "arrow"}
OWN_OUTPUT_SUFFIXES = (".docids.jsonl", ".domains.jsonl", ".fields.jsonl", ".meta.json")  # never an input
OWN_SHARDS = ".shards/"  # `dsel tokenize`'s work folder (dsel.data.shards): never an input
HF_STATE = "state.json"
HF_DATASET_DICT = "dataset_dict.json"
KNOWN = ".jsonl, .json, .ndjson, .txt (each optionally .gz/.zst), .parquet, .arrow or a save_to_disk folder"


@dataclass(frozen=True)
class InputFile:
    """One corpus file: `url` reopens it in any process, `rel` (relative to the input root) names it in ids."""

    url: str
    rel: str
    kind: str  # jsonl | text | parquet | arrow
    compression: str | None
    size: int


@dataclass(frozen=True)
class Piece:
    """Part of a file: bytes [start, end) of an uncompressed line file, row groups [start, end) of a
    parquet file, or the whole file (start=0, end=None)."""

    file: InputFile
    start: int = 0
    end: int | None = None


@dataclass
class Document:
    """A document of the corpus. `record` counts from the start of its piece."""

    record: int
    text: str
    id: str | None = None  # from the id field, when set
    domain: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReadSettings:
    """What to take from each record (the same names as the tokenize options)."""

    text_field: str = "text"
    id_field: str = ""
    domain_field: str = ""
    keep_fields: tuple[str, ...] = ()
    text_unit: str = "line"  # plain text: one document per non-empty line, or per file


def settings_of(cfg) -> ReadSettings:
    """ReadSettings from any config carrying the tokenize option names."""
    return ReadSettings(cfg.text_field, getattr(cfg, "id_field", ""), getattr(cfg, "domain_field", ""),
                        tuple(getattr(cfg, "keep_fields", ()) or ()), getattr(cfg, "text_unit", "line"))


# ---- finding the files ----

def _filesystem(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:  # an fsspec protocol whose package is not installed
        raise DselError(f"{url}: cannot open this URL ({str(e).splitlines()[0]})") from None


def input_files(pattern: str) -> list[InputFile]:
    """The corpus files named by a file, a directory (searched recursively), a glob or a
    save_to_disk folder, local or fsspec URL, in sorted order."""
    fs, path = _filesystem(str(pattern))
    if any(ch in path for ch in "*?["):
        root = path[: min(path.index(ch) for ch in "*?[" if ch in path)].rpartition("/")[0]
        paths = sorted(p for p in fs.glob(path) if fs.isfile(p))
        if not paths:
            raise DselError(f"{pattern}: the glob matches no files")
    elif fs.isdir(path):
        root = path.rstrip("/")
        paths = _hf_arrow_files(fs, root, pattern)
        if paths is None:
            paths = sorted(p for p in fs.find(root) if _kind(p) is not None and OWN_SHARDS not in p)
        if not paths:
            raise DselError(f"{pattern}: no input files found in the directory (expected {KNOWN})")
    elif fs.isfile(path):
        root, paths = posixpath.dirname(path), [path]
    else:
        raise DselError(f"{pattern}: input file not found")
    files = []
    for p in paths:
        kind = _kind(p)
        if kind is None:
            raise DselError(f"{_display(fs, p)}: unknown input format (expected {KNOWN})")
        rel = posixpath.relpath(p, root) if root else p
        files.append(InputFile(_display(fs, p), rel, kind[0], kind[1], int(fs.size(p) or 0)))
    return files


def _display(fs, path: str) -> str:
    """A local path as it is; anything else as a full URL (double slashes kept)."""
    from fsspec.implementations.local import LocalFileSystem

    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _kind(path: str) -> tuple[str, str | None] | None:
    """(kind, compression) from the file name; None for unknown names and dsel's own sidecars."""
    name = posixpath.basename(path).lower()
    if name.endswith(OWN_OUTPUT_SUFFIXES) or name.startswith("."):
        return None
    stem, compression = name, None
    for suffix, codec in COMPRESSIONS.items():
        if name.endswith(suffix):
            stem, compression = name[: -len(suffix)], codec
    ext = posixpath.splitext(stem)[1]
    if ext in LINE_KINDS:
        return LINE_KINDS[ext], compression
    if ext in TABLE_KINDS and compression is None:
        return TABLE_KINDS[ext], None
    return None


def _hf_arrow_files(fs, root: str, pattern: str) -> list[str] | None:
    """The .arrow shards of a `datasets` save_to_disk folder in their order; None if it is not one."""
    if fs.isfile(f"{root}/{HF_DATASET_DICT}"):
        splits = _json_file(fs, f"{root}/{HF_DATASET_DICT}").get("splits", [])
        raise DselError(f"{pattern}: a DatasetDict folder (splits: {', '.join(splits)}); give one split's folder, "
                        f"e.g. {pattern.rstrip('/')}/{splits[0] if splits else 'train'}")
    if not fs.isfile(f"{root}/{HF_STATE}"):
        return None
    state = _json_file(fs, f"{root}/{HF_STATE}")
    names = [entry.get("filename") for entry in state.get("_data_files", []) if isinstance(entry, dict)]
    if not names or not all(isinstance(n, str) for n in names):
        raise DselError(f"{_display(fs, root + '/' + HF_STATE)}: lists no data files (_data_files)")
    paths = [f"{root}/{name}" for name in names]
    for p in paths:
        if not fs.isfile(p):
            raise DselError(f"{_display(fs, p)}: listed in {HF_STATE} but not found")
    return paths


def _json_file(fs, path: str) -> dict:
    try:
        with fs.open(path, "rb") as f:
            data = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DselError(f"{_display(fs, path)}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DselError(f"{_display(fs, path)}: expected a JSON object")
    return data


# ---- splitting files into pieces ----

def pieces_of(file: InputFile, piece_bytes: int, settings: ReadSettings) -> list[Piece]:
    """The file as pieces of about `piece_bytes`: byte ranges of an uncompressed line file (not
    text_unit=file), row-group ranges of a parquet file, else the whole file."""
    if file.size <= piece_bytes:
        return [Piece(file)]
    if file.compression is None and (file.kind == "jsonl" or (file.kind == "text" and settings.text_unit == "line")):
        return [Piece(file, start, min(start + piece_bytes, file.size)) for start in range(0, file.size, piece_bytes)]
    if file.kind == "parquet":
        with _parquet_file(file) as pf:
            groups = pf.metadata
        pieces, first, size = [], 0, 0
        for g in range(groups.num_row_groups):
            size += groups.row_group(g).total_byte_size
            if size >= piece_bytes or g == groups.num_row_groups - 1:
                pieces.append(Piece(file, first, g + 1))
                first, size = g + 1, 0
        return pieces
    return [Piece(file)]


# ---- reading ----

class Counter:
    """Share of a piece read so far, in [0, 1] (of its compressed bytes for a compressed file)."""

    def __init__(self):
        self.fraction = 0.0


def read_piece(piece: Piece, settings: ReadSettings, counter: Counter | None = None) -> Iterator[Document]:
    """Every record of a piece as a Document (empty texts included; `record` counts lines/rows from
    the piece's start, blank lines included, so numbering matches the file's)."""
    kind = piece.file.kind
    if kind == "jsonl":
        return _read_jsonl(piece, settings, counter)
    if kind == "text":
        return _read_text(piece, settings, counter)
    return _read_table(piece, settings, counter)


def _open_binary(file: InputFile):
    import fsspec

    try:
        return fsspec.open(file.url, "rb").open()
    except FileNotFoundError:
        raise file_error(file.url, "input file not found") from None


def _decompressed(raw, file: InputFile) -> io.BufferedIOBase:
    if file.compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if file.compression == "zstd":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False))
    return raw


def _lines(piece: Piece, counter: Counter | None) -> Iterator[bytes]:
    """Raw lines of a piece (a line belongs to the piece holding its first byte); decompression and
    truncation errors name the file."""
    file = piece.file
    import zstandard

    raw = _open_binary(file)
    try:
        stream = _decompressed(raw, file)
        if piece.start:
            raw.seek(piece.start - 1)
            raw.readline()  # finish the line that started in the previous piece
        end = file.size if piece.end is None else piece.end
        while piece.end is None or raw.tell() < end:
            line = stream.readline()
            if not line:
                break
            if counter is not None:
                counter.fraction = min(1.0, (raw.tell() - piece.start) / max(1, end - piece.start))
            yield line
    except (EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError) as e:
        problem = "truncated compressed file" if isinstance(e, EOFError) else f"not a valid {file.compression} file"
        raise file_error(file.url, f"{problem} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    finally:
        raw.close()


def _decode(line: bytes, file: InputFile, line_no: int) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise file_error(file.url, f"line {line_no + 1} is not UTF-8 text (byte {line[e.start]:#04x} at column {e.start + 1})") from None


def _read_jsonl(piece: Piece, settings: ReadSettings, counter: Counter | None) -> Iterator[Document]:
    file = piece.file
    for line_no, line in enumerate(_lines(piece, counter)):
        text = _decode(line, file, line_no)
        if not text.strip():
            yield Document(line_no, "")
            continue
        where = f"line {line_no + 1}" if piece.start == 0 else f"line {line_no + 1} after byte {piece.start}"
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise file_error(file.url, f"{where} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(settings.text_field), str):
            raise file_error(file.url, f"{where} has no string field '{settings.text_field}'")
        yield _document(record, line_no, settings, file, where)


def _read_text(piece: Piece, settings: ReadSettings, counter: Counter | None) -> Iterator[Document]:
    file = piece.file
    lines = (_decode(line, file, k) for k, line in enumerate(_lines(piece, counter)))
    if settings.text_unit == "file":
        yield Document(0, "".join(lines))
        return
    for line_no, line in enumerate(lines):
        yield Document(line_no, line.rstrip("\n") if line.strip() else "")


def _document(record: dict, number: int, settings: ReadSettings, file: InputFile, where: str) -> Document:
    doc = Document(number, record[settings.text_field])
    if settings.id_field:
        if record.get(settings.id_field) is None:
            raise file_error(file.url, f"{where} has no id field '{settings.id_field}'")
        doc.id = str(record[settings.id_field])
    if settings.domain_field:
        if record.get(settings.domain_field) is None:
            raise file_error(file.url, f"{where} has no domain field '{settings.domain_field}'")
        doc.domain = str(record[settings.domain_field])
    doc.fields = {name: record.get(name) for name in settings.keep_fields}
    return doc


@contextmanager
def _parquet_file(file: InputFile):
    import pyarrow.parquet as pq

    handle = _open_binary(file)
    try:
        try:
            parquet = pq.ParquetFile(handle)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise file_error(file.url, f"not a readable parquet file ({str(e).splitlines()[0]})") from None
        yield parquet
    finally:
        handle.close()


@contextmanager
def _table_batches(piece: Piece, columns: list[str]):
    """(schema, record batches, rows) of a parquet row-group range or an arrow IPC stream/file
    (what `datasets` writes); rows is None when unknown up front."""
    import pyarrow as pa

    file = piece.file
    if file.kind == "parquet":
        with _parquet_file(file) as pf:
            meta = pf.metadata
            groups = list(range(piece.start, meta.num_row_groups if piece.end is None else piece.end))
            schema = pf.schema_arrow
            batches = pf.iter_batches(batch_size=4096, row_groups=groups, columns=_present(columns, schema))
            yield schema, _guarded(batches, file), sum(meta.row_group(g).num_rows for g in groups)
        return
    handle = _open_binary(file)
    try:
        try:
            reader = pa.ipc.open_stream(handle)
            batches = iter(reader)
        except pa.ArrowInvalid:
            handle.seek(0)
            try:
                reader = pa.ipc.open_file(handle)
            except pa.ArrowInvalid as e:
                raise file_error(file.url, f"not a readable arrow file ({str(e).splitlines()[0]})") from None
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        yield reader.schema, _guarded(batches, file), None
    finally:
        handle.close()


def _guarded(batches, file: InputFile):
    """Batches, with a damaged or truncated file reported as a DselError naming it."""
    import pyarrow as pa

    try:
        yield from batches
    except (pa.ArrowInvalid, OSError) as e:
        raise file_error(file.url, f"truncated or damaged {file.kind} file ({str(e).splitlines()[0]})") from None


def _read_table(piece: Piece, settings: ReadSettings, counter: Counter | None) -> Iterator[Document]:
    """Rows of a parquet row-group range or an arrow file, the text column checked to hold text."""
    import pyarrow as pa

    file = piece.file
    names = [n for n in (settings.text_field, settings.id_field, settings.domain_field) if n] + list(settings.keep_fields)
    with _table_batches(piece, names) as (schema, batches, rows):
        missing = [n for n in names[: len(names) - len(settings.keep_fields)] if n not in schema.names]
        if missing:
            raise file_error(file.url, f"no column(s) {', '.join(missing)} (has {', '.join(schema.names)})")
        kind = schema.field(settings.text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
            raise file_error(file.url, f"column '{settings.text_field}' holds {kind}, not text")
        number = 0
        for batch in batches:
            data = {n: batch.column(n).to_pylist() for n in dict.fromkeys(names) if n in batch.schema.names}
            for k in range(batch.num_rows):
                record = {n: values[k] for n, values in data.items()}
                if record.get(settings.text_field) is None:
                    record[settings.text_field] = ""
                yield _document(record, number, settings, file, f"row {number}")
                number += 1
            if counter is not None and rows:
                counter.fraction = number / rows


def _present(names: list[str], schema) -> list[str]:
    return [n for n in dict.fromkeys(names) if n in schema.names]


def read_documents(files: list[InputFile], cfg) -> Iterator[tuple[str, str]]:
    """(id, text) of every non-empty document of every file, in order (ids as in `document_id`)."""
    settings = settings_of(cfg)
    for file in files:
        for doc in read_piece(Piece(file), settings):
            if doc.text.strip():
                yield document_id(doc, file, doc.record), doc.text


def document_id(doc: Document, file: InputFile, record: int) -> str:
    """The id field's value, else `<path relative to the input root>:<record number in the file>`."""
    return doc.id if doc.id is not None else f"{file.rel}:{record}"
