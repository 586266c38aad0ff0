#!/usr/bin/env python3
"""The sidecar against its peers, in one run: interleaved rounds, medians, ratios to nginx.

Run through run.sh, which pins this harness (and so wrk, curl and the upstream it starts) to
CPU 1; every proxy under test is started under `taskset -c 0`, alone on its core.

A round starts every target (start-up time, idle RSS), then runs each scenario against every
target back to back, in an order rotated each round (A B C D, then B C D A, ...), and stops
them all. Ratios are taken inside a round (target / nginx, same scenario) and the median over
rounds is reported. See README.md for what each scenario measures.

Subcommands:
  bench.py run [--quick] [--rounds N] [--duration S] [--targets ...]   the comparison
  bench.py profile [--duration S] [--connections N]   py-spy on the sidecar under wrk load
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import burst as burst_client
import report

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TOKEN = "bench-token"
PROXY_CPU, LOAD_CPU = 0, 1
UPSTREAM_PORT, TOKEN_PORT = 18080, 18090
SMALL_PATH = "/api/v1/items/12345?fields=all"
UPLOAD_BYTES = 1 << 30
DOWNLOAD_BYTES = 64 << 20
TRANSFER_MAX_TIME = 180
HZ = os.sysconf("SC_CLK_TCK")
GET_SCENARIOS = {"get_c1": 1, "get_c16": 16, "get_c128": 128}
SCENARIOS = ["get_c1", "get_c16", "get_c128", "upload", "download", "burst"]
DEFAULT_TARGETS = ["nginx", "haproxy", "aiohttp", "sidecar"]


def log(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ /proc accounting
def _stat_fields(pid: int | str) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    return s[s.rfind(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                children.setdefault(int(_stat_fields(d)[1]), []).append(int(d))
            except (OSError, IndexError, ValueError):
                continue
    out, i = [root], 0
    while i < len(out):
        out.extend(children.get(out[i], []))
        i += 1
    return [p for p in out if os.path.exists(f"/proc/{p}")]


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            f = _stat_fields(p)
            total += int(f[11]) + int(f[12])  # utime + stime, all threads
        except (OSError, IndexError):
            pass
    return total


def status_kib(pids: list[int], key: str) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def reset_peak_rss(pids: list[int]) -> None:
    for p in pids:  # VmHWM := VmRSS (Linux >= 4.0)
        try:
            with open(f"/proc/{p}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def steal_and_total() -> dict[str, tuple[int, int, int]]:
    """Per CPU: (busy, steal, total) jiffies from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *v = line.split()
                user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in v[:8])
                total = user + nice + system + idle + iowait + irq + softirq + steal
                out[name] = (total - idle - iowait - steal, steal, total)
    return out


PF_KTHREAD = 0x00200000


def foreign_ticks() -> dict[int, int]:
    """CPU ticks of every user-space process that is not this harness or one of its
    descendants (proxies, upstream, token endpoint, wrk, curl): the shared machine's noise.
    Kernel threads are left out: the work they do here is mostly caused by the benchmark."""
    me = os.getpid()
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            f = _stat_fields(d)
        except OSError:
            continue
        if int(f[6]) & PF_KTHREAD:
            continue
        pid = int(d)
        parent[pid] = int(f[1])
        ticks[pid] = int(f[11]) + int(f[12])
    ours: dict[int, bool] = {}

    def is_ours(pid: int) -> bool:
        seen = []
        while pid not in ours:
            if pid in (me, 0, 1) or pid not in parent:
                ours[pid] = pid == me
                break
            seen.append(pid)
            pid = parent[pid]
        for p in seen:
            ours[p] = ours[pid]
        return ours[pid]

    return {pid: t for pid, t in ticks.items() if not is_ours(pid)}


def proc_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def mib(kib: int) -> float:
    return round(kib / 1024, 1)


# ------------------------------------------------------------------ HTTP helpers
def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_http_ok(
    port: int,
    path: str,
    headers: dict[str, str],
    proc: Proc | None,
    deadline_s: float = 30.0,
    interval_s: float = 0.005,
) -> float:
    """Poll until GET answers 200; returns the monotonic time it first did."""
    t_end = time.monotonic() + deadline_s
    last = "nothing"
    while time.monotonic() < t_end:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"exited early (rc={proc.p.returncode}); see {proc.logpath}")
        try:
            st, body = http_get(port, path, headers)
            if st == 200:
                return time.monotonic()
            last = f"HTTP {st}: {body[:200]!r}"
        except OSError as e:
            last = repr(e)
        time.sleep(interval_s)
    raise RuntimeError(f"port {port}{path} not ready in {deadline_s}s (last: {last})")


