#!/bin/sh
# Test keys and self-signed certificates for enwg-14a.toml, written into certs/ beside this
# script: <name>.key.pem (keep it secret) and <name>.crt.pem (what the policy names).
# In production, certificates come from the DSO's, the operator's and the station
# manufacturer's PKI; only the .crt.pem files go to the edge gateway.
set -eu
cd "$(dirname "$0")/certs"
router=${OCPP_ROUTER:-ocpp-router}
for name in dso cso-operations station-CS-14A-01; do
    "$router" keys new --force --out "$name.key.pem" > /dev/null
    printf '%s  x5t#S256 ' "$name"
    "$router" keys certificate --force --key "$name.key.pem" --cn "$name" --days 3650 \
        --out "$name.crt.pem"
done
