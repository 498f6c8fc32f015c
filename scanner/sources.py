"""Input listings: a folder of images, or a CSV / Parquet table with a `path` column.

Listings are sorted and resolved once, so the same input always yields the same items in
the same order (which is what makes shards deterministic and resumable).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def read_table(path: Path) -> pd.DataFrame:
    if path.suffix.lower() == ".parquet":
        return pd.read_parquet(path)
    if path.suffix.lower() in (".csv", ".tsv"):
        return pd.read_csv(
            path, sep="\t" if path.suffix.lower() == ".tsv" else ",", keep_default_na=False
        )
    raise ValueError(f"{path}: expected a folder of images or a .csv/.tsv/.parquet table")


def list_images(src: str | Path, text_column: str) -> pd.DataFrame:
    """Columns `path` (absolute) and `text_column` ("" when absent), plus any extra table columns.

    For a folder, the text of `a.png` is read from a sidecar `a.txt` when there is one; a
    table's relative paths are taken relative to the table's folder.
    """
    src = Path(src).resolve()  # absolute paths: the tables must name files from any directory
    if src.is_dir():
        files = sorted(
            p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        texts = []
        for p in files:
            side = p.with_suffix(".txt")
            texts.append(
                side.read_text(encoding="utf-8", errors="replace").strip() if side.exists() else ""
            )
        table = pd.DataFrame({"path": [str(p) for p in files], text_column: texts})
        table["rel"] = [str(p.relative_to(src)) for p in files]
        return table
    if not src.exists():
        raise ValueError(f"{src}: no such file or folder")
    table = read_table(src)
    if "path" not in table.columns:
        raise ValueError(f"{src}: needs a 'path' column; found {list(table.columns)}")
    table = table.copy()
    table["rel"] = table["path"].astype(str)
    table["path"] = [
        str(p if Path(p).is_absolute() else src.parent / p) for p in table["path"].astype(str)
    ]
    if text_column not in table.columns:
        table[text_column] = ""
    table[text_column] = table[text_column].fillna("").astype(str)
    return table
