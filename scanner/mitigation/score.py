"""The FB-Mem paper's mitigation score (its Table 2): how far a method moves each generation's label.

A mitigation is judged per generation: the same prompt and latent (prompt_id, gen_idx) is
labelled before and after, and the move between the two labels is scored, more for leaving
verbatim memorization than for trading foreground for background copying, negative when a
generation gets worse. The method's score is the mean over generations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

LABELS = ("VM", "FM", "BM", "NM")  # most to least memorized
KEY = ("prompt_id", "gen_idx")  # a generation; the same key before and after has the same seed

# TRANSITION_SCORES[from][to], rows and columns in LABELS order: the paper's Table 2, with
# unchanged labels scoring 0 (the paper lists only changes).
TRANSITION_SCORES = np.array(
    [
        [0.0, 0.5, 1.5, 2.0],
        [-0.5, 0.0, 1.0, 1.5],
        [-1.5, -0.5, 0.0, 0.5],
        [-2.0, -1.5, -0.5, 0.0],
    ]
)

_SHOWN = 10  # unmatched or duplicate keys quoted in an error message


@dataclass(frozen=True)
class MitigationScore:
    score: float  # mean transition score over matched generations
    n: int  # matched generations
    transitions: tuple[tuple[int, ...], ...]  # counts, rows = from, cols = to, LABELS order
    unmatched_pre: tuple[tuple[int, int], ...]  # (prompt_id, gen_idx) only before
    unmatched_post: tuple[tuple[int, int], ...]  # (prompt_id, gen_idx) only after

    def to_dict(self) -> dict:
        """JSON-ready, transitions keyed by label names."""
        return {
            "score": self.score,
            "n": self.n,
            "transitions": {
                src: dict(zip(LABELS, row, strict=True))
                for src, row in zip(LABELS, self.transitions, strict=True)
            },
            "unmatched_pre": [list(key) for key in self.unmatched_pre],
            "unmatched_post": [list(key) for key in self.unmatched_post],
        }


def mitigation_score(
    pre: pd.DataFrame, post: pd.DataFrame, allow_unmatched: bool = False
) -> MitigationScore:
    """Score the label transitions of generations matched on (prompt_id, gen_idx).

    `pre` and `post` are `labels` tables (columns prompt_id, gen_idx, label; others ignored)
    of one method each. A generation present on one side only is an error unless
    `allow_unmatched`, in which case it is reported and left out of the mean.
    """
    pre_labels = _checked_labels(pre, "pre")
    post_labels = _checked_labels(post, "post")
    unmatched_pre = _sorted_keys(pre_labels.index.difference(post_labels.index))
    unmatched_post = _sorted_keys(post_labels.index.difference(pre_labels.index))
    if (unmatched_pre or unmatched_post) and not allow_unmatched:
        raise ValueError(
            "generations without a partner, as (prompt_id, gen_idx): "
            f"{_describe_keys(unmatched_pre)} only in pre; "
            f"{_describe_keys(unmatched_post)} only in post "
            "(pass allow_unmatched=True to score the matched ones only)"
        )
    matched = pre_labels.index.intersection(post_labels.index)
    if len(matched) == 0:
        raise ValueError("no generation appears in both pre and post: nothing to score")
    src = pre_labels.loc[matched].map(LABELS.index).to_numpy()
    dst = post_labels.loc[matched].map(LABELS.index).to_numpy()
    counts = np.zeros((len(LABELS), len(LABELS)), dtype=np.int64)
    np.add.at(counts, (src, dst), 1)
    return MitigationScore(
        score=float(TRANSITION_SCORES[src, dst].mean()),
        n=len(matched),
        transitions=tuple(tuple(int(c) for c in row) for row in counts),
        unmatched_pre=unmatched_pre,
        unmatched_post=unmatched_post,
    )


def _checked_labels(table: pd.DataFrame, side: str) -> pd.Series:
    """The table's labels indexed by (prompt_id, gen_idx), after checking keys and labels."""
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"{side}: expected a pandas DataFrame, got {type(table).__name__}")
    missing = [c for c in (*KEY, "label") if c not in table.columns]
    if missing:
        raise ValueError(f"{side}: missing columns {missing}; has {list(table.columns)}")
    for column in KEY:
        if not pd.api.types.is_integer_dtype(table[column]):
            raise ValueError(
                f"{side}: column {column!r} must hold integers, has dtype {table[column].dtype}"
            )
    known = table["label"].isin(LABELS)
    if not known.all():
        bad = sorted({repr(x) for x in table.loc[~known, "label"]})
        raise ValueError(
            f"{side}: labels must be one of {list(LABELS)}; "
            f"{int((~known).sum())} rows have {', '.join(bad)}"
        )
    labels = table.set_index(list(KEY))["label"]
    duplicated = labels.index[labels.index.duplicated()].unique()
    if len(duplicated):
        hint = " (filter to one method first)" if "method" in table.columns else ""
        raise ValueError(
            f"{side}: (prompt_id, gen_idx) must be unique, repeated: "
            f"{_describe_keys(_sorted_keys(duplicated))}{hint}"
        )
    return labels


def _sorted_keys(index: pd.Index) -> tuple[tuple[int, int], ...]:
    return tuple(sorted((int(p), int(g)) for p, g in index))


def _describe_keys(keys: tuple[tuple[int, int], ...]) -> str:
    if not keys:
        return "none"
    shown = ", ".join(str(key) for key in keys[:_SHOWN])
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return f"{len(keys)}: {shown}{more}"