# ------------------------------------------------------------------ processes
class Proc:
    """A server in its own session, so its whole tree is signalled together."""

    def __init__(
        self,
        argv: list[str],
        logpath: Path,
        cpu: int | None = None,
        stdin: int | None = subprocess.DEVNULL,
    ) -> None:
        logpath.parent.mkdir(parents=True, exist_ok=True)
        self.logpath = logpath
        self.logf = open(logpath, "ab")  # noqa: SIM115 (closed in stop())
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu), *argv]
        self.started = time.monotonic()
        self.p = subprocess.Popen(
            argv, stdout=self.logf, stderr=subprocess.STDOUT, stdin=stdin, start_new_session=True
        )
        self.pid = self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def pids(self) -> list[int]:
        return process_tree(self.pid) if self.alive() else []

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        try:
            self.p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.p.wait(5)
        self.logf.close()


def render(template: Path, dest: Path, **values: object) -> Path:
    text = template.read_text()
    for k, v in values.items():
        text = text.replace(f"@{k}@", str(v))
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text)
    return dest


def nginx_dirs(run: Path) -> None:
    for d in ("client_body", "proxy_temp", "fastcgi_temp", "uwsgi_temp", "scgi_temp"):
        (run / d).mkdir(parents=True, exist_ok=True)


# ------------------------------------------------------------------ targets
@dataclass
class Target:
    """One proxy under test (or `direct`: straight to the upstream)."""

    name: str
    kind: str  # direct | nginx | haproxy | aiohttp | raw | sidecar
    port: int
    admin_port: int = 0
    binary: str = ""  # the sidecar executable, for kind sidecar
    proc: Proc | None = None
    workdir: Path = field(default_factory=Path)
    config: Path = field(default_factory=Path)

    @property
    def client_headers(self) -> list[str]:
        return [f"Authorization: Bearer {TOKEN}"] if self.kind == "direct" else []

    def pids(self) -> list[int]:
        return self.proc.pids() if self.proc else []

    def prepare(self, run: Path, round_no: int, opts: argparse.Namespace) -> None:
        self.workdir = run / f"{self.name}-r{round_no}"
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True)
        if self.kind == "sidecar":
            self._prepare_sidecar(run)

    def _prepare_sidecar(self, run: Path) -> None:
        key = run / "store.key"
        if not key.exists():
            out = subprocess.run(
                [self.binary, "keys", "generate"], capture_output=True, text=True, check=True
            ).stdout
            key.write_text(out)
            key.chmod(0o600)
        self.config = render(
            HERE / "sidecar.toml.in",
            self.workdir / "config.toml",
            DB=self.workdir / "tokens.db",
            KEY=key,
            ADMIN_PORT=self.admin_port,
            TOKEN_URL=f"http://127.0.0.1:{TOKEN_PORT}/token",
            PORT=self.port,
            UPSTREAM=f"http://127.0.0.1:{UPSTREAM_PORT}",
        )
        self.import_account("main", TOKEN, 86400)

    def import_account(self, account: str, access: str, expires_in: float) -> None:
        line = json.dumps(
            {
                "account": account,
                "access_token": access,
                "refresh_token": f"{account}-refresh",
                "expires_in": expires_in,
            }
        )
        subprocess.run(
            [
                self.binary,
                "accounts",
                "import",
                "--config",
                str(self.config),
                "--provider",
                "bench",
            ],
            input=line + "\n",
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )

    def argv(self, opts: argparse.Namespace) -> list[str]:
        upstream = f"127.0.0.1:{UPSTREAM_PORT}"
        w = self.workdir
        if self.kind == "nginx":
            nginx_dirs(w)
            conf = render(
                HERE / "peers" / "nginx.conf.in",
                w / "nginx.conf",
                PORT=self.port,
                UPSTREAM=upstream,
                TOKEN=TOKEN,
                RUN=w,
            )
            return ["nginx", "-p", str(w), "-e", str(w / "error.log"), "-c", str(conf)]
        if self.kind == "haproxy":
            cfg = render(
                HERE / "peers" / "haproxy.cfg.in",
                w / "haproxy.cfg",
                PORT=self.port,
                UPSTREAM=upstream,
                TOKEN=TOKEN,
            )
            return ["haproxy", "-db", "-f", str(cfg)]
        if self.kind == "aiohttp":
            return [
                opts.python,
                str(HERE / "peers" / "naive_aiohttp_proxy.py"),
                "--port",
                str(self.port),
                "--upstream",
                upstream,
                "--token",
                TOKEN,
                "--loop",
                "uvloop",
            ]
        if self.kind == "sidecar":
            return [self.binary, "run", "--config", str(self.config)]
        if self.kind == "raw":
            return [
                opts.python,
                str(HERE / "peers" / "raw_asyncio_proxy.py"),
                "--port",
                str(self.port),
                "--upstream",
                upstream,
                "--token",
                TOKEN,
            ]
        raise ValueError(self.kind)

    def start(self, opts: argparse.Namespace, logs: Path) -> float:
        """Start pinned to the proxy core; returns seconds until ready."""
        if self.kind == "direct":
            return 0.0
        if port_open(self.port) or (self.admin_port and port_open(self.admin_port)):
            raise RuntimeError(f"{self.name}: port {self.port} is already in use")
        self.proc = Proc(self.argv(opts), logs / f"{self.workdir.name}.log", cpu=PROXY_CPU)
        if self.kind == "sidecar":  # ready = the admin listener's /readyz says so
            ready = wait_http_ok(self.admin_port, "/readyz", {}, self.proc)
        else:  # ready = a proxied request comes back 200
            ready = wait_http_ok(self.port, SMALL_PATH, {}, self.proc)
        startup = ready - self.proc.started
        wait_http_ok(self.port, SMALL_PATH, {}, self.proc, deadline_s=5)  # injects the token
        return startup

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()
            self.proc = None

    def prometheus(self) -> dict[str, float]:
        """Counter totals from the sidecar's /metrics (summed over label sets)."""
        if self.kind != "sidecar":
            return {}
        try:
            _, body = http_get(self.admin_port, "/metrics")
        except OSError:
            return {}
        out: dict[str, float] = {}
        for line in body.decode().splitlines():
            m = re.match(r"^(sidecar_[a-z_]+_total)(\{[^}]*\})? ([0-9.e+-]+)$", line)
            if m:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
        return out


