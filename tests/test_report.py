"""The HTML report on a small synthetic scan directory, the per-pair evidence picture, and a
headless-Chromium check that the page's gallery loads and its filters work."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from scanner.fbmem import score_pairs
from scanner.images import encode_png
from scanner.report.explain import explain_pair, explain_scan_pair, local_ssim_map
from scanner.report.gallery import select_cards
from scanner.report.html import ReportConfig, build_report
from scanner.report.plots import quality_drop
from scanner.similarity import spec_for
from scanner.store import ShardedTables
from tests.conftest import photo

S = 192
N = 3
PAGE = 4
THUMB = 160
CLUSTER = {0: 0, 1: 0, 2: 1, 3: 1}
PROMPTS = {
    0: "The Astronaut & the Coffee Cup <limited print>",
    1: "Portrait of a tabby cat, oil on canvas",
    2: "Rocket launch at dawn, vintage poster",
    3: "Cat & coffee: a still life",
}
# (method, prompt_id, gen_idx) -> (label, ref index, branch); every other generation is NM on ref 1
MEMORIZED = {
    ("none", 0, 0): ("VM", 0, "balanced"),
    ("none", 0, 1): ("VM", 0, "balanced"),
    ("none", 0, 2): ("FM", 3, "balanced"),
    ("none", 1, 0): ("VM", 1, "large_fg"),
    ("none", 1, 1): ("FM", 0, "balanced"),
    ("none", 2, 0): ("BM", 2, "small_fg"),
    ("none", 3, 2): ("BM", 3, "balanced"),
    ("none", 2, 1): ("FM", 3, "balanced"),
    ("nemo_c", 0, 0): ("FM", 0, "balanced"),
    ("nemo_c", 1, 0): ("BM", 1, "large_fg"),
}
REF_IDS = ["laion/000.jpg", "laion/001.jpg", "laion/002.jpg", "laion/003.jpg"]


def box_mask(top: int, left: int, h: int, w: int) -> torch.Tensor:
    mask = torch.zeros(S, S, dtype=torch.bool)
    mask[top : top + h, left : left + w] = True
    return mask


def write_reference_store(root: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    astro, coffee, chelsea, rocket = (
        photo(n, S) for n in ("astronaut", "coffee", "chelsea", "rocket")
    )
    fg = box_mask(40, 50, 100, 90)
    refs = [
        (torch.where(fg, astro, coffee), fg),
        (chelsea, box_mask(20, 20, 150, 150)),
        (rocket, box_mask(30, 80, 140, 40)),
        (torch.where(fg, coffee, chelsea), fg),
    ]
    tables = ShardedTables(root, ["references", "errors"])
    tables.prepare("test-reference", overwrite=False)
    rows = [
        {
            "ref_id": ref_id,
            "caption": f"training photo {i}",
            "source": f"/data/{ref_id}",
            "image": encode_png(image.numpy()),
            "fg_mask": encode_png(mask.numpy()),
            "fg_fraction": float(mask.float().mean()),
            "embedding": [0.0] * 4,
        }
        for i, (ref_id, (image, mask)) in enumerate(zip(REF_IDS, refs))
    ]
    tables.write_shard("r0", {"references": rows})
    (root / "manifest.json").write_text(
        json.dumps({"kind": "reference-store", "config": {"size": S}})
    )
    return refs


def write_scan(root: Path, reference: Path, refs) -> pd.DataFrame:
    """A scan directory with hand-set labels; returns its labels table."""
    rng = np.random.default_rng(0)
    tables = ShardedTables(root, ["prompts", "generations", "matches", "labels", "errors"])
    tables.prepare("test-scan", overwrite=False)
    tables.write_shard(
        "prompts",
        {
            "prompts": [
                {"prompt_id": p, "prompt": PROMPTS[p], "cluster_id": c} for p, c in CLUSTER.items()
            ]
        },
    )
    shards: dict[str, dict[str, list]] = {}
    labels = []
    for method in ("none", "nemo_c"):
        for p in CLUSTER:
            for g in range(N):
                label, r, branch = MEMORIZED.get((method, p, g), ("NM", 1, "balanced"))
                gid = f"{p}:{g}" if method == "none" else f"{p}:{g}@{method}"
                image, mask = refs[r]
                noisy = (
                    image + 0.03 * torch.from_numpy(rng.standard_normal(image.shape)).float()
                ).clamp(0, 1)
                scores = {  # deciding score grows with the generation index: a known order
                    "m_full": 0.85 + 0.01 * g if label == "VM" else 0.3 + 0.01 * g,
                    "m_fg": 0.9 + 0.01 * g if label == "FM" else 0.5,
                    "m_bg": 0.81 + 0.01 * g if label == "BM" else 0.4,
                }
                row = {
                    "gen_id": gid,
                    "prompt_id": p,
                    "gen_idx": g,
                    "method": method,
                    "label": label,
                    "ref_id": REF_IDS[r],
                    **scores,
                }
                labels.append(row)
                shard = shards.setdefault(
                    f"{method}-{p // 2}", {"generations": [], "matches": [], "labels": []}
                )
                shard["labels"].append(row)
                shard["generations"].append(
                    {
                        "gen_id": gid,
                        "prompt_id": p,
                        "gen_idx": g,
                        "seed": g,
                        "method": method,
                        "source": "",
                        "image": encode_png(noisy.numpy()),
                        "fg_mask": encode_png(mask.numpy()),
                        "fg_fraction": float(mask.float().mean()),
                    }
                )
                other = REF_IDS[(r + 1) % len(REF_IDS)]
                shard["matches"] += [
                    {
                        "gen_id": gid,
                        "ref_id": REF_IDS[r],
                        "prefilter_rank": 0,
                        "prefilter_score": 0.9,
                        "branch": branch,
                        "label": label,
                        **scores,
                    },
                    {
                        "gen_id": gid,
                        "ref_id": other,
                        "prefilter_rank": 1,
                        "prefilter_score": 0.5,
                        "m_full": 0.2,
                        "m_fg": 0.2,
                        "m_bg": 0.2,
                        "branch": "small_fg",
                        "label": "NM",
                    },
                ]
    shards["none-0"]["errors"] = [
        {"stage": "load", "item_id": "9:0", "error_type": "ImageError", "message": "truncated"}
    ]
    for name, rows in shards.items():
        tables.write_shard(name, rows)
    manifest = {
        "kind": "full-scan",
        "config": {
            "reference": str(reference),
            "tau": 0.8,
            "beta": 0.03,
            "metric": "ms_ssim",
            "n_per_prompt": N,
            "top_k": 2,
        },
        "backends": {"segmenter": "classical", "embedder": "color-histogram"},
        "versions": {"torch": torch.__version__},
        "started": 1_700_000_000.0,
        "finished": 1_700_000_100.0,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return pd.DataFrame(labels)


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    refs = write_reference_store(root / "reference")
    labels = write_scan(root / "scan", root / "reference", refs)
    page = build_report(root / "scan", config=ReportConfig(page_size=PAGE, thumb_size=THUMB))
    return root / "scan", page, labels


def gallery_data(page: Path) -> dict:
    html = page.read_text()
    found = re.search(
        r'<script type="application/json" id="gallery-data">(.*?)</script>', html, re.S
    )
    return json.loads(found.group(1))


def test_report_files_and_summary(scan):
    scan_dir, page, _ = scan
    report = scan_dir / "report"
    for name in (
        "index.html",
        "summary.json",
        "distribution.png",
        "one_to_many.png",
        "clusters.png",
    ):
        assert (report / name).is_file(), name
    assert not (report / "mitigation.png").exists()  # no mitigation.json yet
    summary = json.loads((report / "summary.json").read_text())
    assert summary["distribution"]["none"]["VM"] == 3
    assert summary["distribution"]["none"]["NM"] == 12 - 8
    assert summary["distribution"]["nemo_c"]["total"] == 12
    html = page.read_text()
    assert "segmenter classical" in html  # the header names what made the masks
    assert "<limited print>" not in html  # prompt text is data, never markup
    assert "&lt;limited print&gt;" in html
    assert "http://" not in html and "https://" not in html  # nothing fetched from a network


def test_gallery_most_severe_first_with_matched_reference(scan):
    scan_dir, page, _ = scan
    cards = gallery_data(page)["cards"]
    assert len(cards) == len(MEMORIZED)
    assert [c["label"] for c in cards] == ["VM"] * 3 + ["FM"] * 4 + ["BM"] * 3
    vm = [c["m_full"] for c in cards[:3]]
    assert vm == sorted(vm, reverse=True)
    for c in cards:
        p, rest = c["gen_id"].split(":")
        g = int(rest.split("@")[0])
        label, r, branch = MEMORIZED[(c["method"], int(p), g)]
        assert (c["label"], c["ref_id"], c["branch"]) == (label, REF_IDS[r], branch)
        assert c["cluster"] == CLUSTER[int(p)]
        for key in ("gen", "gen_mask", "ref", "ref_mask"):
            with Image.open(page.parent / c[key]) as im:
                assert im.size == (THUMB, THUMB)
    # one thumbnail per distinct training image, shared by the cards that matched it
    refs = {c["ref_id"]: c["ref"] for c in cards}
    assert len(set(refs.values())) == len(refs) == len({r for _, r, _ in MEMORIZED.values()})


def test_select_cards_shares_budget_across_methods():
    labels = pd.DataFrame(
        {
            "gen_id": ["a", "b", "c", "d", "e", "f"],
            "method": ["none"] * 4 + ["nemo_c"] * 2,
            "label": ["VM", "VM", "FM", "VM", "BM", "NM"],
            "m_full": [0.9, 0.95, 0.1, 0.85, 0.1, 0.1],
            "m_fg": [0.1, 0.1, 0.99, 0.1, 0.1, 0.1],
            "m_bg": [0.1, 0.1, 0.1, 0.1, 0.82, 0.1],
        }
    )
    # rank 0 of each method (b, e) comes before rank 1 of any (a); shown most severe first
    assert select_cards(labels, 3)["gen_id"].tolist() == ["b", "a", "e"]
    assert select_cards(labels, 10)["gen_id"].tolist() == ["b", "a", "d", "c", "e"]


def test_missing_reference_store_is_a_clear_error(scan, tmp_path):
    scan_dir, _, _ = scan
    with pytest.raises(ValueError, match="reference store .* not found"):
        build_report(scan_dir, reference=tmp_path / "nowhere")


def test_mitigation_tradeoff_when_present(scan, tmp_path):
    scan_dir, _, _ = scan
    copy = tmp_path / "scan"
    shutil.copytree(scan_dir, copy)
    mitigation = {
        "methods": [
            {"method": "nemo", "mitigation_score": 0.74, "quality": 41.0, "quality_metric": "piqe"},
            {
                "method": "nemo_c",
                "mitigation_score": 0.83,
                "quality": 43.5,
                "quality_metric": "piqe",
            },
        ],
        "baseline_quality": 40.0,
    }
    (copy / "report" / "mitigation.json").write_text(json.dumps(mitigation))
    page = build_report(copy, config=ReportConfig(max_cards=2, thumb_size=64))
    html = page.read_text()
    assert (copy / "report" / "mitigation.png").is_file()
    assert 'id="mitigation"' in html and "+3.500" in html  # PIQE: lower is better
    assert len(gallery_data(page)["cards"]) == 2


def test_report_counting_nm_as_the_authors_script(scan, tmp_path):
    scan_dir, _, _ = scan
    copy = tmp_path / "scan"
    shutil.copytree(scan_dir, copy)
    from scanner.cli import main

    assert main(["report", str(copy), "--count-nm"]) == 0
    summary = json.loads((copy / "report" / "summary.json").read_text())
    assert summary["one_to_many_counts_nm"] is True
    rows = [r for r in summary["one_to_many"] if r["method"] == "none"]
    assert sum(r["generations"] for r in rows) == 12  # all 4 prompts x N = 3, NM included
    assert sum(r["NM"] for r in rows) == 12 - 8
    html = (copy / "report" / "index.html").read_text()
    section = html[html.index('id="one-to-many"') :]
    assert "as the FB-Mem authors" in section and ">NM</th>" in section.split("</table>")[0]


def test_report_of_scan_without_memorization(scan, tmp_path):
    scan_dir, _, _ = scan
    tables = ShardedTables(tmp_path, ["prompts", "generations", "matches", "labels", "errors"])
    tables.prepare("quiet", overwrite=False)
    row = {
        "gen_id": "0:0",
        "prompt_id": 0,
        "gen_idx": 0,
        "method": "none",
        "label": "NM",
        "ref_id": REF_IDS[1],
        "m_full": 0.2,
        "m_fg": 0.3,
        "m_bg": 0.1,
    }
    tables.write_shard(
        "s0", {"prompts": [{"prompt_id": 0, "prompt": "p", "cluster_id": None}], "labels": [row]}
    )
    manifest = json.loads((scan_dir / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    page = build_report(tmp_path)
    assert gallery_data(page)["cards"] == []
    assert not (tmp_path / "report" / "clusters.png").exists()
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["clusters"] is None and summary["top_references"] == []
    assert [r["prompts"] for r in summary["one_to_many"]] == [0, 0, 0]  # N = 3 categories


@pytest.mark.parametrize(
    ("manifest", "shown"),
    [
        ({"backends": {"segmenter": "u2netp:w", "reference_segmenter": "u2netp:w"}}, "u2netp:w"),
        (
            {"backends": {"segmenter": "u2netp:w", "reference_segmenter": "classical-v1"}},
            "u2netp:w (training images: classical-v1)",
        ),
        ({"config": {"segmenter": "classical"}}, "classical"),  # a full scan's config
        ({"config": {"segmenter": {"kind": "birefnet"}}}, "birefnet"),
        ({}, "not recorded"),
    ],
)
def test_header_names_the_segmenter(manifest, shown):
    from scanner.report.html import _segmenter

    assert _segmenter(manifest) == shown


def test_quality_drop_direction():
    assert quality_drop(30.0, 40.0, "PIQE") == pytest.approx(-10.0)  # lower PIQE = better
    assert quality_drop(0.6, 0.7, "dbcnn") == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown quality metric"):
        quality_drop(1.0, 1.0, "fid")


def test_local_ssim_map_matches_skimage():
    from skimage.metrics import structural_similarity

    x, y = photo("astronaut", S), photo("coffee", S)
    y = (0.6 * x + 0.4 * y).clamp(0, 1)
    ours = local_ssim_map(x, y, spec_for("ssim")).numpy()
    _, full = structural_similarity(
        x.double().numpy(),
        y.double().numpy(),
        channel_axis=0,
        data_range=1.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        full=True,
    )
    assert ours.shape == (S - 10, S - 10)
    # Interior only (skimage pads the border). The window is built in float32, as
    # pytorch-msssim builds it, which alone accounts for differences up to ~3e-5.
    np.testing.assert_allclose(ours, full.mean(0)[5:-5, 5:-5], atol=1e-4)


def test_explain_pair_draws_and_reports_algorithm_1(tmp_path):
    astro, coffee, chelsea = (photo(n, S) for n in ("astronaut", "coffee", "chelsea"))
    fg = box_mask(40, 50, 100, 90)
    ref, gen = torch.where(fg, astro, coffee), torch.where(fg, astro, chelsea)
    out = tmp_path / "explain.png"
    record = explain_pair(gen, ref, fg, fg, beta=0.03, tau=0.8, metric="ms_ssim", out_png=out)
    expected = score_pairs(gen[None], ref[None], fg[None], fg[None], tau=0.8, beta=0.03).records()[
        0
    ]
    assert record["label"] == expected["label"] == "FM"  # same foreground, other background
    assert record["m_fg"] == pytest.approx(expected["m_fg"])
    assert record["branch"] == "balanced"
    with Image.open(out) as im:
        assert im.size[0] > 800 and im.size[1] > 500
    with pytest.raises(TypeError, match="boolean"):
        explain_pair(gen, ref, fg.float(), fg, beta=0.03, tau=0.8, metric="ms_ssim", out_png=out)


def test_explain_scan_pair_by_ids(scan, tmp_path):
    scan_dir, _, _ = scan
    out = tmp_path / "pair.png"
    # generation 0:0 is training image 0 plus faint noise: a verbatim copy at the scan's tau
    record = explain_scan_pair(scan_dir, "0:0", REF_IDS[0], out)
    assert record["label"] == "VM" and record["m_full"] > 0.8
    assert out.is_file()
    with pytest.raises(ValueError, match="not in"):
        explain_scan_pair(scan_dir, "99:0", REF_IDS[0], out)


# ---- headless Chromium -------------------------------------------------------------------

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)


@pytest.fixture
def browser(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("chromium and chromedriver are not on PATH (Debian: chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        *CHROMIUM_FLAGS,
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(
        options=options, service=webdriver.ChromeService(executable_path=driver_path)
    )
    yield driver
    driver.quit()


ALL_LOADED = """
const imgs = Array.from(document.querySelectorAll('#gallery img.gallery-img'));
return imgs.length > 0 && imgs.every(i => i.complete) ? imgs.map(i => [i.id, i.naturalWidth]) : null;
"""


def loaded_images(driver) -> list:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, 20).until(lambda d: d.execute_script(ALL_LOADED))


def visible_labels(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#gallery .card')).map(c => c.dataset.label)"
    )


def test_report_in_headless_chromium(scan, browser, tmp_path):
    _, page, _ = scan
    browser.get(page.resolve().as_uri())

    # every gallery image of the first page loaded: 4 per card (two photos, two mask overlays)
    images = loaded_images(browser)
    assert len(images) == 4 * PAGE
    assert all(width > 0 for _, width in images), [i for i, w in images if w == 0]
    assert len({i for i, _ in images}) == len(images)  # stable, unique ids
    grid = browser.find_element("id", "gallery")
    assert grid.get_attribute("data-shown") == str(len(MEMORIZED))
    assert visible_labels(browser) == ["VM", "VM", "VM", "FM"]

    # label filter: only background copies remain
    browser.find_element("id", "f-label-VM").click()
    browser.find_element("id", "f-label-FM").click()
    assert grid.get_attribute("data-shown") == "3"
    assert visible_labels(browser) == ["BM"] * 3
    assert all(w > 0 for _, w in loaded_images(browser))

    # method filter, then clear the label filter: nemo_c's two matches
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", "f-method")).select_by_value("nemo_c")
    browser.find_element("id", "f-label-VM").click()
    browser.find_element("id", "f-label-FM").click()
    assert visible_labels(browser) == ["FM", "BM"]
    Select(browser.find_element("id", "f-method")).select_by_value("")

    # cluster filter
    Select(browser.find_element("id", "f-cluster")).select_by_value("1")
    expected = sum(CLUSTER[p] == 1 for (_, p, _) in MEMORIZED)
    assert grid.get_attribute("data-shown") == str(expected)
    Select(browser.find_element("id", "f-cluster")).select_by_value("")

    # pagination: the next page shows the following cards, all of them loaded
    first = browser.execute_script("return document.querySelector('#gallery .card').id")
    browser.find_element("id", "next").click()
    assert browser.execute_script("return document.querySelector('#gallery .card').id") != first
    assert all(w > 0 for _, w in loaded_images(browser))
    browser.find_element("id", "prev").click()

    assert browser.find_element("css selector", "#gallery .card .prompt").text.endswith(
        "<limited print>\u201d"
    )
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, min(height, 4000))
    browser.execute_script("window.scrollTo(0, 0)")
    loaded_images(browser)
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot))
    print(f"report screenshot: {shot}")
    if os.environ.get("FBMEM_SAVE_SCREENSHOT"):
        docs = Path(__file__).resolve().parents[1] / "docs" / "report-screenshot.png"
        shutil.copyfile(shot, docs)
        print(f"report screenshot: {docs}")
    with Image.open(shot) as im:
        assert im.size[0] >= 1000
