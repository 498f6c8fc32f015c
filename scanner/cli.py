"""The `fbmem` command: thin argument parsing over the library.

Start-up imports nothing heavy, so `fbmem --help` answers at once; each command imports what
it needs when it runs. Every command exits by one rule (`scanner.exits`): 0 all processed,
3 finished with error rows, 1 aborted, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scanner import exits
from scanner.defaults import (
    DEFAULT_BETA,
    DEFAULT_MATCH_BY,
    DEFAULT_MAX_PIXELS,
    DEFAULT_REGION_MODE,
    DEFAULT_SIZE,
    DEFAULT_TAU,
    MATCH_BY,
    METRICS,
    REGION_MODES,
)

LABEL_ORDER = ("VM", "FM", "BM", "NM")  # the order summaries print labels in


def _add_fbmem_options(p: argparse.ArgumentParser, size: bool = True) -> None:
    p.add_argument(
        "--tau",
        type=float,
        default=DEFAULT_TAU,
        help="similarity threshold (default %(default)s, the paper's MS-SSIM verbatim threshold)",
    )
    p.add_argument(
        "--beta",
        type=float,
        default=DEFAULT_BETA,
        help="foreground-fraction threshold of Algorithm 1 (default %(default)s)",
    )
    if size:  # scans take the size of their reference store
        p.add_argument(
            "--size",
            type=int,
            default=DEFAULT_SIZE,
            help="canonical square size in px (default %(default)s)",
        )
    p.add_argument(
        "--metric",
        choices=(*METRICS, "sscd"),
        default="ms_ssim",
        help="similarity M of Algorithm 1: ms_ssim (5-scale MS-SSIM, the paper's, default), "
        "ssim (single scale) or sscd (cosine similarity of SSCD embeddings, needs --sscd)",
    )
    p.add_argument("--sscd", metavar="PATH", help="SSCD TorchScript file (with --metric sscd)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")


def _add_max_pixels(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="largest image (width x height) decoded; larger files, decompression bombs "
        "included, become error rows without being decoded (default %(default)s, about 1 GB "
        "of memory while decoding)",
    )


def _add_match_by(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--match-by",
        choices=MATCH_BY,
        default=DEFAULT_MATCH_BY,
        help="each generation's one match among its candidates: highest (M_fg + M_bg) / 2 "
        "(mean, default, as the paper's authors), highest M_full (full), or the most severe "
        "label (most-severe, a worst-case audit view)",
    )


def _add_region_mode(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--region-mode",
        choices=REGION_MODES,
        default=DEFAULT_REGION_MODE,
        help="masked (default, the paper's Algorithm 1: each region compared with the other "
        "zeroed) or pooled (the SSIM maps of the unmasked images averaged where both images "
        "hold the region; docs/region-modes.md)",
    )


def _add_u2netp(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--u2netp",
        metavar="PATH",
        help="a u2netp.onnx file for the u2netp segmenter (default: the one of the u2netp extra)",
    )


def _add_segmenter_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--segmenter",
        choices=("u2netp", "classical", "birefnet"),
        help="foreground segmenter for images without a mask (default: u2netp when installed, "
        "else classical with a notice; docs/segmentation.md)",
    )
    _add_u2netp(p)
    p.add_argument(
        "--birefnet",
        metavar="PATH",
        help="local BiRefNet folder or model id (with --segmenter birefnet)",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the model's own Python code to run (BiRefNet needs it)",
    )


def check_device(device: str) -> None:
    """One clear line for a device this machine lacks (`--device cuda` without CUDA, a
    misspelt name), before any model loads."""
    if device == "cpu":
        return
    import torch

    available = ["cpu"]
    if torch.cuda.is_available():
        available += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        available.append("mps")
    have = ", ".join(available)
    try:
        asked = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"--device {device!r} is not a device name; this machine has: {have}"
        ) from None
    if asked.type == "cpu" or str(asked) in available:
        return
    why = ""
    if asked.type == "cuda" and not torch.cuda.is_available():
        why = (
            " (this PyTorch build has no CUDA support)"
            if torch.version.cuda is None
            else " (no CUDA GPU is visible)"
        )
    raise ValueError(f"--device {device}: not available here{why}; this machine has: {have}")


def _segmenter(args):
    from scanner.segment import make_segmenter

    return make_segmenter(_segmenter_config(args))


def _print_table(records: list[dict]) -> None:
    head = f"{'gen':<28} {'ref':<28} {'label':<5} {'M_full':>7} {'M_fg':>7} {'M_bg':>7} {'p_fg':>6}  branch"
    print(head)
    print("-" * len(head))
    for r in records:
        gen, ref = Path(r["gen"]).name[-28:], Path(r["ref"]).name[-28:]
        if "error" in r:
            print(f"{gen:<28} {ref:<28} ERROR {r['error']}")
        else:
            print(
                f"{gen:<28} {ref:<28} {r['label']:<5} {r['m_full']:7.4f} {r['m_fg']:7.4f} {r['m_bg']:7.4f} {r['fg_fraction']:6.3f}  {r['branch']}"
            )


def cmd_compare(args) -> int:
    from scanner.compare import CompareOptions, PairSpec, compare_pairs, read_pairs_csv

    if args.pairs:
        if args.gen or args.ref or args.gen_mask or args.ref_mask:
            raise ValueError("give either GEN REF [--gen-mask --ref-mask] or --pairs CSV, not both")
        specs = read_pairs_csv(args.pairs)
    elif args.gen and args.ref:
        specs = [PairSpec(args.gen, args.ref, args.gen_mask, args.ref_mask)]
    else:
        raise ValueError("give two images (GEN REF) or --pairs CSV")
    options = CompareOptions(
        tau=args.tau,
        beta=args.beta,
        size=args.size,
        metric=args.metric,
        sscd=args.sscd,
        device=args.device,
        max_pixels=args.max_pixels,
        region_mode=args.region_mode,
    )
    needs_segmenter = any(s.gen_mask is None or s.ref_mask is None for s in specs)
    records = compare_pairs(specs, options, _segmenter(args) if needs_segmenter else None)
    if args.json or not sys.stdout.isatty():
        for r in records:
            print(json.dumps(r))
    else:
        _print_table(records)
    return exits.finished(sum("error" in r for r in records))


def cmd_report(args) -> int:
    from scanner.report.html import build_report

    page = build_report(args.scan, reference=args.reference, count_nm=args.count_nm)
    print(f"report: {page}")
    return exits.OK


def cmd_explain(args) -> int:
    from scanner.report.explain import explain_scan_pair

    r = explain_scan_pair(args.scan, args.gen_id, args.ref_id, args.out, reference=args.reference)
    print(
        f"wrote {args.out}: generation {args.gen_id} vs training image {args.ref_id}: "
        f"{r['label']} (M_full {r['m_full']:.3f}, M_fg {r['m_fg']:.3f}, M_bg {r['m_bg']:.3f}; "
        f"branch {r['branch']}, foreground {r['fg_fraction']:.1%} of the generation)"
    )
    return exits.OK


def cmd_cluster(args) -> int:
    from scanner.clustering import run_cluster_command

    clusters = run_cluster_command(
        args.prompts,
        args.k,
        args.text_encoder,
        args.out,
        limit=args.limit,
        method=args.method,
        model=args.model,
        device=args.device,
    )
    return exits.finished(clusters.attrs["left_out"])


def _labels(path: str, method: str | None):
    """A scan directory's labels (or a labels Parquet/CSV file), one method of it."""
    import pandas as pd

    from scanner.store import ShardedTables

    p = Path(path)
    if p.is_dir():
        table = ShardedTables(p, ["labels"]).read("labels").to_pandas()
    elif p.suffix == ".parquet":
        table = pd.read_parquet(p)
    elif p.suffix == ".csv":
        table = pd.read_csv(p)
    else:
        raise ValueError(f"{path}: expected a scan directory or a labels .parquet/.csv")
    methods = sorted(table["method"].unique()) if "method" in table.columns else []
    if method is not None:
        if method not in methods:
            raise ValueError(f"{path}: no generations of method {method!r}; methods are {methods}")
        return table[table["method"] == method]
    if len(methods) > 1:
        raise ValueError(
            f"{path} holds several methods {methods}; choose one with --pre-method/--post-method"
        )
    return table


