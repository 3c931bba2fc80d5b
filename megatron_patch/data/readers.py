"""Reading input files into raw records, one at a time, each tagged with where it came from.

A reader never raises for a bad record: a line that is not JSON comes out as a RawRecord with an
`error`, so the converter can skip it, report it with its file and line, and go on. Containers:
`.json` (a list, or one object), `.jsonl`, `.parquet`, and a folder of per-sample `.json` files.
Text is UTF-8, with or without the byte-order mark some Windows tools write.
"""
import codecs
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from megatron_patch.data.errors import BadRecord
from megatron_patch.data.json_stream import JsonStream, JsonSyntaxError

CONTAINER_FORMATS = ("json", "jsonl", "parquet", "folder")
_SIBLING_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
_PARQUET_IMAGE_COLUMNS = ("images", "image", "image_bytes")
_PARQUET_MESSAGE_COLUMNS = ("messages", "conversations")


@dataclass
class RawRecord:
    """One record as read; `search_dirs` are where its relative image paths may live."""
    source: str                      # "file:line" or "file#index (line N)", for reports
    record: Any = None
    search_dirs: tuple = ()
    error: Optional[BadRecord] = None
    fallback_id: Any = None


@dataclass
class ReaderOptions:
    image_root: Optional[str] = None
    messages_column: Optional[str] = None
    image_column: Optional[str] = None
    container: Optional[str] = None  # force one of CONTAINER_FORMATS


def container_of(path: str, forced: Optional[str] = None) -> str:
    if forced:
        return forced
    if os.path.isdir(path):
        return "folder"
    lower = path.lower()
    if lower.endswith(".jsonl") or lower.endswith(".ndjson"):
        return "jsonl"
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith(".json"):
        return "json"
    raise SystemExit(f"error: cannot tell the format of input {path!r}: expected a .json, .jsonl, "
                     ".parquet file or a folder (or pass --input-format)")


def read_records(path: str, options: ReaderOptions) -> Iterator[RawRecord]:
    if not os.path.exists(path):
        raise SystemExit(f"error: input not found: {path}")
    readers = {"json": _read_json, "jsonl": _read_jsonl, "parquet": _read_parquet,
               "folder": _read_folder}
    yield from readers[container_of(path, options.container)](path, options)


def _search_dirs(path: str, options: ReaderOptions) -> tuple:
    base = os.path.dirname(os.path.abspath(path))
    return tuple(d for d in (options.image_root, base) if d)


# the skip kind of an error that ends a whole .json file: one skip stands for every record after
# it (counted apart from line-level JSON errors, so the summary can say so)
FILE_CUT_SHORT = "invalid_json_file"


def _read_json(path: str, options: ReaderOptions) -> Iterator[RawRecord]:
    """A JSON array, read one record at a time (json_stream), or a single object. A file of one
    object per line named .json is read as JSON Lines. A syntax error ends the file with one
    bad record naming its line; the records before it are converted."""
    dirs = _search_dirs(path, options)
    name, count = os.path.basename(path), 0
    try:
        with open(path, encoding="utf-8-sig") as handle:
            stream = JsonStream(handle)
            if stream.peek() == "[":
                for count, (line, record) in enumerate(stream.array_items(), start=1):
                    index = count - 1
                    yield RawRecord(f"{path}#{index} (line {line})", record, dirs,
                                    fallback_id=f"{name}#{index}")
                if stream.peek():
                    raise stream.syntax_error("extra data after the array's closing ']'")
                return
            record = stream.value()
            if stream.line == 1 and stream.peek():
                yield from _read_jsonl(path, options)  # one object per line
                return
            if stream.peek():
                raise stream.syntax_error("extra data after the first value (a JSON file holds "
                                          "one array; for one record per line name it .jsonl)")
            count = 1
            yield RawRecord(f"{path}#0 (line 1)", record, dirs, fallback_id=f"{name}#0")
    except JsonSyntaxError as error:
        yield RawRecord(f"{path}:{error.line}", search_dirs=dirs, error=BadRecord(
            f"file is not valid JSON at {error}; {_read_so_far(count)}", FILE_CUT_SHORT))
    except UnicodeDecodeError as error:
        yield RawRecord(path, search_dirs=dirs, error=BadRecord(
            f"file is not UTF-8 text (byte {error.object[error.start:error.start + 1]!r}: "
            f"{error.reason}); {_read_so_far(count)}", FILE_CUT_SHORT))


