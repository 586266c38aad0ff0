"""Tables from results.jsonl: medians over rounds, and ratios to nginx taken inside each round.

python report.py results/<time>/results.jsonl        # print the summary again
python report.py --profile results/profile-<time>/pyspy.txt
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

BASE = "nginx"
Rec = dict


def load(path: Path) -> list[Rec]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(header: list[str], rows: Iterable[list[object]]) -> str:
    rows = [[fmt(c) for c in r] for r in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]

    def line(cells: list[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    sep = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:.0f}"
        if abs(v) >= 100:
            return f"{v:.1f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3f}"
    return str(v)


class Results:
    def __init__(self, recs: list[Rec]) -> None:
        self.by: dict[tuple[str, str], dict[int, Rec]] = defaultdict(dict)
        for r in recs:
            self.by[(r["target"], r["scenario"])][r["round"]] = r
        self.rounds = sorted({r["round"] for r in recs})

    def values(self, target: str, scen: str, key: str | Callable[[Rec], object]) -> list[float]:
        get = key if callable(key) else (lambda r: r.get(key))  # type: ignore[union-attr]
        out = []
        for _, r in sorted(self.by.get((target, scen), {}).items()):
            v = get(r)
            if isinstance(v, int | float) and r.get("ok", True):
                out.append(float(v))
        return out

    def med(self, target: str, scen: str, key: str | Callable[[Rec], object]) -> float | None:
        v = self.values(target, scen, key)
        return statistics.median(v) if v else None

    def ratio(self, target: str, scen: str, key: str) -> float | None:
        """Median over rounds of target/nginx, both measured in the same round."""
        mine, base = self.by.get((target, scen), {}), self.by.get((BASE, scen), {})
        ratios = []
        for rnd in self.rounds:
            a, b = mine.get(rnd, {}).get(key), base.get(rnd, {}).get(key)
            if isinstance(a, int | float) and isinstance(b, int | float) and b:
                ratios.append(a / b)
        return round(statistics.median(ratios), 2) if ratios else None


def summarize(path: Path, meta: dict, targets: list[str]) -> str:
    res = Results(load(path))
    o = meta.get("options", {})
    out = [
        f"# Sidecar vs peers, {meta.get('date', '')}",
        "",
        f"{len(res.rounds)} interleaved rounds; medians over rounds; wrk {o.get('duration')} s "
        f"per run after {o.get('warmup')} s warm-up; proxy on CPU 0, load and upstream on CPU 1. "
        f"Sidecar {meta.get('sidecar_commit', '?')}; {meta.get('python', '')}; "
        f"{meta.get('nginx', '')}; {meta.get('haproxy', '')}; {meta.get('cpu', '')}.",
        "",
        "## Small GETs",
        "",
    ]
    hdr = ["target"]
    for c in ("c1", "c16", "c128"):
        hdr += [f"{c} req/s", f"{c} p50 ms", f"{c} p99 ms", f"{c} CPU µs/req"]
    hdr.append("errors")
    rows = []
    for t in targets:
        row: list[object] = [t]
        errors = 0
        for c in ("c1", "c16", "c128"):
            s = f"get_{c}"
            row += [res.med(t, s, k) for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req")]
            errors += int(sum(r.get("errors", 0) for r in res.by.get((t, s), {}).values()))
        rows.append([*row, errors])
    out += [table(hdr, rows), ""]

    out += ["## Start-up, memory, transfers", ""]
    hdr = [
        "target",
        "start-up ms",
        "idle RSS MiB",
        "upload 1 GiB s",
        "upload peak RSS MiB",
        "upload RSS growth MiB",
        "download 64 MiB s",
        "download peak RSS MiB",
        "download RSS growth MiB",
    ]
    rows = []
    for t in targets:
        startup = res.med(t, "startup", "startup_s")
        rows.append(
            [
                t,
                None if startup is None else startup * 1000,
                res.med(t, "startup", "idle_rss_mib"),
                res.med(t, "upload", "elapsed_s"),
                res.med(t, "upload", "peak_rss_mib"),
                res.med(t, "upload", "rss_growth_mib"),
                res.med(t, "download", "elapsed_s"),
                res.med(t, "download", "peak_rss_mib"),
                res.med(t, "download", "rss_growth_mib"),
            ]
        )
    out += [table(hdr, rows), ""]

    n = o.get("burst", 1000)
    out += [f"## {n} concurrent requests (sidecar: on an account whose token has expired)", ""]
    hdr = [
        "target",
        "token calls, per round",
        "200s (median)",
        "p50 ms",
        "p99 ms",
        "max ms",
        "upstream 401 retries",
        "expired injections",
        "peak RSS MiB",
    ]
    rows = []
    for t in targets:
        recs = [r for _, r in sorted(res.by.get((t, "burst"), {}).items())]
        calls = ", ".join(str(r.get("token_calls")) for r in recs) if recs else None
        rows.append(
            [
                t,
                calls,
                res.med(t, "burst", lambda r: r.get("statuses", {}).get("200", 0)),
                res.med(t, "burst", "p50_ms"),
                res.med(t, "burst", "p99_ms"),
                res.med(t, "burst", "max_ms"),
                res.med(t, "burst", "sidecar_retries"),
                res.med(t, "burst", "sidecar_expired_token_injections"),
                res.med(t, "burst", "peak_rss_mib"),
            ]
        )
    out += [table(hdr, rows), ""]

    out += [f"## Ratios to {BASE} (each taken inside a round, then the median)", ""]
    hdr = ["target"]
    for k in ("req/s", "p50", "p99", "CPU/req"):
        hdr += [f"{k} {c}" for c in ("c1", "c16", "c128")]
    rows = []
    for t in targets:
        row = [t]
        for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req"):
            row += [res.ratio(t, f"get_{c}", k) for c in ("c1", "c16", "c128")]
        rows.append(row)
    out += [table(hdr, rows), ""]
    hdr = [
        "target",
        "upload time",
        "download time",
        "start-up",
        "idle RSS",
        "burst p50",
        "burst p99",
    ]
    rows = [
        [
            t,
            res.ratio(t, "upload", "elapsed_s"),
            res.ratio(t, "download", "elapsed_s"),
            res.ratio(t, "startup", "startup_s"),
            res.ratio(t, "startup", "idle_rss_mib"),
            res.ratio(t, "burst", "p50_ms"),
            res.ratio(t, "burst", "p99_ms"),
        ]
        for t in targets
    ]
    out += [table(hdr, rows), ""]

    out += ["## Targets (issue 6)", ""]
    rows = []
    for t in (t for t in targets if t.startswith("sidecar")):
        rows += targets_rows(res, t)
    out += [table(["target", "check", "measured", "goal", "met"], rows), ""]

    out += ["## Per round (to judge the spread)", ""]
    hdr = ["target", "c16 req/s", "c1 p50 ms", "upload s", "idle RSS MiB"]
    rows = []
    for t in targets:

        def per(scen: str, key: str, t: str = t) -> str:
            return " / ".join(fmt(v) for v in res.values(t, scen, key)) or "-"

        rows.append(
            [
                t,
                per("get_c16", "rps"),
                per("get_c1", "p50_ms"),
                per("upload", "elapsed_s"),
                per("startup", "idle_rss_mib"),
            ]
        )
    out += [table(hdr, rows), ""]
    recs = [r for d in res.by.values() for r in d.values()]
    noisy = [
        f"{r['target']}/{r['scenario']}/r{r['round']} ({r['noise_pct']}%)"
        for r in recs
        if r.get("noisy")
    ]
    failed = [f"{r['target']}/{r['scenario']}/r{r['round']}" for r in recs if not r.get("ok", True)]
    out.append(
        f"Noisy measurements (foreign CPU or steal above the limit after retries): "
        f"{', '.join(noisy) or 'none'}."
    )
    out.append(f"Failed measurements (left out of the medians): {', '.join(failed) or 'none'}.")
    return "\n".join(out) + "\n"


def targets_rows(res: Results, t: str) -> list[list[object]]:
    def check(
        name: str, value: float | None, goal: str, ok: Callable[[float], bool]
    ) -> list[object]:
        return [t, name, value, goal, "-" if value is None else ("yes" if ok(value) else "NO")]

    calls = res.values(t, "burst", "token_calls")
    all_burst = [r.get("token_calls") for r in res.by.get((t, "burst"), {}).values()]
    return [
        check(
            "req/s at 16 connections / nginx",
            res.ratio(t, "get_c16", "rps"),
            ">= 0.20",
            lambda v: v >= 0.20,
        ),
        check(
            "p50 at 1 connection / nginx",
            res.ratio(t, "get_c1", "p50_ms"),
            "<= 1.5",
            lambda v: v <= 1.5,
        ),
        check(
            "1 GiB upload time / nginx",
            res.ratio(t, "upload", "elapsed_s"),
            "<= 1.1",
            lambda v: v <= 1.1,
        ),
        check(
            "1 GiB upload RSS growth MiB",
            res.med(t, "upload", "rss_growth_mib"),
            "<= 8",
            lambda v: v <= 8,
        ),
        check("idle RSS MiB", res.med(t, "startup", "idle_rss_mib"), "<= 45", lambda v: v <= 45),
        [
            t,
            "token calls per expired-token burst",
            ", ".join(map(str, all_burst)) or None,
            "exactly 1",
            "-"
            if not all_burst
            else (
                "yes"
                if all_burst == [1] * len(all_burst) and len(calls) == len(all_burst)
                else "NO"
            ),
        ],
    ]


def profile_summary(path: Path, top: int = 40) -> str:
    """Self and inclusive sample shares per function, from py-spy's raw (collapsed) output.

    Only the event-loop thread counts: the store's and the executor's worker threads are
    sampled too (py-spy takes a thread blocked on a queue for a busy one) and are listed apart.
    """
    self_n: dict[str, int] = defaultdict(int)
    incl: dict[str, int] = defaultdict(int)
    others: dict[str, int] = defaultdict(int)
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        if frames[0].startswith("Thread._bootstrap"):
            others[frames[-1]] += n
            continue
        total += n
        self_n[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return "no samples"

    def rows(d: dict[str, int], of: int) -> list[list[object]]:
        top_items = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        return [[f[:110], c, round(100 * c / of, 1)] for f, c in top_items]

    hdr = ["function (file:line of def)", "samples", "%"]
    return "\n".join(
        [
            f"{total} samples of the event-loop thread; % of those",
            "",
            "### self time (leaf frame)",
            "",
            table(hdr, rows(self_n, total)),
            "",
            "### inclusive time",
            "",
            table(hdr, rows(incl, total)),
            "",
            f"other threads (leaf frames, {sum(others.values())} samples): "
            + ", ".join(f"{f} {c}" for f, c in sorted(others.items(), key=lambda kv: -kv[1])[:5]),
            "",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path", type=Path)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--top", type=int, default=40)
    a = ap.parse_args()
    if a.profile:
        print(profile_summary(a.path, a.top))
        return
    meta_path = a.path.parent / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    recs = load(a.path)
    targets = list(dict.fromkeys(r["target"] for r in recs))
    if BASE in targets:
        targets.remove(BASE)
        targets.insert(0, BASE)
    print(summarize(a.path, meta, targets))


if __name__ == "__main__":
    main()
