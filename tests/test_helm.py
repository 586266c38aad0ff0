"""The Helm chart, checked with the real helm binary (installed by .ci/tools.sh into .tools/).

Every rendering is validated against the Kubernetes API schemas (kubernetes-validate, strict:
unknown fields fail), and the rendered config.toml goes through the sidecar's own config parser
with the Secret files it names written where the chart mounts them.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tomllib
from collections import Counter
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar import config as config_module
from sidecar.crypto import generate_key
from sidecar.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "oauth-sidecar"
RULES = ROOT / "monitoring" / "prometheus-rules.yaml"
SECRETS_DIR = PurePosixPath("/etc/sidecar-secrets")
CONFIG_PATH = "/etc/sidecar/config.toml"
OLDEST, NATIVE_SIDECARS = "1.25.0", "1.29.0"
LATEST = kubernetes_validate.latest_version()
OPERATOR_KINDS = {"PodMonitor", "PrometheusRule"}  # CRDs: no schema in kubernetes-validate

Render = Callable[..., list[dict[str, Any]]]


def install_tool(name: str) -> str:
    """Path of a tool from .ci/tools.sh; a missing tool fails under CI=true, else skips."""
    result = subprocess.run(
        [str(ROOT / ".ci" / "tools.sh"), name],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        message = f".ci/tools.sh could not install {name}: {result.stderr.strip()[-1500:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return result.stdout.split()[-1]


@pytest.fixture(scope="session")
def helm() -> str:
    return install_tool("helm")


@pytest.fixture(scope="module")
def run_helm(helm: str, tmp_path_factory: pytest.TempPathFactory):
    values_dir = tmp_path_factory.mktemp("values")

    def run(command: str, values: dict[str, Any] | None = None, *args: str):
        argv = [helm, command, *args]
        if command == "template":
            argv += ["demo", str(CHART), "--namespace", "apps"]
        else:
            argv.append(str(CHART))
        if values:
            path = values_dir / f"values-{len(list(values_dir.iterdir()))}.json"
            path.write_text(json.dumps(values))
            argv += ["--values", str(path)]
        return subprocess.run(argv, capture_output=True, text=True, check=False)

    return run


@pytest.fixture(scope="module")
def render(run_helm) -> Render:
    """Rendered documents; one helm run per distinct set of values in this module."""
    cache: dict[str, list[dict[str, Any]]] = {}

    def render(values: dict[str, Any] | None = None, *args: str) -> list[dict[str, Any]]:
        key = json.dumps([values, args], sort_keys=True)
        if key not in cache:
            result = run_helm("template", values, *args)
            assert result.returncode == 0, result.stderr
            cache[key] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        return copy.deepcopy(cache[key])

    return render


def merge(*layers: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge values the way helm merges several --values files (lists replace)."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


NATIVE = {"nativeSidecar": {"enabled": True}}
PVC = {"store": {"sqlite": {"persistence": {"enabled": True, "storageClassName": "fast"}}}}
POSTGRES = {
    "store": {"backend": "postgres", "postgres": {"urlSecretRef": {"name": "pg", "key": "dsn"}}},
    "example": {"replicas": 3},
}
MONITORING = {"podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}
ADMIN_TOKEN = {"admin": {"tokenSecretRef": {"name": "sidecar-admin", "key": "token"}}}
MORE_CONFIG = {
    "config": {
        "sidecar": {"log_level": "debug", "shutdown_timeout_seconds": 2.5},
        "providers": [
            {
                "name": "users",
                "token_url": "https://auth.example.com/oauth/token",
                "client_id": "app",
                "clientSecretRef": {"name": "users-client", "key": "secret"},
                "scopes": ["read", "write"],
                "extra_params": {"tenant": "acme corp", 'odd "key"': "x"},
                "timeout_seconds": 5,
                "max_concurrent_refreshes": 2,
            },
            {
                "name": "machine",
                "token_url": "https://login.example.net/token",
                "grant": "client_credentials",
                "client_id": "svc",
                "auth_method": "client_secret_post",
                "clientSecretRef": {"name": "machine-client", "key": "secret"},
            },
        ],
        "upstreams": [
            {
                "name": "users-api",
                "port": 8081,
                "target": "https://api.example.com",
                "provider": "users",
            },
            {
                "name": "billing",
                "port": 8082,
                "target": "https://billing.example.net/v2",
                "provider": "machine",
                "replay_limit_bytes": 1048576,
                "retry_statuses": [401, 403],
                "require_invalid_token_challenge": True,
                "read_timeout_seconds": 0.5,
            },
        ],
    }
}
FEATURES = {
    "default": {},
    "native": NATIVE,
    "pvc": PVC,
    "postgres": POSTGRES,
    "monitoring": MONITORING,
    "everything": merge(NATIVE, POSTGRES, MONITORING, ADMIN_TOKEN, MORE_CONFIG),
}
EXPECTED_KINDS = {
    "default": {"ConfigMap", "Deployment"},
    "native": {"ConfigMap", "Deployment"},
    "pvc": {"ConfigMap", "Deployment", "PersistentVolumeClaim"},
    "postgres": {"ConfigMap", "Deployment"},
    "monitoring": {"ConfigMap", "Deployment", "PodMonitor", "PrometheusRule"},
    "everything": {"ConfigMap", "Deployment", "PodMonitor", "PrometheusRule"},
}


def kind(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == name]
    return doc


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return kind(docs, "Deployment")["spec"]["template"]["spec"]


def sidecar_container(spec: dict[str, Any]) -> dict[str, Any]:
    containers = spec.get("initContainers", []) + spec["containers"]
    (container,) = [c for c in containers if c["name"] == "oauth-sidecar"]
    return container


def rendered_toml(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return tomllib.loads(kind(docs, "ConfigMap")["data"]["config.toml"])


# --- lint, kinds, Kubernetes schemas ---------------------------------------------------------


@pytest.mark.parametrize("feature", ["default", "everything"])
def test_lint_strict(run_helm, feature: str) -> None:
    result = run_helm("lint", FEATURES[feature], "--strict")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("feature", FEATURES)
def test_renders_expected_kinds_valid_for_kubernetes(render: Render, feature: str) -> None:
    docs = render(FEATURES[feature])
    kinds = Counter(d["kind"] for d in docs)
    assert set(kinds) == EXPECTED_KINDS[feature]
    assert all(n == 1 for n in kinds.values()), kinds
    oldest = NATIVE_SIDECARS if FEATURES[feature].get("nativeSidecar") else OLDEST
    for doc in docs:
        if doc["kind"] in OPERATOR_KINDS:
            continue
        for version in (oldest, LATEST):
            kubernetes_validate.validate(doc, version, strict=True)


def test_example_can_be_left_out(render: Render) -> None:
    docs = render({"example": {"enabled": False}})
    assert [d["kind"] for d in docs] == ["ConfigMap"]


def test_no_secret_value_is_rendered(render: Render) -> None:
    """Secrets are referenced, never created from values."""
    for values in FEATURES.values():
        docs = render(values)
        assert "Secret" not in {d["kind"] for d in docs}
        toml = rendered_toml(docs)
        secret_keys = {"client_secret", "client_secret_env", "token"}
        for table in [toml["store"], toml["admin"], *toml["provider"]]:
            assert not secret_keys & set(table), table


# --- the sidecar container -------------------------------------------------------------------


def test_sidecar_container_is_hardened(render: Render) -> None:
    docs = render()
    spec = pod_spec(docs)
    container = sidecar_container(spec)
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] != 0
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert spec["securityContext"]["fsGroup"] == 10001
    assert spec["automountServiceAccountToken"] is False


def test_probes_use_the_admin_listener(render: Render) -> None:
    docs = render()
    container = sidecar_container(pod_spec(docs))
    (port,) = container["ports"]
    admin_port = int(rendered_toml(docs)["admin"]["listen"].rpartition(":")[2])
    assert (port["name"], port["containerPort"]) == ("sidecar-admin", admin_port)
    probes = {
        name: (container[name]["httpGet"]["path"], container[name]["httpGet"]["port"])
        for name in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes == {
        "startupProbe": ("/healthz", "sidecar-admin"),
        "livenessProbe": ("/healthz", "sidecar-admin"),
        "readinessProbe": ("/readyz", "sidecar-admin"),
    }


def test_admin_listens_on_the_pod_ip_and_upstreams_on_loopback_only(render: Render) -> None:
    toml = rendered_toml(render(MORE_CONFIG))
    assert toml["admin"]["listen"] == "0.0.0.0:9901"
    assert toml["admin"]["allow_non_loopback"] is True
    assert [u["listen"] for u in toml["upstream"]] == ["127.0.0.1:8081", "127.0.0.1:8082"]
    assert not any("allow_non_loopback" in u for u in toml["upstream"])


def test_regular_container_by_default(render: Render) -> None:
    spec = pod_spec(render())
    assert [c["name"] for c in spec["containers"]] == ["oauth-sidecar", "app"]
    assert "initContainers" not in spec
    assert "restartPolicy" not in spec["containers"][0]


def test_native_sidecar_is_a_restartable_init_container(render: Render) -> None:
    spec = pod_spec(render(NATIVE))
    assert [c["name"] for c in spec["containers"]] == ["app"]
    (init,) = spec["initContainers"]
    assert (init["name"], init["restartPolicy"]) == ("oauth-sidecar", "Always")
    assert init["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_native_sidecar_needs_kubernetes_1_29(run_helm) -> None:
    result = run_helm("template", NATIVE, "--kube-version", "1.28.3")
    assert result.returncode != 0
    assert "nativeSidecar.enabled needs Kubernetes 1.29" in result.stderr


def test_config_file_is_the_mounted_configmap(render: Render) -> None:
    docs = render()
    spec = pod_spec(docs)
    container = sidecar_container(spec)
    assert container["args"] == ["run", "--config", CONFIG_PATH]
    mount = mount_for(container, str(PurePosixPath(CONFIG_PATH).parent))
    volume = volume_named(spec, mount["name"])
    assert volume["configMap"]["name"] == kind(docs, "ConfigMap")["metadata"]["name"]
    annotations = kind(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert len(annotations["checksum/oauth-sidecar-config"]) == 64


def mount_for(container: dict[str, Any], path: str) -> dict[str, Any]:
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == path]
    return mount


def volume_named(spec: dict[str, Any], name: str) -> dict[str, Any]:
    (volume,) = [v for v in spec["volumes"] if v["name"] == name]
    return volume


# --- state ------------------------------------------------------------------------------------


def test_sqlite_state_on_an_empty_dir_by_default(render: Render) -> None:
    docs = render()
    spec = pod_spec(docs)
    state = volume_named(spec, mount_for(sidecar_container(spec), "/var/lib/sidecar")["name"])
    assert "emptyDir" in state
    assert rendered_toml(docs)["store"]["url"] == "sqlite:///var/lib/sidecar/tokens.db"


def test_sqlite_state_on_a_kept_pvc(render: Render) -> None:
    docs = render(PVC)
    spec = pod_spec(docs)
    state = volume_named(spec, mount_for(sidecar_container(spec), "/var/lib/sidecar")["name"])
    pvc = kind(docs, "PersistentVolumeClaim")
    assert state["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert pvc["spec"]["storageClassName"] == "fast"
    assert kind(docs, "Deployment")["spec"]["strategy"]["type"] == "Recreate"


def test_existing_claim_is_used_not_created(render: Render) -> None:
    docs = render(merge(PVC, {"store": {"sqlite": {"persistence": {"existingClaim": "tokens"}}}}))
    assert "PersistentVolumeClaim" not in {d["kind"] for d in docs}
    spec = pod_spec(docs)
    assert volume_named(spec, "oauth-sidecar-state")["persistentVolumeClaim"] == {
        "claimName": "tokens"
    }


def test_postgres_url_comes_from_a_secret(render: Render) -> None:
    docs = render(POSTGRES)
    store = rendered_toml(docs)["store"]
    assert "url" not in store
    spec = pod_spec(docs)
    volume = secret_volume_for(spec, store["url_file"])
    assert volume["secret"]["secretName"] == "pg"
    assert volume["secret"]["items"] == [{"key": "dsn", "path": "url"}]
    assert kind(docs, "Deployment")["spec"]["replicas"] == 3


def secret_volume_for(spec: dict[str, Any], path: str) -> dict[str, Any]:
    file = PurePosixPath(path)
    mount = mount_for(sidecar_container(spec), str(file.parent))
    assert mount["readOnly"] is True
    volume = volume_named(spec, mount["name"])
    assert file.name in [item["path"] for item in volume["secret"]["items"]]
    return volume


# --- the rendered config.toml against the sidecar's own validation ----------------------------


def secret_file_keys(toml: dict[str, Any]) -> list[tuple[str, str]]:
    """(key path, file) for every *_file setting in the rendered config."""
    tables = [("store", toml["store"]), ("admin", toml["admin"])]
    tables += [(f"provider[{i}]", p) for i, p in enumerate(toml.get("provider", []))]
    return [
        (f"{where}.{key}", value)
        for where, table in tables
        for key, value in table.items()
        if key.endswith("_file")
    ]


@pytest.fixture(scope="module")
def private_key_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def parse_with_secret_files(
    toml: dict[str, Any], tmp_path: Path, private_key_pem: str
) -> list[str]:
    """Write a plausible file wherever the config points under the secrets mount, then parse.

    The files get mode 0440, as the chart's Secret volumes give them; returns the problems.
    """
    contents = {
        "keys": generate_key() + "\n",
        "client-secret": "client-secret-value\n",
        "token": "an-admin-token-of-enough-length\n",
        "url": "postgresql://sidecar@db.example.com:5432/sidecar\n",
        "private-key.pem": private_key_pem,
    }
    raw = copy.deepcopy(toml)
    for key_path, value in secret_file_keys(toml):
        path = PurePosixPath(value)
        assert path.is_relative_to(SECRETS_DIR), (key_path, value)
        local = tmp_path / path.relative_to(SECRETS_DIR)
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(contents[path.name])
        local.chmod(0o440)
        table_name, _, key = key_path.rpartition(".")
        table = raw[table_name] if "[" not in table_name else raw["provider"][int(table_name[9:-1])]
        table[key] = str(local)
    try:
        config_module.parse(raw, {}, tmp_path)
    except ConfigError as exc:
        return list(exc.problems)
    return []


@pytest.mark.parametrize("feature", FEATURES)
def test_rendered_config_passes_sidecar_validation(
    render: Render, feature: str, tmp_path: Path, private_key_pem: str
) -> None:
    docs = render(FEATURES[feature])
    toml = rendered_toml(docs)
    spec = pod_spec(docs)
    for _, path in secret_file_keys(toml):
        mode = secret_volume_for(spec, path)["secret"]["defaultMode"]
        assert mode & 0o007 == 0, f"{path}: the sidecar refuses world-readable secret files"
    assert parse_with_secret_files(toml, tmp_path, private_key_pem) == []


def test_config_values_pass_through_verbatim(render: Render) -> None:
    toml = rendered_toml(render(MORE_CONFIG))
    assert toml["sidecar"] == {"log_level": "debug", "shutdown_timeout_seconds": 2.5}
    users, machine = toml["provider"]
    assert users["name"] == "users"
    assert users["extra_params"] == {"tenant": "acme corp", 'odd "key"': "x"}
    assert (users["timeout_seconds"], users["max_concurrent_refreshes"]) == (5, 2)
    assert isinstance(users["max_concurrent_refreshes"], int)
    assert machine["client_secret_file"] == "/etc/sidecar-secrets/client-1/client-secret"
    billing = toml["upstream"][1]
    assert billing["replay_limit_bytes"] == 1048576
    assert billing["retry_statuses"] == [401, 403]
    assert billing["require_invalid_token_challenge"] is True
    assert "port" not in billing and "clientSecretRef" not in users


def test_newer_sidecar_settings_pass_through(
    render: Render, tmp_path: Path, private_key_pem: str
) -> None:
    """A signing key from a Secret and a [notify] table: keys the chart does not model."""
    if "private_key_jwt" not in config_module.AUTH_METHODS:
        pytest.skip("sidecar.config has no private_key_jwt yet")
    values = {
        "config": {
            "providers": [
                {
                    "name": "signed",
                    "token_url": "https://auth.example.com/token",
                    "client_id": "app",
                    "auth_method": "private_key_jwt",
                    "privateKeySecretRef": {"name": "signing", "key": "key.pem"},
                    "key_id": "2024-01",
                }
            ],
            "upstreams": [
                {
                    "name": "api",
                    "port": 8081,
                    "target": "https://api.example.com",
                    "provider": "signed",
                }
            ],
            "notify": {"url": "https://hooks.example.com/sidecar", "attempts": 3},
        }
    }
    docs = render(values)
    toml = rendered_toml(docs)
    assert toml["notify"] == {"url": "https://hooks.example.com/sidecar", "attempts": 3}
    key_file = toml["provider"][0]["private_key_file"]
    assert secret_volume_for(pod_spec(docs), key_file)["secret"]["secretName"] == "signing"
    assert parse_with_secret_files(toml, tmp_path, private_key_pem) == []


def test_schema_enums_cover_the_sidecar() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    provider = schema["definitions"]["provider"]["properties"]
    assert set(config_module.GRANTS) <= set(provider["grant"]["enum"])
    assert set(config_module.AUTH_METHODS) <= set(provider["auth_method"]["enum"])


# --- values the schema (or the templates) reject ----------------------------------------------


def one_upstream(**fields: Any) -> dict[str, Any]:
    upstream = {"name": "a", "port": 8081, "target": "https://a.example", "provider": "example"}
    return {"config": {"upstreams": [{**upstream, **fields}]}}


def one_provider(**fields: Any) -> dict[str, Any]:
    provider = {
        "name": "example",
        "token_url": "https://auth.example.com/token",
        "client_id": "c",
        "clientSecretRef": {"name": "s", "key": "k"},
    }
    return {"config": {"providers": [{k: v for k, v in {**provider, **fields}.items() if v}]}}


BAD_VALUES = {
    "port as a string": ({"admin": {"port": "9901"}}, "/admin/port", "want integer"),
    "port out of range": (one_upstream(port=70000), "/config/upstreams/0/port", "maximum"),
    "unknown grant": (one_provider(grant="magic"), "/config/providers/0/grant", "one of"),
    "unknown log level": (
        {"config": {"sidecar": {"log_level": "loud"}}},
        "/config/sidecar/log_level",
        "one of",
    ),
    "unknown store backend": ({"store": {"backend": "redis"}}, "/store/backend", "one of"),
    "sqlite with replicas": ({"example": {"replicas": 2}}, "/example/replicas", "maximum"),
    "postgres without its url": (
        {"store": {"backend": "postgres"}},
        "/store/postgres/urlSecretRef/name",
        "pattern",
    ),
    "camelCase sidecar key": (
        one_provider(tokenUrl="https://x"),
        "/config/providers/0",
        "tokenUrl",
    ),
    "listen set by hand": (one_upstream(listen="0.0.0.0:80"), "/config/upstreams/0/listen", ""),
    "secret file set by hand": (
        one_provider(client_secret_file="/s"),
        "/config/providers/0/client_secret_file",
        "",
    ),
    "secret inlined": (
        one_provider(clientSecretRef={"name": "s", "key": "k", "value": "hunter2"}),
        "/config/providers/0/clientSecretRef",
        "value",
    ),
    "confidential client without secret": (
        one_provider(clientSecretRef=None),
        "/config/providers/0",
        "clientSecretRef",
    ),
    "provider without token_url or issuer": (
        one_provider(token_url=None),
        "/config/providers/0",
        "token_url",
    ),
    "issuer not a URL": (one_provider(issuer="idp"), "/config/providers/0/issuer", ""),
    "misspelled top-level key": ({"podmonitor": {"enabled": True}}, "podmonitor", "not allowed"),
    "switch as a string": (
        {"nativeSidecar": {"enabled": "yes"}},
        "/nativeSidecar/enabled",
        "boolean",
    ),
    "bad duration": ({"podMonitor": {"interval": "soon"}}, "/podMonitor/interval", "pattern"),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_schema_rejects_bad_values_naming_the_path(run_helm, case: str) -> None:
    values, path, detail = BAD_VALUES[case]
    result = run_helm("template", values)
    assert result.returncode != 0, f"accepted: {values}"
    assert "don't meet the specifications of the schema" in result.stderr
    assert f"'{path}'" in result.stderr, result.stderr
    assert detail in result.stderr, result.stderr


TEMPLATE_ERRORS = {
    "upstream on the admin port": (one_upstream(port=9901), "config.upstreams[0].port"),
    "upstream of an unknown provider": (one_upstream(provider="nope"), "no provider named"),
    "duplicate upstream port": (
        {
            "config": {
                "upstreams": [
                    one_upstream()["config"]["upstreams"][0],
                    one_upstream(name="b")["config"]["upstreams"][0],
                ]
            }
        },
        "config.upstreams[1].port",
    ),
}


@pytest.mark.parametrize("case", TEMPLATE_ERRORS)
def test_templates_reject_inconsistent_values(run_helm, case: str) -> None:
    values, message = TEMPLATE_ERRORS[case]
    result = run_helm("template", values)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


# --- monitoring objects ----------------------------------------------------------------------


def test_podmonitor_scrapes_the_example_pods_admin_port(render: Render) -> None:
    docs = render(MONITORING)
    monitor = kind(docs, "PodMonitor")
    pod = kind(docs, "Deployment")["spec"]["template"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    port_names = [p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])]
    assert endpoint["port"] in port_names
    assert {"targetLabel": "job", "replacement": "oauth-sidecar"} in endpoint["relabelings"]


def test_prometheusrule_carries_the_monitoring_rules_file(render: Render) -> None:
    rule = kind(render(MONITORING), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


# --- the named template in someone else's chart ----------------------------------------------

PARENT_JOB = """\
{{- $sidecar := index .Subcharts "oauth-sidecar" }}
{{- $podSpec := include "report.podSpec" . | fromYaml }}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ .Release.Name }}-report
spec:
  template:
    metadata:
      labels:
        {{- include "oauth-sidecar.podLabels" $sidecar | nindent 8 }}
    spec:
      {{- include "oauth-sidecar.inject" (dict "root" $sidecar "podSpec" $podSpec) | nindent 6 }}
{{- define "report.podSpec" -}}
restartPolicy: Never
securityContext:
  fsGroup: 2000
  runAsNonRoot: true
