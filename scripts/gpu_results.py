"""Turns a scripts/gpu_check.sh run (OUT_DIR/summary.txt and the benchmark JSON beside it) into the
README's GPU table, and files the results under benchmarks/results with their machine, date and commit.

    python scripts/gpu_results.py OUT_DIR            print the table (markdown)
    python scripts/gpu_results.py OUT_DIR --write    also replace the README block between
                                                     <!-- gpu-results:start --> and <!-- gpu-results:end -->,
                                                     copy summary.txt to benchmarks/results/gpu_check_DATE.txt
                                                     and each JSON to benchmarks/results/ (commit added)
    python scripts/gpu_results.py --digest           the source digest gpu_check.sh records

The digest (sha256 of csrc/, online_softmax/, scripts/, tests/, setup.py, pyproject.toml) tells whether
the results come from the sources in this checkout: the tree that travels to a GPU machine carries no
.git, so the commit is whatever the caller passed, and the digest is the check.
"""

import argparse
import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- gpu-results:start -->", "<!-- gpu-results:end -->"
SOURCE_DIRS = ("csrc", "online_softmax", "scripts", "tests")
SOURCE_FILES = ("setup.py", "pyproject.toml", "MANIFEST.in")
SUFFIXES = {".py", ".cpp", ".h", ".cu", ".cuh", ".sh", ".toml", ".in"}
GENERATED = {"_torch_build.py"}
BENCH_JSONS = ("cuda_float32_check.json", "cuda_float32.json", "cuda_float32_compile.json")


def source_digest(root=ROOT):
    files = [root / f for f in SOURCE_FILES if (root / f).is_file()]
    for d in SOURCE_DIRS:
        files += [p for p in (root / d).rglob("*") if p.is_file() and p.suffix in SUFFIXES
                  and p.name not in GENERATED
                  and not {"build", "__pycache__"} & set(p.relative_to(root).parts)]
    h = hashlib.sha256()
    for p in sorted(files):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


PHASE = re.compile(r"^phase (\S+): (pass|FAIL(?: \(timed out\))?|skipped)"
                   r"(?:, exit (\d+), (\d+) s \(limit (\d+) s\))?(.*)$")


def parse_summary(text):
    """The facts of a summary.txt: header, machine, phases, test line, sanitizer and failure lines."""
    s = {"phases": [], "failures": [], "sanitizers": {}}
    for line in text.splitlines():
        m = re.match(r"^gpu_check (\S+) commit (.+?) source (\S+)$", line)
        if m:
            s["date"], s["commit"], s["digest"] = m.groups()
            continue
        m = PHASE.match(line)
        if m:
            name, verdict, rc, secs, limit, rest = m.groups()
            s["phases"].append({"phase": name, "verdict": verdict, "exit": rc, "seconds": secs, "limit": limit,
                                "note": rest.lstrip(", ")})
            continue
        for key in ("machine", "gpu", "tests", "done", "selected", "smoke"):
            if line.startswith(key + ": ") and key not in s:
                s[key] = line[len(key) + 2:]
        m = re.match(r"^(memcheck|racecheck): (.*(?:ERROR|RACECHECK) SUMMARY.*)$", line)
        if m:
            s["sanitizers"][m.group(1)] = m.group(2).lstrip("= ").strip()
        if re.match(r"^(FAILED|ERROR) ", line):
            s["failures"].append(line)
    return s


def bench_table(data):
    rows = ["| op | rows × cols | online_softmax ms | torch ms | speedup | GB/s (% of copy) | × the modelled time |",
            "|---|---|---|---|---|---|---|"]
    by_key = {}
    for r in data["results"]:
        by_key.setdefault((r["op"], r["rows"], r["cols"]), {})[r["impl"]] = r
    for (op, rows_, cols), impls in by_key.items():
        ours, eager = impls.get("online_softmax"), impls.get("torch")
        if not ours:
            continue
        rows.append("| " + " | ".join([
            op, f"{rows_} × {cols}", f"{ours['time_ms']:.3f}", f"{eager['time_ms']:.3f}" if eager else "—",
            f"{ours['speedup_vs_torch']:.2f}×" if "speedup_vs_torch" in ours else "—",
            f"{ours['gbps']:.0f}" + (f" ({100 * ours['fraction_of_copy']:.0f}%)" if "fraction_of_copy" in ours else ""),
            f"{ours['time_over_model']:.2f}" if "time_over_model" in ours else "—"]) + " |")
    return "\n".join(rows)


