"""Reference store and scan-images on the replication set (no Ray): resume, errors, prefilter."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from scanner.reference import ReferenceConfig, ReferenceStore, build_reference
from scanner.replication import build_replication_set
from scanner.scan import ScanConfig, scan_images
from scanner.segment import SegmenterConfig
from scanner.store import ShardedTables

# Scan plumbing, not segmentation: the fast weightless segmenter (u2netp, the default, is
# tested in test_segment.py and end to end in test_mitigate_job.py and test_compare_cli.py).
CLASSICAL = SegmenterConfig(kind="classical")

SIZE = 192


@pytest.fixture(scope="module")
def replication(tmp_path_factory):
    root = tmp_path_factory.mktemp("replication")
    manifest = build_replication_set(root, size=SIZE)
    refs = pd.read_csv(root / "references.csv")
    refs[["ref_id", "path", "caption"]].to_csv(root / "refs.csv", index=False)
    gens = manifest.assign(path=manifest["gen"], gen_idx=0, prompt_id=range(len(manifest)))
    gens[["path", "prompt", "prompt_id", "gen_idx"]].to_csv(root / "gens.csv", index=False)
    return root, manifest


@pytest.fixture(scope="module")
def store(replication, tmp_path_factory):
    root, _ = replication
    out = tmp_path_factory.mktemp("ref") / "store"
    build_reference(
        root / "refs.csv", out, ReferenceConfig(size=SIZE, shard_size=4, segmenter=CLASSICAL)
    )
    return out


def _table(path, name):
    return ShardedTables(path, [name]).read(name).to_pandas()


def test_store_holds_every_reference_with_masks_and_embeddings(store, replication):
    refs = _table(store, "references")
    assert refs["ref_id"].tolist() == [f"r{i:02d}" for i in range(1, 11)]
    assert refs["fg_fraction"].between(0, 1).all()
    assert len({len(e) for e in refs["embedding"]}) == 1
    opened = ReferenceStore(store)
    image, mask = opened.load(7)
    assert image.shape == (3, SIZE, SIZE) and mask.shape == (SIZE, SIZE)
    assert opened.index.ntotal == 10


def test_interrupted_build_resumes_to_the_same_table(replication, store, tmp_path, monkeypatch):
    root, _ = replication
    out = tmp_path / "store"
    real_write = ShardedTables.write_shard
    calls = []

    def crash_after_first(self, shard, rows):
        if calls:
            raise KeyboardInterrupt("simulated kill")
        calls.append(shard)
        real_write(self, shard, rows)

    monkeypatch.setattr(ShardedTables, "write_shard", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        build_reference(
            root / "refs.csv", out, ReferenceConfig(size=SIZE, shard_size=4, segmenter=CLASSICAL)
        )
    monkeypatch.setattr(ShardedTables, "write_shard", real_write)
    first_shard = out / "references" / f"{calls[0]}.parquet"
    mtime = first_shard.stat().st_mtime_ns
    build_reference(
        root / "refs.csv", out, ReferenceConfig(size=SIZE, shard_size=4, segmenter=CLASSICAL)
    )
    assert first_shard.stat().st_mtime_ns == mtime  # not redone
    assert _table(out, "references").equals(_table(store, "references"))


def test_changed_config_refuses_to_resume(replication, store):
    root, _ = replication
    with pytest.raises(ValueError, match="another configuration"):
        build_reference(
            root / "refs.csv", store, ReferenceConfig(size=SIZE, shard_size=5, segmenter=CLASSICAL)
        )


def test_unreadable_images_go_to_errors(replication, tmp_path):
    root, _ = replication
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("r01", "r02"):
        (folder / f"{name}.png").write_bytes((root / "references" / f"{name}.png").read_bytes())
    (folder / "r01.txt").write_text("caption from a sidecar")
    (folder / "empty.png").write_bytes(b"")
    (folder / "cut.png").write_bytes((root / "references" / "r03.png").read_bytes()[:300])
    (folder / "text.jpg").write_text("not an image")
    out = tmp_path / "store"
    manifest = build_reference(folder, out, ReferenceConfig(size=SIZE, segmenter=CLASSICAL))
    refs, errors = _table(out, "references"), _table(out, "errors")
    assert refs["ref_id"].tolist() == ["r01.png", "r02.png"]
    assert refs["caption"].tolist() == ["caption from a sidecar", ""]
    reasons = dict(zip(errors["item_id"], errors["message"]))
    assert set(reasons) == {"empty.png", "cut.png", "text.jpg"}
    assert (
        "empty" in reasons["empty.png"]
        and "truncated" in reasons["cut.png"]
        or "corrupt" in reasons["cut.png"]
    )
    assert "not a readable image" in reasons["text.jpg"]
    assert set(errors["stage"]) == {"load"} and manifest["rows"] == {"references": 2, "errors": 3}


@pytest.fixture(scope="module")
def scans(replication, store, tmp_path_factory):
    root, _ = replication
    base = tmp_path_factory.mktemp("scans")
    out = {}
    for k in (0, 4):
        out[k] = base / f"k{k}"
        scan_images(
            root / "gens.csv",
            out[k],
            ScanConfig(reference=str(store), top_k=k, shard_size=12, segmenter=CLASSICAL),
        )
    return out


def test_scan_directory_tables(scans, replication):
    _, manifest = replication
    labels = _table(scans[4], "labels")
    gens = _table(scans[4], "generations")
    matches = _table(scans[4], "matches")
    assert len(labels) == len(gens) == len(manifest) and len(matches) == 4 * len(manifest)
    assert set(labels["label"]) <= {"VM", "FM", "BM", "NM"}
    assert all(sorted(r) == [0, 1, 2, 3] for _, r in matches.groupby("gen_id")["prefilter_rank"])
    assert len(_table(scans[0], "matches")) == 10 * len(manifest)  # exhaustive: every reference
    assert _table(scans[4], "prompts")["prompt_id"].tolist() == list(range(len(manifest)))
    assert gens["fg_fraction"].between(0, 1).all()


def test_prefilter_keeps_every_verbatim_match(scans, replication):
    _, manifest = replication
    exhaustive = _table(scans[0], "labels").set_index("gen_id")
    top4 = _table(scans[4], "labels").set_index("gen_id")
    verbatim = [f"{i}:0" for i in np.flatnonzero(manifest["kind"] == "verbatim")]
    assert (exhaustive.loc[verbatim, "label"] == "VM").all()
    pd.testing.assert_frame_equal(
        exhaustive.loc[verbatim, ["label", "ref_id"]], top4.loc[verbatim, ["label", "ref_id"]]
    )
    intended = manifest.set_index(manifest.index.map(lambda i: f"{i}:0"))["ref_id"]
    assert (exhaustive.loc[verbatim, "ref_id"] == intended[verbatim]).all()


def test_rescan_is_a_no_op_and_identical(scans, replication, store):
    root, _ = replication
    before = _table(scans[4], "labels")
    manifest = scan_images(
        root / "gens.csv",
        scans[4],
        ScanConfig(reference=str(store), top_k=4, shard_size=12, segmenter=CLASSICAL),
    )
    assert manifest["generations_this_run"] == 0
    assert _table(scans[4], "labels").equals(before)


def test_scan_rejects_a_missing_reference(replication, tmp_path):
    root, _ = replication
    with pytest.raises(ValueError, match="not a reference store"):
        scan_images(
            root / "gens.csv", tmp_path / "scan", ScanConfig(reference=str(tmp_path / "nope"))
        )
    assert not (tmp_path / "scan").exists()


def test_schema_is_the_public_interface(scans):
    labels = ShardedTables(scans[4], ["labels"]).read("labels")
    assert labels.schema.field("prompt_id").type == pa.int64()
    assert labels.column_names == [
        "gen_id",
        "prompt_id",
        "gen_idx",
        "method",
        "label",
        "ref_id",
        "m_full",
        "m_fg",
        "m_bg",
    ]