def make_targets(opts: argparse.Namespace) -> list[Target]:
    targets = []
    for i, spec in enumerate(opts.targets.split(",")):
        name, _, binary = spec.partition("=")
        kind = "sidecar" if name.startswith("sidecar") else name
        if kind not in ("direct", "nginx", "haproxy", "aiohttp", "raw", "sidecar"):
            raise SystemExit(f"unknown target {name!r}")
        port = UPSTREAM_PORT if kind == "direct" else 18100 + i
        admin_port = 18200 + i if kind == "sidecar" else 0
        targets.append(Target(name, kind, port, admin_port, binary or opts.sidecar))
    if "nginx" not in [t.name for t in targets]:
        raise SystemExit("the targets must include nginx: every ratio is to nginx")
    return targets


# ------------------------------------------------------------------ load
def run_wrk(port: int, conns: int, duration: int, headers: list[str]) -> dict:
    argv = [
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{duration}s",
        "--latency",
        "--timeout",
        "5s",
        "-s",
        str(HERE / "wrk_report.lua"),
    ]
    for h in headers:
        argv += ["-H", h]
    argv.append(f"http://127.0.0.1:{port}{SMALL_PATH}")
    p = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    for line in p.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            return json.loads(line[len("BENCHJSON ") :])
    raise RuntimeError(f"wrk failed rc={p.returncode}: {p.stdout[-300:]} {p.stderr[-300:]}")


CURL_W = "%{http_code} %{time_total} %{size_upload} %{size_download}"


