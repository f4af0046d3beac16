#!/bin/sh
# A private certificate authority and the aggregator's TLS certificate, for a fleet whose devices trust only
# this CA (no public CA involved). Run once on an admin machine (not the server), keep ca.key offline.
#
#   deploy/tls/make-private-ca.sh OUT_DIR NAME [NAME ...]     # NAME: the aggregator's DNS names and/or IPs
#   deploy/tls/make-private-ca.sh ./fedser-tls fedser.example.org 10.0.0.5 fd00::5     # on the admin machine
#
# Writes OUT_DIR/ca.crt (to every device: REQUESTS_CA_BUNDLE, see fedser-edge-ca.conf), OUT_DIR/ca.key
# (stays on the admin machine, offline), OUT_DIR/server.crt and OUT_DIR/server.key (copy only these two to the
# aggregator's /etc/fedser-aggregator/tls: fedser-aggregator-tls.conf). IPv4 and IPv6 literals go in the
# certificate as IP: names, anything else as DNS:.
# Tested by tests/integration/test_server_ops.py::test_tls_example_configuration.
set -eu
[ $# -ge 2 ] || { echo "usage: $0 OUT_DIR NAME [NAME ...]" >&2; exit 2; }
out=$1; shift
mkdir -p "$out"
umask 077
san=""
for name in "$@"; do
    case $name in
        *:*) entry="IP:$name" ;;  # a colon: an IPv6 literal (a host name never holds one)
        *[!0-9.]*) entry="DNS:$name" ;;  # anything else but digits and dots: a host name
        *) entry="IP:$name" ;;
    esac
    san="${san:+$san,}$entry"
done
days=${FEDSER_TLS_DAYS:-825}
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 -subj "/CN=fedser fleet CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" \
    -keyout "$out/server.key" -out "$out/server.csr" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
    "$san" > "$out/server.ext"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial -days "$days" \
    -extfile "$out/server.ext" -out "$out/server.crt" 2>/dev/null
rm -f "$out/server.csr" "$out/server.ext" "$out/ca.srl"
chmod 644 "$out/ca.crt" "$out/server.crt"
echo "CA: $out/ca.crt   server: $out/server.crt (${san})"
