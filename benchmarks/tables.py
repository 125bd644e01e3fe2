"""Shared by the benchmark scripts: write a list of row dicts as a CSV file."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


def write_rows(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write ``rows`` (dicts with the same keys) to ``path`` as CSV, creating its folder; print and return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")
    return path