def curl(args: list[str]) -> dict:
    p = subprocess.run(
        ["curl", "-sS", "--max-time", str(TRANSFER_MAX_TIME), "-w", CURL_W, *args],
        capture_output=True,
        text=True,
        timeout=TRANSFER_MAX_TIME + 30,
    )
    try:
        code, total, up, down = p.stdout.split()[-4:]
        return {
            "http_code": int(code),
            "elapsed_s": float(total),
            "size_upload": int(float(up)),
            "size_download": int(float(down)),
            "curl_rc": p.returncode,
            "stderr": p.stderr.strip()[-200:],
        }
    except ValueError:
        return {"http_code": 0, "curl_rc": p.returncode, "stderr": p.stderr.strip()[-200:]}


def upload_file(run: Path) -> Path:
    big = run / "upload-1g.bin"
    if not big.exists() or big.stat().st_size != UPLOAD_BYTES:
        with open(big, "wb") as f:  # sparse: reading it costs no disk I/O
            f.truncate(UPLOAD_BYTES)
    return big


def run_upload(port: int, headers: list[str], run: Path) -> dict:
    out = run / f"upload-response-{port}.json"
    out.unlink(missing_ok=True)
    hdr = [
        x
        for h in [*headers, "Expect:", "Content-Type: application/octet-stream"]
        for x in ("-H", h)
    ]
    r = curl(
        [
            "-o",
            str(out),
            *hdr,
            "-X",
            "POST",
            "-T",
            str(upload_file(run)),
            f"http://127.0.0.1:{port}/upload",
        ]
    )
    try:
        r["upstream_received"] = json.loads(out.read_text())["received_request_length"]
    except (OSError, ValueError, KeyError):
        r["upstream_received"] = None
    r["ok"] = r["http_code"] == 200 and (r["upstream_received"] or 0) >= UPLOAD_BYTES
    return r


def run_download(port: int, headers: list[str], reps: int) -> dict:
    hdr = [x for h in headers for x in ("-H", h)]
    times, errors = [], []
    for _ in range(reps):
        r = curl(["-o", "/dev/null", *hdr, f"http://127.0.0.1:{port}/big"])
        if r["http_code"] == 200 and r.get("size_download") == DOWNLOAD_BYTES:
            times.append(r["elapsed_s"])
        else:
            errors.append(str(r))
    out: dict = {"ok": not errors and bool(times), "times_s": times, "errors_text": errors[:3]}
    if times:
        out["elapsed_s"] = statistics.median(times)
    return out


# ------------------------------------------------------------------ measurement
@dataclass
class Bed:
    """The fixed parts of a run: upstream, token endpoint, paths, options."""

    opts: argparse.Namespace
    out: Path
    run: Path
    upstream: Proc | None = None
    idp: Proc | None = None
    body_temp: Path | None = None  # the upstream's spool for uploads (removed at the end)
    retry_s: float = 0.0  # time spent re-running noisy measurements (bounded by the budget)

    def token_calls(self) -> int:
        return int(json.loads(http_get(TOKEN_PORT, "/calls")[1])["calls"])


def measured(bed: Bed, target: Target, fn):  # type: ignore[no-untyped-def]
    """Run fn() measuring the target's CPU time and peak RSS, and the disturbance: CPU time
    taken by processes outside the benchmark, and hypervisor steal."""
    pids = target.pids()
    reset_peak_rss(pids)
    rss_before = status_kib(pids, "VmRSS")
    t0, x0, s0, w0 = cpu_ticks(pids), foreign_ticks(), steal_and_total(), time.monotonic()
    res = fn()
    w1, s1, x1 = time.monotonic(), steal_and_total(), foreign_ticks()
    pids_end = target.pids()
    proxy_ticks = cpu_ticks(pids_end) - t0
    wall = w1 - w0
    used = sorted(((t - x0.get(pid, 0), pid) for pid, t in x1.items()), reverse=True)
    foreign = sum(t for t, _ in used)
    m: dict = {"wall_s": round(wall, 3), "foreign_pct": round(100 * foreign / HZ / wall, 1)}
    if foreign:
        m["foreign_top"] = [
            f"{proc_name(pid)}[{pid}] {100 * t / HZ / wall:.0f}%" for t, pid in used[:3] if t
        ]
    for cpu in ("cpu0", "cpu1"):
        _, steal, total = (b - a for a, b in zip(s0[cpu], s1[cpu], strict=True))
        m[f"{cpu}_steal_pct"] = round(100 * steal / (total or 1), 1)
    if target.proc:
        m.update(
            proxy_cpu_s=round(proxy_ticks / HZ, 3),
            proxy_cpu_pct=round(100 * proxy_ticks / HZ / wall, 1),
            rss_before_mib=mib(rss_before),
            peak_rss_mib=mib(status_kib(pids_end, "VmHWM")),
            rss_after_mib=mib(status_kib(pids_end, "VmRSS")),
        )
        m["rss_growth_mib"] = round(m["peak_rss_mib"] - m["rss_before_mib"], 1)
    return res, m


