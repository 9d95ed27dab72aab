#!/usr/bin/env bash
# Installs what Ferrata's demo, tests and benchmarks need on Debian/Ubuntu, only when
# missing: mariadb-server (mariadbd, mariadb-install-db), mariadb-client (the `mariadb`
# CLI), mariadb-test (`mariadb-client-test`, for the differential client test), sysbench,
# haproxy (a side of bench/passthrough), chromium, nodejs and npm (the console's browser
# tests, scripts/console-tests.sh, which installs playwright-core from npm itself);
# python3-venv, for a virtualenv with DTM's Python SDK (tests/dtmcli/venv: dtmcli, the
# DTM-compatible API's acceptance test); etcd-server and etcd-client (the coordinator's etcd
# store and HA tests start their own clusters, and turn on etcd's authentication with
# etcdctl); protobuf-compiler and libprotobuf-dev (the etcd-client
# crate generates etcd's API with protoc at build time); iproute2 (`ip`: the HA tests' network
# namespaces and veth pairs); and cargo-fuzz (from crates.io, into ~/.cargo/bin)
# for scripts/fuzz.sh.
set -euo pipefail
missing=()
command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ] || missing+=(mariadb-server)
command -v mariadb >/dev/null 2>&1 || missing+=(mariadb-client)
command -v mariadb-client-test >/dev/null 2>&1 || missing+=(mariadb-test)
command -v sysbench >/dev/null 2>&1 || missing+=(sysbench)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
python3 -c "import ensurepip, venv" >/dev/null 2>&1 || missing+=(python3-venv)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/timestamp.proto ] || missing+=(libprotobuf-dev)
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing: ${missing[*]}"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    # Debian starts the packaged server; Ferrata starts its own throw-away servers.
    $sudo systemctl disable --now mariadb >/dev/null 2>&1 || true
    $sudo systemctl disable --now haproxy >/dev/null 2>&1 || true
    $sudo systemctl disable --now etcd >/dev/null 2>&1 || true
fi

# DTM's Python SDK at the version the acceptance test was written against, in a virtualenv
# of the repository's own (tc-server/tests/dtm.rs runs it).
venv="$(dirname "$0")/../tests/dtmcli/venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import dtmcli" >/dev/null 2>&1; then
    echo "installing: dtmcli into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check dtmcli==1.7.7.0 requests==2.32.3
fi

# The fuzz targets build on stable Rust with cargo-fuzz; libFuzzer is compiled by
# libfuzzer-sys, which needs a C++ compiler (build-essential's g++).
if ! command -v cargo-fuzz >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo-fuzz" ]; then
    echo "installing: cargo-fuzz"
    cargo install --locked cargo-fuzz --version 0.13.2
fi