def render(out_dir, summary, benches, digest_now):
    date = summary.get("date", "?")[:10]
    digest = summary.get("digest", "unknown")
    same = ("the sources of this checkout" if digest == digest_now
            else f"sources that differ from this checkout's ({digest})")
    lines = [START,
             f"GPU check of {date}, commit `{summary.get('commit', 'unknown')}` ({same}): "
             f"{summary.get('machine', 'machine unknown')}. Summary: `benchmarks/results/gpu_check_{date}.txt`.",
             "",
             "| phase | result | seconds (limit) |",
             "|---|---|---|"]
    for p in summary["phases"]:
        secs = f"{p['seconds']} ({p['limit']})" if p["seconds"] else "—"
        lines.append(f"| {p['phase']} | {p['verdict']}{', ' + p['note'] if p['note'] else ''} | {secs} |")
    lines.append("")
    facts = []
    if "selected" in summary:
        facts.append(f"Selected: {summary['selected']}.")
    if "tests" in summary:
        facts.append(f"Tests: {summary['tests'].strip('= ')}.")
    for tool, text in summary["sanitizers"].items():
        facts.append(f"{tool}: {text}.")
    if summary["failures"]:
        facts.append(f"{len(summary['failures'])} failures, first: `{summary['failures'][0]}`.")
    lines.append(" ".join(facts) if facts else "No test or sanitizer result.")
    for name, data in benches.items():
        m = data["machine"]
        lines += ["", f"`benchmarks/results/{name}` ({m.get('gpu', '?')}, float32, median of interleaved rounds, "
                      f"{m.get('date', '?')}):", "", bench_table(data)]
    lines.append(END)
    return "\n".join(lines)


def replace_block(text, block):
    if START not in text or END not in text:
        raise SystemExit(f"gpu_results: no {START} ... {END} block in the README")
    head, rest = text.split(START, 1)
    return head + block + rest.split(END, 1)[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", nargs="?")
    p.add_argument("--digest", action="store_true", help="print the source digest and stop")
    p.add_argument("--write", action="store_true", help="update the README and benchmarks/results")
    p.add_argument("--root", default=str(ROOT), help="the checkout to update (tests use a copy)")
    args = p.parse_args(argv)
    root = Path(args.root)
    if args.digest:
        print(source_digest(root))
        return 0
    if not args.out_dir:
        p.error("OUT_DIR is required")
    out = Path(args.out_dir)
    summary = parse_summary((out / "summary.txt").read_text())
    benches = {}
    for name in BENCH_JSONS:
        if (out / name).is_file():
            data = json.loads((out / name).read_text())
            data["machine"].update(commit=summary.get("commit"), source_digest=summary.get("digest"))
            benches[name] = data
    digest_now = source_digest(root)
    block = render(out, summary, benches, digest_now)
    print(block)
    if summary.get("digest") != digest_now:
        print(f"gpu_results: the run's sources ({summary.get('digest')}) differ from this checkout's ({digest_now})",
              file=sys.stderr)
    if args.write:
        results = root / "benchmarks" / "results"
        results.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "summary.txt", results / f"gpu_check_{summary.get('date', 'undated')[:10]}.txt")
        for name, data in benches.items():
            (results / name).write_text(json.dumps(data, indent=1))
        readme = root / "README.md"
        readme.write_text(replace_block(readme.read_text(), block))
        print(f"gpu_results: wrote {readme} and {len(benches) + 1} files under {results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
