"""Which offline zero-shot setup to ship: every candidate on two real offline protocols (issue 16).

Candidates: ConSE on EfficientNet-Lite0 / Lite1 / Lite2 and the Lite0+Lite2 ensemble
(:mod:`oodscope.backbones.classifier_ensemble`), each with every ``label_text`` option of
:mod:`oodscope.backbones.conse`; detectors MCM, NegLabel (official recipe), AdaNeg (official, scored
per OOD set on a reset, seeded ID+OOD stream as bench does) and ``label_vocabulary`` (top-k 1 / 3 /
10 / 30 and soft 0.02 / 0.05). Protocols: ``fashion-mnist-ood`` (greyscale garment photos; near-OOD
= the 4 other garment classes, far-OOD = digits, textiles; 1,000 images per test set as in the
leaderboard) and ``openclipart`` (colour drawings; ID = mammal / bird / bug / fish, far-OOD = food,
vehicles, plants; every image). EOE (needs LLM-written outlier names per protocol), GL-MCM (patch
embeddings) and CLIPN (a learned "no" encoder) are not candidates here.

Prints one table per protocol (AUROC in %, near / far / all averages, zero-shot ID accuracy, fit and
score seconds) and a summary per (backbone, label text, detector) averaged over the two protocols,
and the forward cost of each network (ms per image, batch 32, this machine). The classifier
features are cached (``$OODSCOPE_CACHE/features``, else ``~/.cache/oodscope/features``), so reruns
only fit and score::

    nice python benchmarks/zero_shot_default.py --every fashion-mnist-ood=2 --csv runs/zero-shot-default.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OODSCOPE_TEXT_CACHE", str(Path.home() / ".cache" / "oodscope" / "text"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from oodscope.backbones import create as create_backbone  # noqa: E402
from oodscope.backbones.base import Features, derived_from  # noqa: E402
from oodscope.backbones.classifier_ensemble import combine  # noqa: E402
from oodscope.backbones.conse import LABEL_TEXTS  # noqa: E402
from oodscope.detectors import create as create_detector  # noqa: E402
from oodscope.evaluation.bench_config import spread  # noqa: E402
from oodscope.evaluation.metrics import auroc  # noqa: E402
from oodscope.evaluation.streams import adaptive_pair_scores  # noqa: E402
from oodscope.features.extract import extract  # noqa: E402
from oodscope.io import Subset, resolve_images  # noqa: E402
from oodscope.io.registry import get_benchmark  # noqa: E402
from oodscope.text.prompts import class_text_embeddings  # noqa: E402

NETWORKS = ("effnet-lite0", "effnet-lite1", "effnet-lite2", "effnet-lite0+effnet-lite2")
PROTOCOLS = ("fashion-mnist-ood", "openclipart")
DETECTORS: dict[str, tuple[str, dict]] = {
    "mcm": ("mcm", {}),
    "neglabel": ("neglabel", {}),
    "adaneg": ("adaneg", {}),
    "label_vocabulary k=1": ("label_vocabulary", {"top_k": 1}),
    "label_vocabulary k=3": ("label_vocabulary", {"top_k": 3}),
    "label_vocabulary k=10": ("label_vocabulary", {"top_k": 10}),
    "label_vocabulary k=30": ("label_vocabulary", {"top_k": 30}),
    "label_vocabulary soft 0.02": ("label_vocabulary", {"weighting": "soft", "temperature": 0.02}),
    "label_vocabulary soft 0.05": ("label_vocabulary", {"weighting": "soft", "temperature": 0.05}),
}


def cache_dir() -> Path:
    root = os.environ.get("OODSCOPE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "oodscope") / "features"


def protocol_sets(name: str, limit: int | None, every: int = 1) -> tuple[dict, list[str]]:
    """Set name -> (kind, source) of a registered benchmark (test sets only: zero-shot needs no fit set):
    ``limit`` images spread evenly through each set (as bench's ``--limit``), then every ``every``-th."""
    bench = get_benchmark(name)
    sets = {"id": ("id", bench.id)}
    sets |= {k: ("near", v) for k, v in bench.near.items()} | {k: ("far", v) for k, v in bench.far.items()}
    out = {}
    for set_name, (kind, spec) in sets.items():
        source = resolve_images(spec)
        idx = spread(len(source), limit)[::every]
        out[set_name] = (kind, source if len(idx) == len(source) else Subset(source, idx))
    classes = bench.classes() if bench.classes else list(out["id"][1].class_names)
    return out, [c.lower() for c in classes]


def network_features(network, source, extract_ensembles: bool) -> Features:
    """The network's features of ``source`` (feature cache). An ensemble, unless ``extract_ensembles``,
    combines its members' cached features (:func:`oodscope.backbones.classifier_ensemble.combine`):
    the same combination, but each member on its own preprocessing instead of the largest member's
    crop resized (the difference is measured with ``--extract-ensembles``, docs/zero_shot.md)."""
    members = getattr(network, "members", None)
    if members is not None and not extract_ensembles:
        return combine([network_features(m, source, True) for m in members], network.id)
    return extract(network, source, cache_dir=cache_dir(), progress=False, description=network.id).features


def forward_ms(network, spec_size: int, rounds: int = 3) -> float:
    """Median ms per image of the network's forward on a batch of 32 (synthetic pixels; cost only)."""
    batch = torch.zeros(32, 3, spec_size, spec_size).uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
    network.encode_images(batch[:4])  # warm up
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        network.encode_images(batch)
        times.append((time.perf_counter() - started) / len(batch) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=1000, help="images per test set (spread evenly)")
    parser.add_argument("--every", default="", metavar="PROTOCOL=N,...",
                        help="then keep every N-th of them for these protocols (a cheaper subset)")
    parser.add_argument("--extract-ensembles", action="store_true",
                        help="run an ensemble's network on the images (default: combine its members' cached "
                        "features with classifier_ensemble.combine, each member on its own preprocessing)")
    parser.add_argument("--networks", default=",".join(NETWORKS))
    parser.add_argument("--label-texts", default=",".join(LABEL_TEXTS))
    parser.add_argument("--detectors", default=",".join(DETECTORS))
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--csv", default=None, help="also write every row here")
    parser.add_argument("--no-speed", action="store_true", help="skip the forward-cost measurement")
    parser.add_argument("--from-csv", default=None, help="print the tables of an earlier run's --csv file")
    args = parser.parse_args()
    if args.from_csv:
        rows, speed = read_csv(args.from_csv)
        report(rows, {p: sorted({k for r in rows if r["protocol"] == p for k in r if k in SET_KINDS.get(p, ())},
                                key=SET_KINDS.get(p, ()).index) for p in dict.fromkeys(r["protocol"] for r in rows)},
               speed)
        return
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    every = {k: int(v) for k, v in (item.split("=") for item in args.every.split(",") if item)}
    networks = args.networks.split(",")
    texts = args.label_texts.split(",")
    detectors = args.detectors.split(",")
    rows: list[dict] = []
    speed: dict[str, float] = {}
    for protocol in args.protocols.split(","):
        sets, classes = protocol_sets(protocol, args.limit, every.get(protocol, 1))
        for network_name in networks:
            network = None
            for label_text in texts:
                backbone = create_backbone(f"conse:{network_name}", device="cpu", label_text=label_text)
                network, derive = derived_from(backbone)
                feats, labels = {}, None
                for set_name, (_, source) in sets.items():
                    feats[set_name] = derive(network_features(network, source, args.extract_ensembles))
                    if set_name == "id":
                        labels = np.asarray(source.labels)
                prompts = class_text_embeddings(backbone, classes, "simple")
                accuracy = float(((feats["id"].embedding @ prompts.T).argmax(1) == labels).mean())
                for det_name in detectors:
                    method, params = DETECTORS[det_name]
                    det = create_detector(method, classes=classes, **params)
                    started = time.perf_counter()
                    det.fit(text_encoder=backbone)
                    fit_s = time.perf_counter() - started
                    started = time.perf_counter()
                    row = {"protocol": protocol, "network": network_name, "label_text": label_text,
                           "detector": det_name, "id_acc": accuracy, "fit_s": fit_s}
                    adaptive = det.fit_needs().adaptive
                    id_scores = None if adaptive else det.score(feats["id"])
                    for set_name in sets:
                        if set_name == "id":
                            continue
                        if adaptive:
                            s_id, s_ood = adaptive_pair_scores(det, feats["id"], feats[set_name])
                        else:
                            s_id, s_ood = id_scores, det.score(feats[set_name])
                        row[set_name] = auroc(s_id, s_ood)
                    row["score_s"] = time.perf_counter() - started
                    for kind in ("near", "far"):
                        vals = [row[n] for n, (k, _) in sets.items() if k == kind]
                        row[f"{kind}_avg"] = float(np.mean(vals)) if vals else float("nan")
                    row["all_avg"] = float(np.mean([row[n] for n in sets if n != "id"]))
                    rows.append(row)
                    print(f"{protocol:18} {network_name:26} {label_text:23} {det_name:27} "
                          f"near {row['near_avg'] * 100:5.1f} far {row['far_avg'] * 100:5.1f} "
                          f"all {row['all_avg'] * 100:5.1f} acc {accuracy * 100:5.1f}", flush=True)
            if network is not None and not args.no_speed and network_name not in speed:
                speed[network_name] = forward_ms(network, network.input_spec.size)
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        table = rows + [{"protocol": "speed", "network": n, "ms_per_image": ms} for n, ms in speed.items()]
        keys = sorted({k for r in table for k in r})
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(table)
    report(rows, {p: [n for n in protocol_sets(p, args.limit, every.get(p, 1))[0] if n != "id"]
                  for p in args.protocols.split(",")}, speed)


#: OOD set names of each protocol, in table order (for --from-csv).
SET_KINDS = {"fashion-mnist-ood": ("fashion_near", "digits", "textiles"),
             "openclipart": ("food", "vehicles", "plants")}
TEXT_KEYS = ("protocol", "network", "label_text", "detector")


def read_csv(path: str) -> tuple[list[dict], dict[str, float]]:
    rows, speed = [], {}
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            if r["protocol"] == "speed":
                speed[r["network"]] = float(r["ms_per_image"])
                continue
            rows.append({k: (v if k in TEXT_KEYS else float(v) if v not in ("", None) else float("nan"))
                         for k, v in r.items() if k != "ms_per_image"})
    return rows, speed


def mean_over(rows: list[dict], key: str) -> dict[str, float]:
    """Mean 'all' AUROC average per value of ``key``, each protocol weighted equally."""
    out: dict[str, float] = {}
    for value in dict.fromkeys(r[key] for r in rows):
        per_protocol = {}
        for r in rows:
            if r[key] == value:
                per_protocol.setdefault(r["protocol"], []).append(r["all_avg"])
        out[value] = float(np.mean([np.mean(v) for v in per_protocol.values()]))
    return out


def decisions(rows: list[dict], speed: dict[str, float]) -> None:
    """The three choices, each by the mean 'all' AUROC over both protocols (equal weight) and every
    other candidate dimension, in this order: label_vocabulary's weighting, ConSE's label text (over
    the four methods, label_vocabulary at its chosen weighting), the backbone (at the chosen text)."""
    pct = lambda v: f"{v * 100:.1f}"  # noqa: E731
    lv = [r for r in rows if r["detector"].startswith("label_vocabulary")]
    if not lv:
        return
    by_variant = mean_over(lv, "detector")
    best_variant = max(by_variant, key=by_variant.get)
    print("\n### Decision 1: label_vocabulary weighting (mean over protocols, backbones, label texts)\n")
    print("| variant | mean all |\n|---|---|")
    for name, v in sorted(by_variant.items(), key=lambda t: -t[1]):
        print(f"| {name} | {pct(v)} |")
    methods = [r for r in rows if not r["detector"].startswith("label_vocabulary") or r["detector"] == best_variant]
    by_text = mean_over(methods, "label_text")
    best_text = max(by_text, key=by_text.get)
    print(f"\n### Decision 2: ConSE label text (mean over protocols, backbones and the methods; "
          f"label_vocabulary = {best_variant})\n")
    print("| label text | mean all | " + " | ".join(dict.fromkeys(r["detector"] for r in methods)) + " |")
    print("|---" * (2 + len(dict.fromkeys(r["detector"] for r in methods))) + "|")
    for text, v in sorted(by_text.items(), key=lambda t: -t[1]):
        per = mean_over([r for r in methods if r["label_text"] == text], "detector")
        print(f"| {text} | {pct(v)} | " + " | ".join(pct(x) for x in per.values()) + " |")
    at_text = [r for r in methods if r["label_text"] == best_text]
    by_network = mean_over(at_text, "network")
    print(f"\n### Decision 3: backbone (label text {best_text}; mean over protocols and the methods)\n")
    print("| backbone | mean all | " + " | ".join(dict.fromkeys(r["detector"] for r in at_text))
          + " | ms / image |")
    print("|---" * (3 + len(dict.fromkeys(r["detector"] for r in at_text))) + "|")
    for network, v in sorted(by_network.items(), key=lambda t: -t[1]):
        per = mean_over([r for r in at_text if r["network"] == network], "detector")
        cost = speed.get(network)
        print(f"| conse:{network} | {pct(v)} | " + " | ".join(pct(x) for x in per.values())
              + f" | {'-' if cost is None else f'{cost:.1f}'} |")


def report(rows: list[dict], sets_by_protocol: dict[str, list[str]], speed: dict[str, float]) -> None:
    pct = lambda v: f"{v * 100:.1f}" if v == v else "-"  # noqa: E731
    for protocol, ood in sets_by_protocol.items():
        print(f"\n### {protocol}: AUROC % (higher is better)\n")
        print("| backbone | label text | detector | " + " | ".join(ood) + " | near | far | all | ID acc. | fit s |")
        print("|---" * (len(ood) + 8) + "|")
        for r in sorted((r for r in rows if r["protocol"] == protocol), key=lambda r: -r["all_avg"]):
            print(f"| conse:{r['network']} | {r['label_text']} | {r['detector']} | "
                  + " | ".join(pct(r[n]) for n in ood)
                  + f" | {pct(r['near_avg'])} | {pct(r['far_avg'])} | {pct(r['all_avg'])} | {pct(r['id_acc'])} "
                  f"| {r['fit_s']:.2f} |")
    print("\n### Both protocols: mean of the two 'all' averages (and of the two far averages)\n")
    print("| backbone | label text | detector | mean all | mean far | " + " | ".join(
        f"{p} all" for p in sets_by_protocol) + " |")
    print("|---" * (5 + len(sets_by_protocol)) + "|")
    keyed: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        keyed.setdefault((r["network"], r["label_text"], r["detector"]), {})[r["protocol"]] = r
    summary = []
    for key, per in keyed.items():
        if len(per) != len(sets_by_protocol):
            continue
        summary.append((float(np.mean([v["all_avg"] for v in per.values()])),
                        float(np.mean([v["far_avg"] for v in per.values()])), key, per))
    for mean_all, mean_far, key, per in sorted(summary, key=lambda t: -t[0]):
        print(f"| conse:{key[0]} | {key[1]} | {key[2]} | {pct(mean_all)} | {pct(mean_far)} | "
              + " | ".join(pct(per[p]["all_avg"]) for p in sets_by_protocol) + " |")
    if speed:
        print("\n### Network forward cost (ms per image, batch 32, median of 3, this machine)\n")
        print("| network | ms / image |\n|---|---|")
        for name, ms in speed.items():
            print(f"| {name} | {ms:.1f} |")
    decisions(rows, speed)


if __name__ == "__main__":
    main()
