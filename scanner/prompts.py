"""Prompt sets: the bundled LAION sets by name, or a user's CSV / Parquet / text file.

Prompts are validated here, at the edge: an empty, non-text or duplicate prompt becomes a
row with an `error` (and so a row of the scan's `errors` table), never a silent drop.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import pandas as pd

BUNDLED = {
    "memorized": "memorized_laion_prompts.csv",  # 500 prompts SD v1.4 memorizes (Webster 2023)
    "unmemorized": "unmemorized_laion_prompts.csv",  # 500 control prompts
}
# The memorization organism's captions (scanner/organism): all of them, and the held-out
# unrelated ones (its non-memorized captions: NeMo's holdout statistics for the organism).
ORGANISM_SETS = {"organism": None, "organism-holdout": "heldout-unrelated"}
TEXT_COLUMNS = ("prompt", "caption", "Caption", "text")


def _bundled(name: str) -> pd.DataFrame:
    """A bundled set; its expected label goes to `designed`: the memorized set's VM/TM type
    (verbatim / template memorization, Webster 2023), NM for the control set."""
    path = files("scanner") / "data" / BUNDLED[name]
    table = pd.read_csv(str(path), sep=";", index_col=0, keep_default_na=False)
    table = table.rename(columns={"Caption": "prompt"}).reset_index(drop=True)
    table["designed"] = table["type"] if "type" in table.columns else "NM"
    return table


def _organism(group: str | None) -> pd.DataFrame:
    from scanner.organism import ORGANISM_CAPTIONS

    table = pd.read_csv(ORGANISM_CAPTIONS, keep_default_na=False)
    return table if group is None else table[table["group"] == group].reset_index(drop=True)


def _error(message: str) -> str:
    return json.dumps({"stage": "prompts", "error_type": "ValueError", "message": message})


def _read_file(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(path)
    if suffix in (".csv", ".tsv"):
        sep = "\t" if suffix == ".tsv" else None  # None: sniff "," or ";"
        return pd.read_csv(
            path, sep=sep, engine="python", keep_default_na=False, encoding_errors="replace"
        )
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the final newline ends the last prompt; it does not start an empty one
    # Bytes, decoded in load_prompts, so a line that is not UTF-8 becomes that row's error.
    return pd.DataFrame({"prompt": [line.rstrip(b"\r") for line in lines]}, dtype=object)


def load_prompts(spec: str, limit: int | None = None) -> pd.DataFrame:
    """Columns prompt_id (int64), prompt (str), error ("" when usable), plus source columns.

    `spec` is a bundled set name (memorized, unmemorized; organism, organism-holdout) or a file: CSV/TSV/Parquet with a
    prompt column (prompt, caption or text; optional prompt_id), or a text file with one
    prompt per line. `limit` keeps the first rows (for demos and dry runs).
    """
    if spec in BUNDLED:
        table = _bundled(spec)
    elif spec in ORGANISM_SETS:
        table = _organism(ORGANISM_SETS[spec])
    else:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(
                f"prompts {spec!r}: not a bundled set "
                f"({', '.join([*BUNDLED, *ORGANISM_SETS])}) and no such file"
            )
        table = _read_file(path)
    column = next((c for c in TEXT_COLUMNS if c in table.columns), None)
    if column is None:
        raise ValueError(
            f"prompts {spec!r}: no prompt column; expected one of {TEXT_COLUMNS}, found {list(table.columns)}"
        )
    table = table.rename(columns={column: "prompt"})
    if limit is not None:
        table = table.head(limit)
    table = table.reset_index(drop=True)
    if "prompt_id" not in table.columns:
        table.insert(0, "prompt_id", range(len(table)))
    table["prompt_id"] = pd.to_numeric(table["prompt_id"], errors="raise").astype("int64")
    errors, texts = [], []
    seen: set[int] = set()
    for pid, value in zip(table["prompt_id"], table["prompt"], strict=True):
        text, error = value, ""
        if isinstance(value, bytes):
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                text, error = (
                    value.decode("utf-8", errors="replace"),
                    _error(f"prompt is not valid UTF-8 ({exc})"),
                )
        if not error and (not isinstance(text, str) or not text.strip()):
            error = _error("prompt is empty")
        if not error and "\ufffd" in text:
            error = _error("prompt is not valid UTF-8 (replacement characters found)")
        if not error and pid in seen:
            error = _error(f"duplicate prompt_id {pid}; the first is kept")
        seen.add(pid)
        texts.append(str(text) if text is not None else "")
        errors.append(error)
    table["prompt"] = texts
    table["error"] = errors
    return table