def cmd_mitigation_score(args) -> int:
    from scanner.mitigation.score import mitigation_score

    pre = _labels(args.pre, args.pre_method)
    post = _labels(args.post, args.post_method)
    result = mitigation_score(pre, post, allow_unmatched=args.allow_unmatched)
    if args.json or not sys.stdout.isatty():
        print(json.dumps(result.to_dict(), indent=2))
        return exits.OK
    print(
        f"mitigation score (the paper's Table 2): {result.score:.3f} over {result.n:,} generations"
    )
    print("transitions, before (rows) -> after (columns):")
    print("      " + "".join(f"{label:>8}" for label in LABEL_ORDER))
    for label, row in result.to_dict()["transitions"].items():
        print(f"  {label:<4}" + "".join(f"{row[to]:>8,}" for to in LABEL_ORDER))
    unmatched = len(result.unmatched_pre) + len(result.unmatched_post)
    if unmatched:
        print(f"{unmatched:,} generations without a partner were left out (--allow-unmatched)")
    return exits.OK


def cmd_calibrate(args) -> int:
    from scanner.calibrate import run_calibrate_command

    run_calibrate_command(args.labels, args.scan, args.sscd, args.out, reference=args.reference)
    return exits.OK


def cmd_demo(args) -> int:
    from scanner.demo import run_demo

    run_demo(
        Path(args.out),
        size=args.size,
        device=args.device,
        match_by=args.match_by,
        u2netp_path=args.u2netp,
        region_mode=args.region_mode,
    )
    return exits.OK


