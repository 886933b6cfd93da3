"""Feature tables in and out: CSV with a header, or JSON lines with the features as keys.

Read in chunks so a large file never sits in memory whole. Missing values (an empty CSV cell,
``NA``/``NaN``, JSON ``null``) become NaN, for the model's NaN policy to decide; anything that is
not a number is an :class:`~runtime.errors.InputError` naming the row, the column and the line.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TextIO

import numpy as np

from runtime.errors import InputError

__all__ = ["Chunk", "Format", "TableReader", "TableWriter", "detect_format"]

Format = Literal["csv", "jsonl"]
_MISSING = frozenset({"", "na", "nan", "null", "none"})
_EXTENSIONS: dict[str, Format] = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}


def detect_format(name: str | None, first_line: str) -> Format:
    """By file extension when there is one we know, else by the first character of the data."""
    if name:
        for ext, fmt in _EXTENSIONS.items():
            if name.lower().endswith(ext):
                return fmt
    return "jsonl" if first_line.lstrip("\ufeff \t").startswith("{") else "csv"


@dataclass
class Chunk:
    X: np.ndarray  # [n, d] float64, NaN where a value is missing
    records: list[Any]  # CSV: the row's cells; JSON lines: the decoded object
    lines: list[int]  # source line of each row (1-based)
    first_row: int  # index of the chunk's first data row in the whole input (0-based)


def _csv_number(v: str, row: int, column: str, line: int) -> float:
    t = v.strip()
    if t.lower() in _MISSING:
        return math.nan
    try:
        return float(t)
    except ValueError:
        raise InputError(f"{v[:80]!r} is not a number (input line {line})", row=row, column=column) from None


def _json_number(v: Any, row: int, column: str, line: int) -> float:
    if v is None:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise InputError(f"{json.dumps(v)[:80]} is not a number (input line {line})", row=row, column=column)
    try:
        return float(v)
    except OverflowError:
        raise InputError(f"{str(v)[:40]}… is too large (input line {line})", row=row, column=column) from None


class TableReader:
    """Iterate a CSV or JSON-lines stream in chunks of feature rows."""

    def __init__(
        self,
        stream: Iterable[str],
        features: Sequence[str],
        *,
        fmt: Format | None = None,
        name: str | None = None,
        chunk_rows: int = 8192,
    ) -> None:
        self.features = tuple(features)
        self.chunk_rows = max(1, chunk_rows)
        lines = iter(stream)
        head: list[str] = []
        for line in lines:  # skip leading blank lines, keep them for line numbers
            head.append(line)
            if line.strip():
                break
        self._line_offset = len(head) - 1
        self.fmt: Format = fmt or detect_format(name, head[-1] if head else "")
        self._lines: Iterator[str] = itertools.chain(head[-1:], lines)
        self.header: list[str] | None = None
        self._cols: list[int] = []
        if self.fmt == "csv":
            self._csv = csv.reader(self._lines)
            try:
                header = next(self._csv)
            except StopIteration:
                raise InputError("the input is empty (a CSV needs a header naming the features)") from None
            except csv.Error as exc:
                raise InputError(f"the CSV header cannot be read: {exc}") from None
            self.header = [h.strip().lstrip("\ufeff") for h in header]
            missing = [f for f in self.features if f not in self.header]
            if missing:
                raise InputError(f"the input has no column for features {missing} (its columns: {self.header})")
            self._cols = [self.header.index(f) for f in self.features]

    def __iter__(self) -> Iterator[Chunk]:
        rows = self._csv_rows() if self.fmt == "csv" else self._json_rows()
        row = 0
        while True:
            batch = list(itertools.islice(rows, self.chunk_rows))
            if not batch:
                return
            X = np.empty((len(batch), len(self.features)), dtype=np.float64)
            parse = _csv_number if self.fmt == "csv" else _json_number
            for i, (line, _, values) in enumerate(batch):
                for j, (name, v) in enumerate(zip(self.features, values, strict=True)):
                    X[i, j] = parse(v, row + i, name, line)
            yield Chunk(X, [rec for _, rec, _ in batch], [line for line, _, _ in batch], row)
            row += len(batch)

    def _csv_rows(self) -> Iterator[tuple[int, list[str], list[str]]]:
        assert self.header is not None
        width = len(self.header)
        row = 0
        while True:
            try:
                cells = next(self._csv)
            except StopIteration:
                return
            except csv.Error as exc:
                line = self._csv.line_num + self._line_offset
                raise InputError(f"malformed CSV (input line {line}): {exc}", row=row) from None
            line = self._csv.line_num + self._line_offset
            if not cells or (len(cells) == 1 and not cells[0].strip()):
                continue
            if len(cells) != width:
                raise InputError(f"{len(cells)} cells for {width} columns (input line {line})", row=row)
            yield line, cells, [cells[c] for c in self._cols]
            row += 1

    def _json_rows(self) -> Iterator[tuple[int, dict[str, Any], list[Any]]]:
        row = 0
        for n, text in enumerate(self._lines, start=1 + self._line_offset):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except ValueError as exc:
                raise InputError(f"not valid JSON (input line {n}): {exc}", row=row) from None
            if not isinstance(obj, dict):
                raise InputError(f"a JSON line must be an object with the features as keys (input line {n})", row=row)
            missing = [f for f in self.features if f not in obj]
            if missing:
                raise InputError(f"features {missing} are missing (input line {n})", row=row)
            yield n, obj, [obj[f] for f in self.features]
            row += 1


class TableWriter:
    """Write rows back with a ``y_pred`` column (CSV) or field (JSON lines)."""

    def __init__(
        self, stream: TextIO, fmt: Format, header: Sequence[str] | None = None, column: str = "y_pred"
    ) -> None:
        self.fmt = fmt
        self.column = column
        self.stream = stream
        if fmt == "csv":
            if header is None:
                raise ValueError("a CSV writer needs the input's header")
            self._csv = csv.writer(stream, lineterminator="\n")
            self._header = list(header)
            self._at = self._header.index(column) if column in self._header else None
            self._csv.writerow(self._header if self._at is not None else [*self._header, column])

    def write(self, records: Sequence[Any], y_pred: np.ndarray) -> None:
        values = y_pred.tolist()
        if self.fmt == "csv":
            out = []
            for cells, y in zip(records, values, strict=True):
                cells = list(cells)
                if self._at is None:
                    cells.append(repr(y))
                else:
                    cells[self._at] = repr(y)
                out.append(cells)
            self._csv.writerows(out)
        else:
            for obj, y in zip(records, values, strict=True):
                obj[self.column] = y
                self.stream.write(json.dumps(obj, ensure_ascii=False) + "\n")