def _read_so_far(count: int) -> str:
    if not count:
        return "no record was read from it (fix the file and convert again)"
    return (f"{count} record(s) were read from it, the rest of the file was not (fix the file "
            "and convert again)")


def _read_jsonl(path: str, options: ReaderOptions) -> Iterator[RawRecord]:
    """One record per non-empty line. A line that is not UTF-8 or not JSON is a bad record
    (named by its line number), never a silently altered one."""
    dirs = _search_dirs(path, options)
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            if not raw.strip():
                continue
            source = f"{path}:{number}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                yield RawRecord(source, search_dirs=dirs, error=BadRecord(
                    f"line is not UTF-8 text (byte {error.object[error.start:error.start + 1]!r} "
                    f"at column {error.start + 1}: {error.reason}); save the file as UTF-8",
                    "invalid_json"))
                continue
            except json.JSONDecodeError as error:
                yield RawRecord(source, search_dirs=dirs, error=BadRecord(
                    f"line is not valid JSON: {error.msg} at column {error.pos + 1}",
                    "invalid_json"))
                continue
            yield RawRecord(source, record, dirs, fallback_id=f"{os.path.basename(path)}:{number}")


def _pick_column(names, forced: Optional[str], candidates, what: str, path: str) -> str:
    if forced:
        if forced not in names:
            raise SystemExit(f"error: {path} has no column {forced!r} for {what}; "
                             f"columns: {', '.join(names)}")
        return forced
    for name in candidates:
        if name in names:
            return name
    raise SystemExit(f"error: {path}: cannot find the {what} column among {', '.join(names)}; "
                     f"name it with --{what}-column")


def _read_parquet(path: str, options: ReaderOptions) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    dirs = _search_dirs(path, options)
    table = pq.ParquetFile(path)
    names = table.schema_arrow.names
    text_column = _pick_column(names, options.messages_column, _PARQUET_MESSAGE_COLUMNS,
                               "messages", path)
    image_column = _pick_column(names, options.image_column, _PARQUET_IMAGE_COLUMNS, "image", path) \
        if (options.image_column or any(c in names for c in _PARQUET_IMAGE_COLUMNS)) else None
    row_number = 0
    for batch in table.iter_batches(batch_size=256):
        for row in batch.to_pylist():
            source = f"{path}#row{row_number}"
            row_number += 1
            try:
                yield RawRecord(source, _parquet_row_record(row, text_column, image_column), dirs,
                                fallback_id=f"{os.path.basename(path)}#row{row_number - 1}")
            except BadRecord as error:
                yield RawRecord(source, search_dirs=dirs, error=error)


def _parquet_row_record(row: dict, text_column: str, image_column: Optional[str]) -> dict:
    turns = row[text_column]
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as error:
            raise BadRecord(f"column {text_column!r} is not valid JSON: {error}", "invalid_json")
    first = turns[0] if isinstance(turns, list) and turns else {}
    key = "messages" if isinstance(first, dict) and "role" in first else "conversations"
    record = {key: turns}
    if row.get("id") is not None:
        record["id"] = row["id"]
    if image_column and row.get(image_column) is not None:
        images = row[image_column]
        record["images"] = images if isinstance(images, list) else [images]
    return record


def _read_folder(path: str, options: ReaderOptions) -> Iterator[RawRecord]:
    """One sample per .json file; its image is `image_url`/`image` or a sibling of the same stem."""
    json_files = sorted(os.path.join(root, name) for root, _, files in os.walk(path)
                        for name in files if name.lower().endswith(".json"))
    for json_path in json_files:
        dirs = tuple(d for d in (options.image_root, os.path.dirname(json_path)) if d)
        fallback = os.path.relpath(json_path, path)
        try:
            with open(json_path, encoding="utf-8-sig") as handle:
                record = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            yield RawRecord(json_path, search_dirs=dirs,
                            error=BadRecord(f"file is not valid JSON: {error}", "invalid_json"))
            continue
        if isinstance(record, dict) and not any(k in record for k in ("image", "images", "image_url",
                                                                        "image_base64")):
            sibling = _sibling_image(json_path)
            if sibling:
                record = {**record, "image": sibling}
        yield RawRecord(json_path, record, dirs, fallback_id=fallback)


def _sibling_image(json_path: str) -> Optional[str]:
    stem = os.path.splitext(json_path)[0]
    for ext in _SIBLING_IMAGE_EXTENSIONS:
        for candidate in (stem + ext, stem + ext.upper()):
            if os.path.isfile(candidate):
                return candidate
    return None