def _segmenter_config(args):
    from scanner.segment import SegmenterConfig

    return SegmenterConfig(
        kind=args.segmenter,  # None: the default, resolved by SegmenterConfig
        u2netp_path=args.u2netp,
        birefnet_path=args.birefnet,
        trust_remote_code=args.trust_remote_code,
        device=args.device,
    )


def cmd_build_reference(args) -> int:
    from scanner.embed import EmbedConfig
    from scanner.reference import ReferenceConfig, build_reference

    embed = EmbedConfig(
        image_kind="clip" if args.clip else "pixels", clip_path=args.clip, device=args.device
    )
    config = ReferenceConfig(
        size=args.size,
        segmenter=_segmenter_config(args),
        embed=embed,
        shard_size=args.shard_size,
        exact_limit=args.exact_limit,
        max_pixels=args.max_pixels,
    )
    manifest = build_reference(args.src, args.out, config, overwrite=args.overwrite)
    rows = manifest["rows"]
    print(
        f"reference store {args.out}: {rows['references']:,} references, "
        f"{_errors(rows['errors'], args.out)}; index {manifest['index']}, "
        f"embedder {manifest['embedder']}"
    )
    return exits.finished(rows["errors"])


def _errors(count: int, root: str) -> str:
    if not count:
        return "no errors"
    return f"{count:,} error{'s' if count > 1 else ''} (reasons in {Path(root) / 'errors'})"


def cmd_scan_images(args) -> int:
    from scanner.scan import ScanConfig, scan_images

    config = ScanConfig(
        reference=args.reference,
        top_k=args.top_k,
        tau=args.tau,
        beta=args.beta,
        metric=args.metric,
        sscd=args.sscd,
        match_by=args.match_by,
        region_mode=args.region_mode,
        segmenter=_segmenter_config(args),
        device=args.device,
        shard_size=args.shard_size,
        max_pixels=args.max_pixels,
    )
    manifest = scan_images(args.gen, args.out, config, overwrite=args.overwrite)
    # Every scan directory has its report (README), this one too.
    from scanner.report.html import build_report
    from scanner.report.plots import method_name

    page = build_report(args.out)
    summary = json.loads((page.parent / "summary.json").read_text())
    rows = manifest["rows"]
    scanned = "images scanned from files" if manifest["images_from_files"] else "generations"
    print(
        f"scan {args.out}: {rows['generations']:,} {scanned}, {_errors(rows['errors'], args.out)}"
    )
    for method, row in summary["distribution"].items():
        cells = "  ".join(f"{k} {row[k]:,} ({row['share_' + k]:.1%})" for k in LABEL_ORDER)
        print(f"  {method_name(method)}: {cells}")
    print(f"report: {page}")
    return exits.finished(rows["errors"])