initContainers:
  - name: migrate
    image: busybox:1.36
    command: ["true"]
containers:
  - name: report
    image: busybox:1.36
    command: ["wget", "-qO-", "http://127.0.0.1:8081/report"]
volumes:
  - name: scratch
    emptyDir: {}
{{- end }}
"""


def test_inject_adds_the_sidecar_to_another_charts_pod_spec(helm: str, tmp_path: Path) -> None:
    """A Job in a parent chart: with a native sidecar, the Job still completes."""
    parent = tmp_path / "report"
    (parent / "templates").mkdir(parents=True)
    (parent / "charts").mkdir()
    (parent / "charts" / "oauth-sidecar").symlink_to(CHART)
    (parent / "Chart.yaml").write_text(
        "apiVersion: v2\nname: report\nversion: 1.0.0\n"
        "dependencies:\n  - name: oauth-sidecar\n    version: 0.1.0\n"
    )
    (parent / "values.yaml").write_text(
        yaml.safe_dump({"oauth-sidecar": {"example": {"enabled": False}, **NATIVE}})
    )
    (parent / "templates" / "job.yaml").write_text(PARENT_JOB)
    result = subprocess.run(
        [helm, "template", "r", str(parent)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Job"]
    job = kind(docs, "Job")
    kubernetes_validate.validate(job, LATEST, strict=True)
    spec = job["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["oauth-sidecar", "migrate"]
    assert [c["name"] for c in spec["containers"]] == ["report"]
    assert spec["volumes"][0]["name"] == "scratch"
    assert (
        volume_named(spec, "oauth-sidecar-config")["configMap"]["name"]
        == (kind(docs, "ConfigMap")["metadata"]["name"])
    )
    assert spec["securityContext"] == {"fsGroup": 2000, "runAsNonRoot": True}
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels == {"oauth-sidecar/release": "r-oauth-sidecar"}


def test_a_provider_may_name_only_its_issuer(run_helm) -> None:
    values = one_provider(
        token_url=None,
        issuer="https://auth.example.com",
        authorization_url="https://auth.example.com/authorize",
        redirect_uri="https://sidecar.example.com/oauth/callback",
    )
    result = run_helm("template", values)
    assert result.returncode == 0, result.stderr
    assert 'issuer = "https://auth.example.com"' in result.stdout
