"""The per-pair score table that `nlip-ds audit` writes and `nlip-ds data filter` reads.

One row per pair, columns as plain lists (docs/audit.md lists them). Stored as Parquet when pyarrow is
importable (columnar, typed, readable by pandas, DuckDB, Spark: what curation pipelines load), else as JSON
Lines with one object per row. Files are written to a temporary name and renamed, so a reader never sees half
a table.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

FORMATS = ("auto", "parquet", "jsonl")


def have_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_format(fmt: str) -> str:
    """"parquet" or "jsonl"; "auto" picks Parquet when pyarrow is importable. An explicit "parquet" without
    pyarrow raises, naming the package to install."""
    if fmt not in FORMATS:
        raise ValueError(f"score format {fmt!r} is not one of {FORMATS}")
    if fmt == "auto":
        return "parquet" if have_pyarrow() else "jsonl"
    if fmt == "parquet" and not have_pyarrow():
        raise ValueError("--format parquet needs pyarrow (pip install pyarrow); or use --format jsonl")
    return fmt


def write_table(columns: dict[str, list], out_dir: Path, fmt: str = "auto") -> Path:
    """Write `columns` (equal-length lists) as OUT/scores.parquet or OUT/scores.jsonl; returns the path."""
    fmt = resolve_format(fmt)
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"score columns differ in length: {lengths}")
    out = Path(out_dir) / f"scores.{fmt}"
    tmp = out.with_name(f".{out.name}.tmp")
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(columns), tmp)
    else:
        names = list(columns)
        with tmp.open("w", encoding="utf-8") as f:
            for row in zip(*columns.values()):
                f.write(json.dumps(dict(zip(names, row)), ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return out


def read_table(path) -> dict[str, list]:
    """Columns of a scores.parquet or scores.jsonl file (by suffix)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scores file {path} does not exist")
    if path.suffix == ".parquet":
        if not have_pyarrow():
            raise ValueError(f"reading {path} needs pyarrow (pip install pyarrow)")
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pydict()
    if path.suffix != ".jsonl":
        raise ValueError(f"scores file {path}: expected a .parquet or .jsonl file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    raise ValueError(f"{path} line {number}: not JSON ({exc})") from None
    names = list(dict.fromkeys(k for row in rows for k in row))
    return {name: [row.get(name) for row in rows] for name in names}
