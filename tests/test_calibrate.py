"""Calibration against human labels: Table 1's measures by hand, and on the replication set."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from pytorch_msssim import ms_ssim, ssim
from sklearn.metrics import roc_auc_score, roc_curve

from scanner.calibrate import (
    auroc,
    best_f1,
    calibrate,
    run_calibrate_command,
    task_measures,
    tpr_at_fpr,
)
from scanner.images import load_image
from scanner.reference import ReferenceConfig, build_reference
from scanner.replication import build_replication_set
from scanner.scan import ScanConfig, scan_images
from scanner.segment import SegmenterConfig

SIZE = 192
HUMAN = {"verbatim": "VM", "foreground": "TM", "background": "TM", "unrelated": "NM"}


# --- The measures on samples small enough to check by hand ------------------------------


def test_measures_by_hand():
    pos = np.array([0.9, 0.8, 0.6, 0.4])
    neg = np.array([0.7, 0.6, 0.3, 0.2, 0.1])
    # AUROC over the 4 x 5 pairs: 0.9 and 0.8 beat all 5 negatives (5 + 5); 0.6 beats 0.3,
    # 0.2, 0.1 and ties 0.6 (3 + 0.5); 0.4 beats 0.3, 0.2, 0.1 (3). (5 + 5 + 3.5 + 3) / 20.
    assert auroc(pos, neg) == pytest.approx(16.5 / 20)
    # F1 = 2TP / (TP + FP + |pos|) at each tau (score >= tau is positive):
    # 0.9: 2/5 = .4; 0.8: 4/6 = .667; 0.7: 4/7 = .571; 0.6: 6/9 = .667; 0.4: 8/10 = .8;
    # 0.3: 8/11; 0.2: 8/12; 0.1: 8/13. Best: tau 0.4, F1 0.8. There TP = 4 and TN = 3 (0.3,
    # 0.2, 0.1 fall below): accuracy 7/9.
    f1, tau, accuracy = best_f1(pos, neg)
    assert (f1, tau, accuracy) == pytest.approx((0.8, 0.4, 7 / 9))
    # With 5 negatives, FPR <= 1% means no false positive: tau above 0.7 keeps 0.9 and 0.8.
    assert tpr_at_fpr(pos, neg) == pytest.approx(0.5)


def test_best_f1_ties_go_to_the_highest_tau():
    pos, neg = np.array([0.9, 0.2]), np.array([0.5, 0.4])
    # tau 0.9: TP 1, FP 0 -> 2/(1 + 0 + 2) = 2/3; tau 0.5: 2/4; tau 0.4: 2/5;
    # tau 0.2: TP 2, FP 2 -> 4/(2 + 2 + 2) = 2/3. Tie: 0.9 wins, accuracy (1 + 2) / 4.
    assert best_f1(pos, neg) == pytest.approx((2 / 3, 0.9, 0.75))


def test_tpr_at_one_percent_fpr_allows_two_false_positives_in_200():
    pos = np.array([0.95, 0.9, 0.85, 0.8])
    neg = np.concatenate([[0.92, 0.87, 0.82], np.linspace(0.0, 0.5, 197)])
    # tau 0.85: TP 3, FP 2 (0.92, 0.87): FPR 2/200 = 1% is allowed. tau 0.82 or lower adds a
    # third false positive (1.5%). So TPR = 3/4.
    assert tpr_at_fpr(pos, neg) == pytest.approx(0.75)
    fpr, tpr, _ = roc_curve(np.r_[np.ones(4), np.zeros(200)], np.r_[pos, neg])
    assert tpr[fpr <= 0.01].max() == pytest.approx(0.75)  # sklearn's ROC agrees


def test_auroc_equals_sklearn_with_many_ties():
    rng = np.random.default_rng(0)
    pos = rng.integers(3, 10, 40) / 10  # coarse scores: many ties within and across classes
    neg = rng.integers(0, 7, 60) / 10
    expected = roc_auc_score(np.r_[np.ones(40), np.zeros(60)], np.r_[pos, neg])
    assert auroc(pos, neg) == pytest.approx(expected)


def test_a_task_without_examples_of_a_class_is_nan():
    row = task_measures(np.array([0.9, 0.1]), np.array(["VM", "NM"]), "TM", "NM")
    assert row["n_pos"] == 0 and row["n_neg"] == 1 and np.isnan(row["auroc"])


# --- Calibration on the replication set ------------------------------------------------


@pytest.fixture(scope="module")
def replication(tmp_path_factory):
    """The replication set at 192 px, its reference store and a top-1 scan of it."""
    root = tmp_path_factory.mktemp("replication")
    manifest = build_replication_set(root, size=SIZE)
    refs = pd.read_csv(root / "references.csv")
    refs[["ref_id", "path", "caption"]].to_csv(root / "refs.csv", index=False)
    gens = manifest.assign(path=manifest["gen"], gen_idx=0, prompt_id=range(len(manifest)))
    gens[["path", "prompt", "prompt_id", "gen_idx"]].to_csv(root / "gens.csv", index=False)
    classical = SegmenterConfig(kind="classical")  # calibration, not segmentation: the fast one
    build_reference(
        root / "refs.csv", root / "store", ReferenceConfig(size=SIZE, segmenter=classical)
    )
    scan_images(
        root / "gens.csv",
        root / "scan",
        ScanConfig(reference=str(root / "store"), top_k=1, segmenter=classical),
    )
    manifest["gen_id"] = [f"{i}:0" for i in range(len(manifest))]
    manifest["human"] = manifest["kind"].map(HUMAN)
    return root, manifest


def _labels(manifest: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {"gen_id": manifest["gen_id"], "label": manifest["human"], "ref": manifest["ref_id"]}
    )


@pytest.fixture(scope="module")
def result(replication):
    root, manifest = replication
    return calibrate(_labels(manifest), root / "scan")


def _measure(result, metric: str, task: str) -> dict:
    rows = result.measures[
        (result.measures["metric"] == metric) & (result.measures["task"] == task)
    ]
    return rows.iloc[0].to_dict()


def test_scores_equal_pytorch_msssim_on_the_files(result, replication):
    root, manifest = replication

    def files(column):
        return torch.stack([torch.from_numpy(load_image(root / p, SIZE)) for p in manifest[column]])

    gen, ref = files("gen"), files("ref")
    scores = result.scores.set_index("gen_id").loc[manifest["gen_id"]]
    np.testing.assert_allclose(
        scores["ms_ssim"], ms_ssim(gen, ref, data_range=1.0, size_average=False), atol=1e-5
    )
    np.testing.assert_allclose(
        scores["ssim"], ssim(gen, ref, data_range=1.0, size_average=False), atol=1e-5
    )
    assert scores["label"].tolist() == manifest["human"].tolist()


def test_ms_ssim_separates_verbatim_copies_perfectly(result):
    print("\n" + result.table())  # the table in docs/calibration.md
    scores = result.scores
    vm = scores.loc[scores["label"] == "VM", "ms_ssim"]
    for task in ("VM-vs-NM", "VM-vs-TM"):
        row = _measure(result, "ms_ssim", task)
        assert row["auroc"] == row["f1"] == row["tpr_at_1pct_fpr"] == row["accuracy"] == 1.0
        assert row["tau"] == vm.min()  # the highest tau that keeps every VM
    # The set was built so that, against its own training image, only verbatim copies reach
    # the paper's MS-SSIM threshold 0.8.
    assert vm.min() > 0.8 > scores.loc[scores["label"] != "VM", "ms_ssim"].max()
    assert _measure(result, "ms_ssim", "TM-vs-NM")["n_pos"] == 12
    assert set(result.measures["metric"]) == {"ssim", "ms_ssim"}


def test_command_reads_paths_uses_matched_refs_and_writes_json(result, replication, capsys):
    root, manifest = replication
    csv = root / "human.csv"
    # Paths relative to the CSV's folder, lower-case labels, and no `ref`: the scan's match.
    pd.DataFrame({"path": manifest["gen"], "label": manifest["human"].str.lower()}).to_csv(
        csv, index=False
    )
    out = root / "calibration" / "result.json"
    by_path = run_calibrate_command(csv, root / "scan", out_json=out)
    printed = capsys.readouterr().out
    assert (
        "| MS-SSIM | VM-vs-NM | 10 | 10 | 1.000 |" in printed and "VM 10, TM 12, NM 10" in printed
    )
    written = json.loads(out.read_text())
    assert written["counts"] == {"VM": 10, "TM": 12, "NM": 10} and len(written["measures"]) == 6
    assert len(written["scores"]) == 32 and written["sscd"] is None
    # A verbatim copy's best match is its own training image, so its scores are unchanged.
    verbatim = manifest["kind"] == "verbatim"
    mine = by_path.scores.set_index("gen_id").loc[manifest["gen_id"][verbatim]]
    given = result.scores.set_index("gen_id").loc[manifest["gen_id"][verbatim]]
    assert mine["ref_id"].tolist() == manifest["ref_id"][verbatim].tolist()
    np.testing.assert_allclose(mine["ms_ssim"], given["ms_ssim"])


def test_sscd_joins_the_table_when_a_model_is_given(replication, tmp_path):
    from scanner.sscd import SSCDModel

    root, manifest = replication
    torch.manual_seed(0)
    tiny = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 5, stride=4), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )
    path = tmp_path / "sscd.pt"
    with pytest.warns(FutureWarning):  # torch deprecates TorchScript; SSCD ships only as such
        torch.jit.save(torch.jit.trace(tiny.eval(), torch.rand(1, 3, 320, 320)), str(path))
    subset = manifest.iloc[:8]
    result = calibrate(_labels(subset), root / "scan", sscd_path=path)
    assert set(result.measures["metric"]) == {"ssim", "ms_ssim", "sscd"}
    first = subset.iloc[0]
    gen, ref = (torch.from_numpy(load_image(root / first[c], SIZE))[None] for c in ("gen", "ref"))
    expected = SSCDModel(path).similarity(gen, ref).item()
    assert result.scores["sscd"].iloc[0] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda t: t.assign(label=["XM"] + list(t["label"][1:])),
            r"one of \('VM', 'TM', 'NM'\).*'XM'",
        ),
        (lambda t: t.drop(columns="label"), "needs? a `label` column"),
        (lambda t: t.drop(columns="gen_id"), "`gen_id` or `path`"),
        (lambda t: t.assign(gen_id=["99:0"] + list(t["gen_id"][1:])), "not in the scan.*'99:0'"),
        (lambda t: pd.concat([t, t.iloc[:1]]), "labelled once.*'0:0'"),
        (lambda t: t.assign(ref=["r99"] + list(t["ref"][1:])), "not in the reference store.*'r99'"),
        (lambda t: t.iloc[:0], "empty"),
        (lambda t: pd.DataFrame({"path": ["/no/such.png"], "label": ["VM"]}), "not scanned"),
    ],
)
def test_bad_labels_are_rejected_with_the_offending_values(replication, change, message):
    root, manifest = replication
    with pytest.raises(ValueError, match=message):
        calibrate(change(_labels(manifest.iloc[:4])), root / "scan")


def test_bad_scan_and_label_types_are_rejected(replication, tmp_path):
    root, manifest = replication
    with pytest.raises(ValueError, match="not a scan directory"):
        calibrate(_labels(manifest), tmp_path)
    with pytest.raises(TypeError, match="DataFrame"):
        calibrate(_labels(manifest).to_dict(), root / "scan")
    with pytest.raises(ValueError, match="no such labels file"):
        run_calibrate_command(tmp_path / "missing.csv", root / "scan")
