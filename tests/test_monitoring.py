"""Alerts and dashboard against the metrics a real sidecar serves.

A sidecar on 127.0.0.1 (fake token endpoint and API from conftest) handles a few requests, then
its /metrics text is the reference: every metric, label and label value the alerts and the
dashboard use must appear there. promtool (Debian's prometheus package, unpacked by
.ci/tools.sh) checks that text, the rule file, the dashboard's queries, and unit-tests the
alerts on synthetic series.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sidecar.errors import ReauthorizationRequired
from tests.conftest import seed
from tests.fakes import FakeTokenEndpoint, FakeUpstream, ManualClock
from tests.test_helm import install_tool

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "monitoring" / "prometheus-rules.yaml"
DASHBOARD = ROOT / "monitoring" / "grafana-dashboard.json"

# Labels Prometheus attaches to every scraped series, not the sidecar.
TARGET_LABELS = {"namespace", "job", "instance", "pod", "container"}
# Series Prometheus makes itself.
SCRAPE_SERIES = {"up"}
EXPECTED_ALERTS = {
    "OAuthSidecarDown",
    "OAuthSidecarReauthorizationRequired",
    "OAuthSidecarRefreshFailureRatioHigh",
    "OAuthSidecarTokenEndpointSlow",
    "OAuthSidecarExpiredTokenInjected",
}
DASHBOARD_MUST_SHOW = {
    "sidecar_requests_total": "requests",
    "sidecar_upstream_request_duration_seconds_bucket": "latency",
    "sidecar_token_refreshes_total": "refreshes",
    "sidecar_retries_total": "retries",
    "sidecar_accounts": "accounts by state",
    "sidecar_account_reauthorizations_total": "re-authorization events",
}


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_panels() -> Iterator[dict[str, Any]]:
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]


def all_exprs() -> list[str]:
    return [r["expr"] for r in alert_rules()] + dashboard_exprs()


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's variables with values Prometheus accepts."""
    for var, value in (("$__rate_interval", "5m"), ("$__range", "1h"), ("$namespace", ".*")):
        expr = expr.replace(var, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression selects: selectors with braces, and sidecar_* names."""
    with_braces = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", expr))
    return with_braces | set(re.findall(r"\bsidecar_[a-z0-9_]+\b", expr))


def selectors(expr: str) -> Iterator[tuple[str, str, str, str]]:
    """(metric, label, operator, value) for every label matcher of every selector."""
    for metric, body in re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}", expr):
        for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', body):
            yield metric, label, op, value


def grouping_labels(expr: str) -> set[str]:
    return {
        label.strip()
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
        for label in group.split(",")
        if label.strip()
    }


# --- a real /metrics --------------------------------------------------------------------------


@pytest.fixture
async def metrics_text(
    make_sidecar,
    idp: FakeTokenEndpoint,
    api: FakeUpstream,
    clock: ManualClock,
    client: aiohttp.ClientSession,
) -> str:
    """/metrics after a served request, a 401 answered by refresh and replay, an error, and an
    account whose refresh token the provider rejected."""
    sidecar = await make_sidecar()
    seeded = await seed(sidecar, idp, api, clock)
    api_url = sidecar.url("api")
    async with client.get(api_url + "/v1/things") as resp:
        assert resp.status == 200
    api.valid.discard(seeded.access_token)  # the API revokes it: 401, refresh, replay
    api.valid.add("access-2")  # the fake token endpoint's next access token
    async with client.get(api_url + "/v1/things") as resp:
        assert resp.status == 200
    assert idp.calls == 1
    async with client.get(api_url + "/v1", headers={"X-Sidecar-Account": "ghost"}) as resp:
        assert resp.status == 404  # the sidecar's own answer: counted by code
    # Two callers at once: the second joins the first one's refresh flight.
    await asyncio.gather(*(sidecar.credentials.refresh("example", "main", None) for _ in "ab"))
    # The API rejects a second account's token, whose refresh token the provider no longer
    # knows: invalid_grant, and the account needs re-authorization.
    revoked = await seed(sidecar, idp, api, clock, account="revoked")
    idp.valid_refresh.discard(revoked.refresh_token or "")
    with pytest.raises(ReauthorizationRequired):
        await sidecar.credentials.refresh("example", "revoked", revoked)
    async with client.get(sidecar.url("admin") + "/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


def samples(text: str) -> dict[str, list[dict[str, str]]]:
    """Sample name -> label sets, from the exposition text."""
    out: dict[str, list[dict[str, str]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name].append(dict(sample.labels))
    return out


def test_every_referenced_metric_is_served(metrics_text: str) -> None:
    served = samples(metrics_text)
    for expr in all_exprs():
        names = metric_names(expr)
        assert names, f"references no metric: {expr}"
        missing = names - set(served) - SCRAPE_SERIES
        assert not missing, f"{sorted(missing)} not in /metrics (used by: {expr})"


def test_expired_token_counter_is_served(metrics_text: str) -> None:
    """The "should never happen" alert needs this counter, with its upstream label."""
    series = samples(metrics_text).get("sidecar_expired_token_injections_total")
    assert series, "sidecar/metrics.py must define the counter sidecar_expired_token_injections"
    assert {"upstream": "api"} in series


def test_label_values_in_selectors_exist(metrics_text: str) -> None:
    served = samples(metrics_text)
    for expr in all_exprs():
        for metric, label, op, value in selectors(expr):
            if metric in SCRAPE_SERIES or label in TARGET_LABELS or op in ("=~", "!~"):
                continue
            values = {labels.get(label) for labels in served[metric]}
            assert value in values, f'{metric}{{{label}{op}"{value}"}}: /metrics has {values}'


def test_grouping_labels_exist(metrics_text: str) -> None:
    served = samples(metrics_text)
    for expr in all_exprs():
        labels = {
            label
            for name in metric_names(expr) - SCRAPE_SERIES
            for sample_labels in served[name]
            for label in sample_labels
        }
        unknown = grouping_labels(expr) - labels - TARGET_LABELS
        assert not unknown, f"{sorted(unknown)} is no label of the metrics in: {expr}"


@pytest.fixture(scope="session")
def promtool() -> str:
    return install_tool("promtool")


def test_promtool_accepts_the_metrics_text(promtool: str, metrics_text: str) -> None:
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=metrics_text,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- alerts -----------------------------------------------------------------------------------


def test_the_alerts_asked_for_exist() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} == EXPECTED_ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_promtool_checks_the_rules(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in result.stdout


def series(selector: str, values: str) -> dict[str, str]:
    return {"series": selector, "values": values}


REFRESHES = "sidecar_token_refreshes_total"
REFRESH_BUCKETS = "sidecar_token_refresh_duration_seconds_bucket"
EXPIRED = "sidecar_expired_token_injections_total"

# Synthetic series (one sample a minute) and the alerts they must raise, at what time.
ALERT_TESTS = {
    "evaluation_interval": "1m",
    "tests": [
        {
            "interval": "1m",
            "input_series": [
                series('up{job="oauth-sidecar", instance="10.0.0.7:9901"}', "0x20"),
                series('up{job="oauth-sidecar", instance="10.0.0.8:9901"}', "1x20"),
                series('up{job="node", instance="10.0.0.9:9100"}', "0x20"),
                series(
                    'sidecar_accounts{provider="p", state="reauthorization_required"}', "0x3 2x16"
                ),
                series('sidecar_accounts{provider="p", state="active"}', "10x20"),
                # p: a third of the calls fail; q: one in eleven.
                series(f'{REFRESHES}{{provider="p", result="success"}}', "0+10x40"),
                series(f'{REFRESHES}{{provider="p", result="transient_error"}}', "0+5x40"),
                series(f'{REFRESHES}{{provider="q", result="success"}}', "0+10x40"),
                series(f'{REFRESHES}{{provider="q", result="fatal_error"}}', "0+1x40"),
                # p: 80% of the calls take between 2.5 and 5 seconds.
                *(
                    series(f'{REFRESH_BUCKETS}{{provider="p", le="{le}"}}', values)
                    for le, values in (
                        ("1", "0+1x40"),
                        ("2.5", "0+2x40"),
                        ("5", "0+10x40"),
                        ("+Inf", "0+10x40"),
                    )
                ),
                series(f'{EXPIRED}{{upstream="api"}}', "0x10 1x10"),
                series(f'{EXPIRED}{{upstream="other"}}', "0x20"),
            ],
            "alert_rule_test": [
                {"eval_time": "3m", "alertname": "OAuthSidecarDown", "exp_alerts": []},
                {
                    "eval_time": "6m",
                    "alertname": "OAuthSidecarDown",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "critical",
                                "job": "oauth-sidecar",
                                "instance": "10.0.0.7:9901",
                            }
                        }
                    ],
                },
                {
                    "eval_time": "5m",
                    "alertname": "OAuthSidecarReauthorizationRequired",
                    "exp_alerts": [],
                },
                {
                    "eval_time": "10m",
                    "alertname": "OAuthSidecarReauthorizationRequired",
                    "exp_alerts": [{"exp_labels": {"severity": "warning", "provider": "p"}}],
                },
                {
                    "eval_time": "10m",
                    "alertname": "OAuthSidecarRefreshFailureRatioHigh",
                    "exp_alerts": [],
                },
                {
                    "eval_time": "30m",
                    "alertname": "OAuthSidecarRefreshFailureRatioHigh",
                    "exp_alerts": [{"exp_labels": {"severity": "warning", "provider": "p"}}],
                },
                {
                    "eval_time": "30m",
                    "alertname": "OAuthSidecarTokenEndpointSlow",
                    "exp_alerts": [{"exp_labels": {"severity": "warning", "provider": "p"}}],
                },
                {
                    "eval_time": "9m",
                    "alertname": "OAuthSidecarExpiredTokenInjected",
                    "exp_alerts": [],
                },
                {
                    "eval_time": "12m",
                    "alertname": "OAuthSidecarExpiredTokenInjected",
                    "exp_alerts": [{"exp_labels": {"severity": "warning", "upstream": "api"}}],
                },
                {
                    "eval_time": "19m",
                    "alertname": "OAuthSidecarExpiredTokenInjected",
                    "exp_alerts": [],
                },
            ],
        }
    ],
}


def test_alerts_fire_on_synthetic_series(promtool: str, tmp_path: Path) -> None:
    """promtool test rules; annotations are left out of the copy under test (promtool would
    compare their rendered text), their templates are checked by `promtool check rules`."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    (tmp_path / "tests.yaml").write_text(
        yaml.safe_dump({"rule_files": ["rules.yaml"], **ALERT_TESTS}, sort_keys=False)
    )
    result = subprocess.run(
        [promtool, "test", "rules", "tests.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- dashboard --------------------------------------------------------------------------------


def test_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = list(dashboard_panels())
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]


def test_dashboard_shows_what_was_asked() -> None:
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    missing = {what for name, what in DASHBOARD_MUST_SHOW.items() if name not in used}
    assert not missing


def test_dashboard_shows_accounts_needing_reauthorization() -> None:
    """Selected by state, not only one line among the others of "accounts by state"."""
    selected = {
        (metric, label, value)
        for expr in dashboard_exprs()
        for metric, label, op, value in selectors(expr)
        if op == "="
    }
    assert ("sidecar_accounts", "state", "reauthorization_required") in selected


def test_promtool_parses_the_dashboard_queries(promtool: str, tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, as a recording rule."""
    rules = [
        {"record": f"dashboard:query_{n}", "expr": grafana_to_promql(expr)}
        for n, expr in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