def cmd_organism_train(args) -> int:
    import dataclasses

    from scanner.organism.train import TrainConfig, train_organism

    config = TrainConfig()
    overrides = {
        k: v
        for k, v in {
            "vae_steps": args.vae_steps,
            "unet_steps": args.unet_steps,
            "seed": args.seed,
            "threads": args.threads,
        }.items()
        if v is not None
    }
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in overrides.items())
    command = f"fbmem organism train --out {args.out} {flags}".strip()
    recipe = train_organism(args.out, dataclasses.replace(config, **overrides), command=command)
    print(json.dumps({"out": args.out, **recipe["seconds"]}))
    return exits.OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fbmem",
        description="Foreground/background memorization scanner for diffusion models (FB-Mem).",
        epilog="Exit status: 0 all inputs processed, 3 finished with error rows (inputs that "
        "could not be processed), 1 aborted, 2 usage error.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compare", help="Algorithm 1 on one pair of images, or on many from a CSV")
    p.add_argument("gen", nargs="?", help="generated image")
    p.add_argument("ref", nargs="?", help="training (reference) image")
    p.add_argument(
        "--gen-mask", help="foreground mask of GEN (white = foreground); segmented when absent"
    )
    p.add_argument("--ref-mask", help="foreground mask of REF")
    p.add_argument(
        "--pairs",
        metavar="CSV",
        help="CSV with columns gen, ref [, gen_mask, ref_mask], paths relative to the CSV",
    )
    p.add_argument("--json", action="store_true", help="JSON lines even on a terminal")
    _add_fbmem_options(p)
    _add_max_pixels(p)
    _add_region_mode(p)
    _add_segmenter_options(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "build-reference",
        help="build a reference store (images, masks, embeddings, index) from training images",
    )
    p.add_argument(
        "src",
        help="folder of images (captions from sidecar .txt files) or CSV/Parquet with path [, caption, ref_id]",
    )
    p.add_argument("--out", required=True, help="reference store folder")
    p.add_argument(
        "--size", type=int, default=DEFAULT_SIZE, help="canonical size (default %(default)s)"
    )
    p.add_argument(
        "--clip",
        metavar="PATH",
        help="CLIP model folder or id for the prefilter (default: weightless pixel embedding)",
    )
    p.add_argument("--shard-size", type=int, default=256, help="references per resumable shard")
    p.add_argument(
        "--exact-limit",
        type=int,
        default=1_000_000,
        help="exact index up to this many references, IVF-PQ above (default %(default)s)",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    p.add_argument("--overwrite", action="store_true", help="discard an existing store at --out")
    _add_max_pixels(p)
    _add_segmenter_options(p)
    p.set_defaults(func=cmd_build_reference)

    p = sub.add_parser(
        "scan-images", help="scan generated images against a reference store into a scan directory"
    )
    p.add_argument(
        "gen",
        help="folder of generated images or CSV/Parquet with path [, prompt, prompt_id, gen_idx, method]",
    )
    p.add_argument("--reference", required=True, help="reference store folder")
    p.add_argument("--out", required=True, help="scan directory")
    p.add_argument(
        "--top-k", type=int, default=16, help="prefilter candidates per generation; 0 = exhaustive"
    )
    p.add_argument("--shard-size", type=int, default=256, help="generations per resumable shard")
    p.add_argument("--overwrite", action="store_true", help="discard an existing scan at --out")
    _add_fbmem_options(p, size=False)
    _add_max_pixels(p)
    _add_match_by(p)
    _add_region_mode(p)
    _add_segmenter_options(p)
    p.set_defaults(func=cmd_scan_images)

    p = sub.add_parser("cluster", help="cluster prompts by their text embeddings (k-means)")
    p.add_argument("prompts", help="bundled set (memorized, unmemorized) or CSV/Parquet/text file")
    p.add_argument("--k", type=int, default=12, help="clusters (default %(default)s, the paper's)")
    p.add_argument(
        "--method",
        choices=("default", "authors"),
        default="default",
        help="default: unit sentence embeddings, 10 k-means restarts; authors: the FB-Mem "
        "authors' recipe on a Stable Diffusion model's own text-encoder states (needs --model)",
    )
    p.add_argument(
        "--text-encoder",
        metavar="PATH",
        help="CLIP folder for the text encoder (default: bundled MiniLM)",
    )
    p.add_argument(
        "--model", metavar="PATH", help="Stable Diffusion folder (with --method authors)"
    )
    p.add_argument("--device", default="cpu", help="torch device for the text encoder")
    p.add_argument("--limit", type=int, help="first prompts only")
    p.add_argument(
        "--out", required=True, help="Parquet file: prompt_id, prompt, cluster_id, distance"
    )
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser(
        "mitigation-score", help="the paper's Table 2 score of labels before and after a mitigation"
    )
    p.add_argument("pre", help="scan directory or labels table before mitigation")
    p.add_argument("post", help="scan directory or labels table after mitigation")
    p.add_argument("--pre-method", help="method of PRE to use when it holds several (e.g. none)")
    p.add_argument(
        "--post-method", help="method of POST to use when it holds several (e.g. nemo-c)"
    )
    p.add_argument(
        "--allow-unmatched",
        action="store_true",
        help="score the generations present in both instead of failing",
    )
    p.add_argument("--json", action="store_true", help="JSON even on a terminal")
    p.set_defaults(func=cmd_mitigation_score)

    p = sub.add_parser(
        "calibrate",
        help="the paper's Table 1 measures of SSIM, MS-SSIM (and SSCD) against human labels",
    )
    p.add_argument("labels", help="CSV/Parquet: gen_id or path, label (VM/TM/NM), optional ref")
    p.add_argument("--scan", required=True, help="scan directory holding the labelled generations")
    p.add_argument("--sscd", metavar="PATH", help="SSCD TorchScript file: also calibrate SSCD")
    p.add_argument("--out", help="JSON file for the results")
    p.add_argument("--reference", help="reference store, if it moved since the scan")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("report", help="(re)build a scan's summary, plots and HTML report")
    p.add_argument("scan", help="scan directory")
    p.add_argument("--reference", help="reference store, if it moved since the scan")
    p.add_argument(
        "--count-nm",
        action="store_true",
        help="one-to-many: count every generation's match, NM included, as the FB-Mem authors' "
        "script did (default: memorized generations only, the paper's text)",
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "explain", help="evidence picture of one (generation, training image) pair of a scan"
    )
    p.add_argument("scan", help="scan directory")
    p.add_argument("gen_id", help='generation id, e.g. "12:3"')
    p.add_argument("ref_id", help="reference id")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--reference", help="reference store, if it moved since the scan")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser(
        "organism",
        help="the memorization model organism: a small diffusion model that memorizes by design",
    )
    org = p.add_subparsers(dest="organism_command", required=True)
    p = org.add_parser(
        "train",
        help="(re)train it from scratch into a diffusers folder (about 30 minutes on 2 cores)",
    )
    p.add_argument(
        "--out", required=True, help="output folder (a diffusers pipeline + recipe.json)"
    )
    p.add_argument("--vae-steps", type=int, help="VAE training steps (default: the recipe's)")
    p.add_argument("--unet-steps", type=int, help="UNet training steps (default: the recipe's)")
    p.add_argument("--seed", type=int, help="seed of every random draw (default 0)")
    p.add_argument("--threads", type=int, help="CPU threads (default 2; the result depends on it)")
    p.set_defaults(func=cmd_organism_train)

    p = sub.add_parser(
        "demo",
        help="build the replication set and label it with Algorithm 1 (true masks, then each segmenter)",
    )
    p.add_argument(
        "--out", default="scans/demo-compare", help="output folder (default %(default)s)"
    )
    p.add_argument(
        "--size",
        type=int,
        default=256,
        help="canonical size for the demo (default %(default)s, fast on CPU)",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    _add_match_by(p)
    _add_region_mode(p)
    _add_u2netp(p)
    p.set_defaults(func=cmd_demo)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fbmem-scanner")
    except PackageNotFoundError:
        return "(not installed; running from a checkout)"


def _run(args) -> int:
    if getattr(args, "device", None) is not None:
        check_device(args.device)
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # usage errors: argparse exits with 2
    return exits.run(f"fbmem {args.command}", _run, args)


if __name__ == "__main__":
    sys.exit(main())
