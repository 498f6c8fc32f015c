"""`fbmem compare`: JSON per pair, masks given or segmented, bad inputs reported per pair."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from scanner.cli import main
from scanner.images import encode_png


@pytest.fixture
def files(tmp_path, photos):
    """A training image, a near copy of it, an unrelated image, masks and broken files."""
    ref = photos["chelsea"].numpy()
    rng = np.random.default_rng(0)
    gen = np.clip(ref + rng.normal(0, 0.02, ref.shape), 0, 1).astype(np.float32)
    mask = np.zeros(ref.shape[1:], dtype=bool)
    mask[40:150, 30:160] = True
    for name, arr in {
        "ref.png": ref,
        "gen.png": gen,
        "other.png": photos["rocket"].numpy(),
        "mask.png": mask,
    }.items():
        (tmp_path / name).write_bytes(encode_png(arr))
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(tmp_path / "small_mask.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ref.png").read_bytes()[:500])
    return tmp_path


def run(capsys, *argv):
    code = main(["compare", *argv, "--json", "--size", "192"])
    out = capsys.readouterr().out
    return code, [json.loads(line) for line in out.splitlines()]


def test_single_pair_with_masks(files, capsys):
    code, rows = run(
        capsys,
        str(files / "gen.png"),
        str(files / "ref.png"),
        "--gen-mask",
        str(files / "mask.png"),
        "--ref-mask",
        str(files / "mask.png"),
    )
    assert code == 0 and len(rows) == 1
    row = rows[0]
    assert row["label"] == "VM" and row["branch"] == "balanced"
    assert row["fg_fraction"] == pytest.approx(110 * 130 / 192**2)
    assert set(row) == {"gen", "ref", "m_full", "m_fg", "m_bg", "fg_fraction", "branch", "label"}


def test_pairs_csv_reports_bad_rows_and_keeps_going(files, capsys):
    (files / "pairs.csv").write_text(
        "gen,ref,gen_mask,ref_mask\n"
        "gen.png,ref.png,mask.png,mask.png\n"
        "other.png,ref.png,mask.png,mask.png\n"
        "empty.png,ref.png,,\n"
        "cut.png,ref.png,,\n"
        "missing.png,ref.png,,\n"
        "gen.png,ref.png,small_mask.png,mask.png\n"
        "gen.png,ref.png,,\n"
    )
    code, rows = run(capsys, "--pairs", str(files / "pairs.csv"))
    assert code == 3  # finished, with error records
    assert [r.get("label") for r in rows] == ["VM", "NM", None, None, None, None, "VM"]
    errors = [r.get("error", "") for r in rows]
    assert "empty" in errors[2] and ("truncated" in errors[3] or "corrupt" in errors[3])
    assert "no such file" in errors[4] and "mask is 100x100" in errors[5]


def test_usage_errors_exit_2(files, capsys):
    assert main(["compare", str(files / "gen.png")]) == 2
    (files / "bad.csv").write_text("a,b\n1,2\n")
    assert main(["compare", "--pairs", str(files / "bad.csv")]) == 2
    assert "needs columns 'gen' and 'ref'" in capsys.readouterr().err


def test_a_decompression_bomb_is_an_error_record_and_the_rest_still_runs(files, bomb, capsys):
    (files / "pairs.csv").write_text(f"gen,ref\n{bomb},ref.png\ngen.png,ref.png\n")
    code, rows = run(capsys, "--pairs", str(files / "pairs.csv"), "--segmenter", "classical")
    assert code == 3
    assert "400,000,000 pixels, over the limit of 50,000,000" in rows[0]["error"]
    assert "--max-pixels" in rows[0]["error"] and rows[1]["label"] == "VM"


def test_a_directory_given_as_an_image_says_so(files, capsys):
    code, rows = run(capsys, str(files), str(files / "ref.png"), "--segmenter", "classical")
    assert code == 3 and rows[0]["error"] == f"{files}: is a directory, not an image file"


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "the pairs CSV is empty"), ("gen,ref\n", "has a header but no rows")],
)
def test_an_empty_pairs_csv_is_a_usage_error(files, capsys, text, message):
    (files / "pairs.csv").write_text(text)
    assert main(["compare", "--pairs", str(files / "pairs.csv")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err


def test_pixel_limit_option(files, capsys):
    # ref.png is 192 x 192 = 36,864 pixels
    code, rows = run(
        capsys, str(files / "gen.png"), str(files / "ref.png"), "--max-pixels", "30000"
    )
    assert code == 3 and "over the limit of 30,000 pixels" in rows[0]["error"]
