"""Sharded tables (done markers, config digests), prompt loading and full-scan configs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from scanner.plan import generation_items, load_config
from scanner.prompts import load_prompts
from scanner.store import ShardedTables, config_digest, gen_id


def test_only_done_shards_are_read(tmp_path):
    tables = ShardedTables(tmp_path, ["errors"])
    tables.prepare("abc", overwrite=False)
    row = {"stage": "load", "item_id": "x", "error_type": "E", "message": "m"}
    tables.write_shard("shard-000000", {"errors": [row]})
    (tmp_path / "errors" / "shard-000001.parquet").write_bytes(b"half-written leftovers")
    assert tables.read("errors").to_pylist() == [row]
    assert (
        tables.count("errors") == 1
        and tables.is_done("shard-000000")
        and not tables.is_done("shard-000001")
    )


def test_config_digest_guards_resume(tmp_path):
    tables = ShardedTables(tmp_path, ["errors"])
    tables.prepare(config_digest({"tau": 0.8}), overwrite=False)
    tables.prepare(config_digest({"tau": 0.8}), overwrite=False)  # same config: resume
    with pytest.raises(ValueError, match="another configuration"):
        tables.prepare(config_digest({"tau": 0.7}), overwrite=False)
    tables.prepare(config_digest({"tau": 0.7}), overwrite=True)


def test_gen_ids():
    assert gen_id(12, 3) == "12:3"
    assert gen_id(12, 3, "nemo-c:alpha=0.1") == "12:3@nemo-c:alpha=0.1"


def test_bundled_prompts():
    memorized = load_prompts("memorized")
    assert len(memorized) == 500 and (memorized["error"] == "").all()
    assert memorized["prompt"].str.startswith("Shaw Floors").sum() == 148
    assert load_prompts("unmemorized", limit=7)["prompt_id"].tolist() == list(range(7))


def test_bad_prompts_become_error_rows(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"a cat\n\n\xff\xfe broken\n   \na cat\n")
    table = load_prompts(str(path))
    assert table["prompt"].tolist()[0] == "a cat"
    flagged = table["error"] != ""
    assert flagged.tolist() == [
        False,
        True,
        True,
        True,
        False,
    ]  # duplicates of text are fine, ids are unique
    csv = tmp_path / "p.csv"
    pd.DataFrame({"prompt_id": [5, 5], "prompt": ["x", "y"]}).to_csv(csv, index=False)
    assert "duplicate prompt_id 5" in load_prompts(str(csv))["error"].iloc[1]
    with pytest.raises(ValueError, match="no prompt column"):
        pd.DataFrame({"words": ["x"]}).to_csv(csv, index=False)
        load_prompts(str(csv))
    with pytest.raises(ValueError, match="not a bundled set"):
        load_prompts("nonexistent")


def test_generation_items_are_prompt_major():
    prompts = pd.DataFrame({"prompt_id": [7, 9], "prompt": ["a", "b"], "error": ["", ""]})
    items = generation_items(prompts, n=3, seed=4)
    assert items["item_id"].tolist() == ["7:0", "7:1", "7:2", "9:0", "9:1", "9:2"]
    assert (items["seed"] == 4).all() and (items["method"] == "none").all()


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "scan.yaml"
    path.write_text(
        "model: /m\nreference: /r\ntop_k: 8\nresources:\n  generate: {gpus: 1, max_actors: 4}\n"
    )
    config = load_config(str(path), {"top_k": 32, "tau": None})
    assert config.top_k == 32 and config.resources_for("generate").max_actors == 4
    assert config.resources_for("match").gpus == 0
    path.write_text("model: /m\nreference: /r\ntopk: 8\n")
    with pytest.raises(ValueError, match="unknown config keys"):
        load_config(str(path), {})
    with pytest.raises(ValueError, match="--reference"):
        load_config(None, {"model": "/m"})


def test_demo_reference_table_works_from_a_relative_output_folder(tmp_path, monkeypatch):
    from scanner.demo_inputs import replication_references
    from scanner.sources import list_images

    monkeypatch.chdir(tmp_path)
    table = replication_references(Path("scans") / "demo" / "replication")
    listed = list_images(table, "caption")
    assert len(listed) == 10 and all(Path(p).is_file() for p in listed["path"])