def wait_quiet(max_wait_s: float, limit_pct: float = 10.0) -> float:
    """Wait (bounded) until both cores are under limit_pct busy for 0.3 s: the machine is shared."""
    t0 = time.monotonic()
    while True:
        a = steal_and_total()
        time.sleep(0.3)
        b = steal_and_total()
        busy = max(100 * (b[c][0] - a[c][0]) / ((b[c][2] - a[c][2]) or 1) for c in ("cpu0", "cpu1"))
        if busy < limit_pct or time.monotonic() - t0 >= max_wait_s:
            return round(time.monotonic() - t0, 2)
        time.sleep(0.5)


def noise(m: dict) -> float:
    return max(m.get(k, 0.0) for k in ("foreign_pct", "cpu0_steal_pct", "cpu1_steal_pct"))


def scenario_once(bed: Bed, target: Target, scen: str, round_no: int) -> dict:
    o = bed.opts
    port, headers = target.port, target.client_headers
    if scen in GET_SCENARIOS:
        conns = GET_SCENARIOS[scen]
        run_wrk(port, conns, o.warmup, headers)  # unrecorded warm-up, same concurrency
        r, m = measured(bed, target, lambda: run_wrk(port, conns, o.duration, headers))
        secs = r["duration_us"] / 1e6
        errors = (
            r["err_connect"] + r["err_read"] + r["err_write"] + r["err_status"] + r["err_timeout"]
        )
        rec = {
            "rps": round(r["requests"] / secs, 1),
            "requests": r["requests"],
            "p50_ms": r["p50_us"] / 1000,
            "p99_ms": r["p99_us"] / 1000,
            "p999_ms": r["p999_us"] / 1000,
            "errors": errors,
            "ok": errors == 0,
            **m,
        }
        if "proxy_cpu_s" in m and r["requests"]:
            rec["cpu_us_per_req"] = round(m["proxy_cpu_s"] / r["requests"] * 1e6, 1)
        return rec
    if scen == "upload":
        r, m = measured(bed, target, lambda: run_upload(port, headers, bed.run))
        return {**r, **m}
    if scen == "download":
        r, m = measured(bed, target, lambda: run_download(port, headers, o.download_reps))
        return {**r, **m}
    if scen == "burst":
        return burst_once(bed, target, round_no)
    raise ValueError(scen)


def burst_once(bed: Bed, target: Target, round_no: int) -> dict:
    """N concurrent requests; for the sidecar, on an account whose token has expired."""
    headers = list(target.client_headers)
    calls0, prom0 = bed.token_calls(), target.prometheus()
    if target.kind == "sidecar":
        # A fresh account whose access token expired at import (expires_in 0) and which the
        # upstream rejects: the requests must wait for one refresh, then use the new token.
        account = f"burst-r{round_no}"
        target.import_account(account, "expired-token", 0)
        headers.append(f"X-Sidecar-Account: {account}")
        calls0 = bed.token_calls()
    r, m = measured(
        bed,
        target,
        lambda: burst_client.run_burst(target.port, SMALL_PATH, bed.opts.burst, headers),
    )
    time.sleep(0.2)  # a late token call would still be counted
    prom1 = target.prometheus()
    rec = {**r, **m, "token_calls": bed.token_calls() - calls0, "ok": r["ok"] == bed.opts.burst}
    for k in (
        "sidecar_retries_total",
        "sidecar_expired_token_injections_total",
        "sidecar_refresh_waiters_coalesced_total",
        "sidecar_token_refreshes_total",
    ):
        if prom1:  # a labelled counter has no sample until its first increment
            rec[k.removesuffix("_total")] = prom1.get(k, 0.0) - prom0.get(k, 0.0)
    return rec


