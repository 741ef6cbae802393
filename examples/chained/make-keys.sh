#!/bin/sh
# Node signing keys for core.toml and edge.toml, written into keys/ beside this script:
# <node>.pem (the private key, which stays on that node) and <node>.pub.pem (what the
# other node lists under [trust]). Running it again makes new keys for both nodes.
set -eu
# OCPP_ROUTER names the command if it is not on PATH, e.g. OCPP_ROUTER=.venv/bin/ocpp-router
router=${OCPP_ROUTER:-ocpp-router}
case $router in */*) router="$(cd "$(dirname "$router")" && pwd)/$(basename "$router")" ;; esac
cd "$(dirname "$0")"
mkdir -p keys
for node in core-1 edge-1; do
    printf '%s  key id ' "$node"
    "$router" keys new --force --out "keys/$node.pem"
    "$router" keys public --key "keys/$node.pem" --out "keys/$node.pub.pem" > /dev/null
done
