#!/bin/sh
# Test certificates for node.toml, written into pki/ beside this script: a site CA
# (site-ca.pem, the file stations are told to trust) and the node's TLS server
# certificate for localhost and 127.0.0.1 signed by it (node-server.pem and its key
# node-server.key, which stays secret). In production the server certificate comes from
# the site's or the operator's PKI, naming the host and address stations dial.
set -eu
cd "$(dirname "$0")"
mkdir -p pki
cd pki
umask 077
new_ec() { openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "$@" 2> /dev/null; }
new_ec -x509 -days 3650 -subj "/CN=Example Site CA" -keyout site-ca.key -out site-ca.pem
new_ec -subj "/CN=localhost" -keyout node-server.key -out node-server.csr
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > server.ext
openssl x509 -req -in node-server.csr -CA site-ca.pem -CAkey site-ca.key -CAcreateserial \
    -days 825 -extfile server.ext -out node-server.pem 2> /dev/null
rm -f node-server.csr server.ext site-ca.srl
chmod 644 site-ca.pem node-server.pem
echo "pki/site-ca.pem: the CA stations trust; pki/node-server.pem + .key: the node's TLS certificate"