def run_scenario(bed: Bed, target: Target, scen: str, round_no: int) -> dict:
    """One scenario; re-run (bounded) when foreign load or steal disturbed it."""
    best: dict | None = None
    for attempt in range(1 + (bed.opts.retries if scen != "burst" else 0)):
        if attempt and bed.retry_s >= bed.opts.retry_budget:
            log("    retry budget spent: keeping the noisy measurement")
            break
        t_attempt = time.monotonic()
        waited = wait_quiet(bed.opts.quiet_wait)
        rec = scenario_once(bed, target, scen, round_no)
        rec.update(attempt=attempt + 1, quiet_wait_s=waited, noise_pct=noise(rec))
        if best is None or rec["noise_pct"] < best["noise_pct"]:
            best = rec
        if attempt:
            bed.retry_s += time.monotonic() - t_attempt
        if rec["noise_pct"] <= bed.opts.noise_limit:
            break
        log(f"    noisy ({rec['noise_pct']}% foreign CPU/steal): again")
    assert best is not None
    best["noisy"] = best["noise_pct"] > bed.opts.noise_limit
    return best


# ------------------------------------------------------------------ the run
def start_fixed(bed: Bed) -> None:
    logs = bed.out / "logs"
    for port in (UPSTREAM_PORT, TOKEN_PORT):
        if port_open(port):
            raise SystemExit(f"port {port} is already in use")
    up = bed.run / "upstream"
    nginx_dirs(up)
    big = up / "big.bin"
    if not big.exists() or big.stat().st_size != DOWNLOAD_BYTES:
        with open(big, "wb") as f:
            f.write(os.urandom(DOWNLOAD_BYTES))
    # The upstream spools each 1 GiB upload to a temporary file. On disk, writeback of the last
    # upload's pages throttles the next one by seconds, and which target comes next is an
    # accident of the rotation; in RAM (tmpfs) every target meets the same upstream.
    body_temp = Path("/dev/shm") if Path("/dev/shm").is_dir() else up
    body_temp = body_temp / f"sidecar-bench-{os.getpid()}"
    body_temp.mkdir(exist_ok=True)
    bed.body_temp = body_temp
    conf = render(
        HERE / "upstream" / "nginx.conf.in",
        up / "nginx.conf",
        PORT=UPSTREAM_PORT,
        RUN=up,
        TOKEN=TOKEN,
        BODY_TEMP=body_temp,
    )
    bed.upstream = Proc(
        ["nginx", "-p", str(up), "-e", str(up / "error.log"), "-c", str(conf)],
        logs / "upstream.log",
        cpu=LOAD_CPU,
    )
    auth = {"Authorization": f"Bearer {TOKEN}"}
    wait_http_ok(UPSTREAM_PORT, SMALL_PATH, auth, bed.upstream)
    assert http_get(UPSTREAM_PORT, SMALL_PATH)[0] == 401, "the upstream must demand the token"
    bed.idp = Proc(
        [
            bed.opts.python,
            str(HERE / "token_endpoint.py"),
            "--port",
            str(TOKEN_PORT),
            "--delay-ms",
            str(bed.opts.token_delay_ms),
        ],
        logs / "token_endpoint.log",
        cpu=LOAD_CPU,
    )
    wait_http_ok(TOKEN_PORT, "/calls", {}, bed.idp)
    if "upload" in bed.opts.scenarios:
        log("warming the upstream with one unrecorded 1 GiB upload")
        run_upload(UPSTREAM_PORT, [f"Authorization: Bearer {TOKEN}"], bed.run)


