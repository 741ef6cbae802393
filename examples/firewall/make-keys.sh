#!/bin/sh
# The node's own signing key for node.toml, written to keys/site-fw-1.pem beside this
# script (it stays on the node). The policy's countersigning rule signs with it; publish
# the key id it prints (or `ocpp-router keys public --key keys/site-fw-1.pem`) to whoever
# verifies the countersignatures.
set -eu
# OCPP_ROUTER names the command if it is not on PATH, e.g. OCPP_ROUTER=.venv/bin/ocpp-router
router=${OCPP_ROUTER:-ocpp-router}
case $router in */*) router="$(cd "$(dirname "$router")" && pwd)/$(basename "$router")" ;; esac
cd "$(dirname "$0")"
mkdir -p keys
printf 'site-fw-1  key id '
"$router" keys new --force --out keys/site-fw-1.pem
