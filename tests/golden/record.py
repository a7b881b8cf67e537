"""Records, re-records and compares golden outputs of hnsample's public API (the corpus in this folder).

    python tests/golden/record.py                                # record every entry (portable tier)
                                                                 #   into tests/golden/golden.npz
    python tests/golden/record.py --update topk_similarity info_nce/hcl_f64
                                                                 # re-record the named groups/entries
    python tests/golden/record.py --tier full --out /tmp/x.npz   # random-float inputs (same machine only)
    python tests/golden/record.py --compare /tmp/x.npz           # per-entry table: identical / differing
    python tests/golden/record.py --list                         # entry names by group

Names select a group ("info_nce"), an entry ("info_nce/hcl_f64") or a prefix ending in '*'
("topk_similarity/f32_*"). A portable-tier comparison applies each field's stated rule (bits, or the
stated tolerance for libm-dependent values); a full-tier comparison is bit for bit. The exit status of
--compare is 1 when any entry differs beyond its rule.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: the golden package

import hnsample  # noqa: E402

if Path(hnsample.__file__).resolve().parent == HERE.parents[1] / "hnsample":  # pragma: no cover
    raise SystemExit("record.py must run against the installed hnsample (pip install . first)")

from golden.corpus import ENTRIES, TIERS, group_of, run_entry, select  # noqa: E402  (registers every entry)
from golden.store import diff_entry, load, save  # noqa: E402

DEFAULT_OUT = HERE / "golden.npz"


def _record(names: list[str], tier: str) -> dict:
    out = {}
    for name in names:
        out[name] = run_entry(name, tier)
    return out


def _table(rows: list[tuple[str, str, str]]) -> str:
    width = max([len(r[0]) for r in rows] + [5])
    lines = [f"{'entry':<{width}}  {'status':<16}  detail", "-" * (width + 40)]
    lines += [f"{name:<{width}}  {status:<16}  {detail}" for name, status, detail in rows]
    return "\n".join(lines)


def compare_file(path: Path, patterns: list[str] | None) -> int:
    golden_file = load(path)
    names = select(patterns)
    recorded = [n for n in golden_file.entries if not patterns or n in names]
    rows = []
    counts = {"identical": 0, "within tolerance": 0, "differing": 0, "not recorded": 0, "not in corpus": 0}
    for name in sorted(set(names) | set(recorded)):
        if name not in ENTRIES:
            rows.append((name, "not in corpus", "recorded entry the corpus no longer has"))
            counts["not in corpus"] += 1
            continue
        if name not in golden_file.entries:
            rows.append((name, "not recorded", "new corpus entry"))
            counts["not recorded"] += 1
            continue
        current = run_entry(name, golden_file.tier)
        diff = diff_entry(golden_file.entries[name], current, bits=golden_file.tier == "full")
        problems = diff.problems
        if problems:
            status = "differing"
            detail = "; ".join(problems[:2]) + (f"; ... ({len(problems)} fields)" if len(problems) > 2 else "")
        elif diff.identical:
            status, detail = "identical", ""
        else:
            status, detail = "within tolerance", f"closest: {diff.worst[0]} at {diff.worst[1]:.1%} of its tolerance"
        counts[status] += 1
        rows.append((name, status, detail))
    print(_table(rows))
    print(f"\n{path} (tier {golden_file.tier}): " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
    return 1 if counts["differing"] or counts["not recorded"] or counts["not in corpus"] else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tier", choices=TIERS, default="portable")
    ap.add_argument("--out", type=Path, default=None, help=f"file to write (default {DEFAULT_OUT} for portable)")
    ap.add_argument("--update", nargs="+", metavar="NAME", help="re-record only these groups/entries in --out")
    ap.add_argument("--compare", type=Path, metavar="FILE", help="compare the current code with FILE")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="with --compare: only these groups/entries")
    ap.add_argument("--list", action="store_true", help="list the corpus entries")
    args = ap.parse_args(argv)

    if args.list:
        for name in ENTRIES:
            print(f"{group_of(name):<22} {name}")
        return 0
    if args.compare is not None:
        return compare_file(args.compare, args.only)

    out = args.out
    if out is None:
        if args.tier != "portable":
            ap.error("--tier full needs --out (the committed golden file holds the portable tier)")
        out = DEFAULT_OUT
    elif args.tier == "full" and out.resolve() == DEFAULT_OUT:
        ap.error(f"{DEFAULT_OUT} holds the portable tier; write the full tier elsewhere")

    start = time.perf_counter()
    if args.update:
        names = select(args.update)
        if not names:
            ap.error(f"no corpus entry matches {args.update}")
        old = load(out)
        if old.tier != args.tier:
            ap.error(f"{out} holds the {old.tier} tier; pass --tier {old.tier}")
        stale = sorted(set(old.entries) - set(ENTRIES))
        kept = [n for n in ENTRIES if n in old.entries and n not in names]
        entries = {name: old.fields(name) for name in kept} | _record(names, args.tier)
        size = save(out, args.tier, entries)
        print(f"re-recorded {len(names)} entries into {out} ({size / 1e6:.2f} MB)"
              + (f"; dropped {len(stale)} stale: {', '.join(stale)}" if stale else ""))
    else:
        entries = _record(list(ENTRIES), args.tier)
        size = save(out, args.tier, entries)
        print(f"recorded {len(entries)} entries ({args.tier} tier) into {out} ({size / 1e6:.2f} MB)")
    print(f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