def write(bed: Bed, rec: dict) -> None:
    with open(bed.out / "results.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def brief(rec: dict) -> str:
    keys = (
        "startup_s",
        "idle_rss_mib",
        "rps",
        "p50_ms",
        "p99_ms",
        "cpu_us_per_req",
        "elapsed_s",
        "peak_rss_mib",
        "rss_growth_mib",
        "token_calls",
        "span_ms",
        "noise_pct",
    )
    return " ".join(f"{k}={rec[k]}" for k in keys if k in rec and rec[k] is not None)


def one_round(bed: Bed, targets: list[Target], round_no: int) -> None:
    order = targets[round_no - 1 :] + targets[: round_no - 1]
    logs = bed.out / "logs"
    try:
        for t in order:
            t.prepare(bed.run, round_no, bed.opts)
            wait_quiet(bed.opts.quiet_wait)
            startup = t.start(bed.opts, logs)
            time.sleep(1.0)
            rec = {
                "target": t.name,
                "round": round_no,
                "scenario": "startup",
                "ok": True,
                "startup_s": round(startup, 4),
                "ts": time.time(),
            }
            if t.proc:
                rec["idle_rss_mib"] = mib(status_kib(t.pids(), "VmRSS"))
                rec["cpus"] = sorted({c for p in t.pids() for c in os.sched_getaffinity(p)})
            write(bed, rec)
            log(f"[r{round_no}] {t.name:<10} startup  {brief(rec)}")
        for scen in bed.opts.scenarios:
            for t in order:
                if t.proc and not t.proc.alive():
                    raise RuntimeError(f"{t.name} died; see {t.proc.logpath}")
                rec = run_scenario(bed, t, scen, round_no)
                rec.update(target=t.name, round=round_no, scenario=scen, ts=time.time())
                write(bed, rec)
                log(f"[r{round_no}] {t.name:<10} {scen:<9} ok={rec.get('ok')} {brief(rec)}")
    finally:
        for t in order:
            t.stop()


def versions(opts: argparse.Namespace) -> dict:
    def first_line(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
            return (p.stdout or p.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    py = (
        f'{opts.python} -c "import sys,aiohttp,uvloop;print(sys.version.split()[0],'
        "'aiohttp',aiohttp.__version__,'uvloop',uvloop.__version__)\""
    )
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kernel": os.uname().release,
        "cpu": first_line(["sh", "-c", "lscpu | sed -n 's/^Model name: *//p'"])
        + f" x{os.cpu_count()}",
        "nginx": first_line(["nginx", "-v"]),
        "haproxy": first_line(["haproxy", "-v"]),
        "wrk": first_line(["wrk", "-v"]),
        "python": first_line(["sh", "-c", py]),
        "sidecar_commit": first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
    }


def cmd_run(opts: argparse.Namespace) -> int:
    targets = make_targets(opts)
    out = Path(opts.out or HERE / "results" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    out.mkdir(parents=True, exist_ok=True)
    bed = Bed(opts, out, HERE / "results" / ".run")
    bed.run.mkdir(parents=True, exist_ok=True)
    meta = {**versions(opts), "options": vars(opts), "argv": sys.argv}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    log(f"results -> {out}")
    t0 = time.monotonic()
    try:
        start_fixed(bed)
        for r in range(1, opts.rounds + 1):
            log(f"=== round {r}/{opts.rounds} ({time.monotonic() - t0:.0f} s in)")
            one_round(bed, targets, r)
    finally:
        for p in (bed.idp, bed.upstream):
            if p:
                p.stop()
        if bed.body_temp is not None:
            shutil.rmtree(bed.body_temp, ignore_errors=True)
    text = report.summarize(out / "results.jsonl", meta, [t.name for t in targets])
    (out / "summary.md").write_text(text)
    print(text)
    log(f"took {time.monotonic() - t0:.0f} s; results in {out}")
    return 0


# ------------------------------------------------------------------ profiling
def cmd_profile(opts: argparse.Namespace) -> int:
    """The sidecar alone under wrk load, sampled by py-spy (which runs on the load core)."""
    out = Path(
        opts.out or HERE / "results" / ("profile-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    )
    out.mkdir(parents=True, exist_ok=True)
    opts.scenarios = []
    bed = Bed(opts, out, HERE / "results" / ".run")
    bed.run.mkdir(parents=True, exist_ok=True)
    target = Target(
        name="sidecar", kind="sidecar", port=18100, admin_port=18200, binary=opts.sidecar
    )
    pyspy = shutil.which("py-spy") or str(Path(opts.python).parent / "py-spy")
    try:
        start_fixed(bed)
        target.prepare(bed.run, 0, opts)
        target.start(opts, out / "logs")
        run_wrk(target.port, opts.connections, 2, [])  # warm-up
        assert target.proc is not None
        spy = subprocess.Popen(
            [
                pyspy,
                "record",
                "--pid",
                str(target.proc.pid),
                "--rate",
                str(opts.rate),
                "--duration",
                str(opts.duration + 1),
                "--format",
                "raw",
                "--function",  # one row per function, not per line
                *(["--native"] if opts.native else []),
                "--output",
                str(out / "pyspy.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(0.5)
        r, m = measured(
            bed, target, lambda: run_wrk(target.port, opts.connections, opts.duration, [])
        )
        spy.wait(60)
        log(
            f"under profile: {r['requests'] / (r['duration_us'] / 1e6):.0f} req/s, "
            f"cpu {m.get('proxy_cpu_pct')} %"
        )
    finally:
        target.stop()
        for p in (bed.idp, bed.upstream):
            if p:
                p.stop()
        if bed.body_temp is not None:
            shutil.rmtree(bed.body_temp, ignore_errors=True)
    print(report.profile_summary(out / "pyspy.txt", opts.top))
    log(f"raw stacks: {out / 'pyspy.txt'} (flamegraph.pl or speedscope can draw them)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    venv = REPO / ".venv" / "bin"
    for name in ("run", "profile"):
        p = sub.add_parser(name)
        p.add_argument("--sidecar", default=str(venv / "sidecar"), help="the sidecar executable")
        p.add_argument(
            "--python",
            default=str(venv / "python"),
            help="python with aiohttp and uvloop (token endpoint, aiohttp peer)",
        )
        p.add_argument(
            "--token-delay-ms",
            type=float,
            default=50.0,
            help="how long the fake token endpoint takes to answer",
        )
        p.add_argument("--out", help="results directory (default results/<UTC time>)")
    run = sub.choices["run"]
    run.add_argument(
        "--quick",
        action="store_true",
        help="2 rounds, 3 s per wrk run, 3 downloads (about 4 minutes)",
    )
    run.add_argument("--rounds", type=int)
    run.add_argument(
        "--duration", type=int, help="seconds per measured wrk run (default 6; quick 3)"
    )
    run.add_argument("--warmup", type=int, help="unrecorded wrk seconds before each (default 1)")
    run.add_argument("--download-reps", type=int)
    run.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help="comma list from direct,nginx,haproxy,aiohttp,raw,sidecar; a second sidecar "
        "build is added as sidecar-NAME=/path/to/bin/sidecar",
    )
    run.add_argument("--scenarios", default=",".join(SCENARIOS))
    run.add_argument("--burst", type=int, default=1000, help="concurrent requests in `burst`")
    run.add_argument(
        "--noise-limit",
        type=float,
        default=15.0,
        help="re-run a scenario when foreign CPU or steal exceeds this %% of a core",
    )
    run.add_argument("--retries", type=int, default=1)
    run.add_argument(
        "--retry-budget", type=float, help="max seconds of re-runs per run (default 60; quick 30)"
    )
    run.add_argument(
        "--quiet-wait",
        type=float,
        default=2.0,
        help="max seconds to wait for idle cores before each measurement",
    )
    prof = sub.choices["profile"]
    prof.add_argument("--duration", type=int, default=20)
    prof.add_argument("--connections", type=int, default=16)
    prof.add_argument(
        "--rate", type=int, default=200, help="py-spy samples per second (it pauses the process)"
    )
    prof.add_argument("--top", type=int, default=40)
    prof.add_argument("--native", action="store_true", help="py-spy --native: C frames too")
    opts = ap.parse_args()
    if opts.cmd == "profile":
        return cmd_profile(opts)
    quick = opts.quick
    opts.rounds = opts.rounds or (2 if quick else 3)
    opts.duration = opts.duration or (3 if quick else 6)
    opts.retry_budget = (
        opts.retry_budget if opts.retry_budget is not None else (30 if quick else 60)
    )
    opts.warmup = opts.warmup or 1
    opts.download_reps = opts.download_reps or (3 if quick else 5)
    opts.scenarios = [s for s in opts.scenarios.split(",") if s]
    bad = set(opts.scenarios) - set(SCENARIOS)
    if bad:
        ap.error(f"unknown scenarios {sorted(bad)}; known: {SCENARIOS}")
    if os.sched_getaffinity(0) != {LOAD_CPU}:
        log(f"note: the harness is not pinned to CPU {LOAD_CPU}; run it through run.sh")
    return cmd_run(opts)


if __name__ == "__main__":
    sys.exit(main())
