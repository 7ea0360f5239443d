#!/usr/bin/env bash
# Make self-signed TLS certificates for a cmd-fl deployment: a CA and a SuperLink server
# certificate signed by it.
#
#   scripts/make_certs.sh [OUT_DIR] [EXTRA_NAME ...]
#
# OUT_DIR (default: $FLWR_HOME/certificates, i.e. ~/.flwr/certificates: outside the repository,
# so that no private key is ever committed) receives
#   ca.crt      the CA certificate: every SuperNode (--root-certificates) and every `flwr`
#               connection (root-certificates = "...") needs it to trust the SuperLink
#   ca.key      the CA's private key: keep it on the machine that makes certificates
#   server.crt  the SuperLink's certificate (--ssl-certfile), signed by the CA
#   server.key  its private key (--ssl-keyfile): only the SuperLink machine needs it
# The server certificate's subjectAltName holds 127.0.0.1, localhost, this machine's host name
# (and its fully qualified name when it has one), plus every EXTRA_NAME: an IP address
# (e.g. the SuperLink's LAN address, 192.168.1.10) or a DNS name. SuperNodes and `flwr` must
# reach the SuperLink by one of these names, or TLS verification fails.
#
# Certificates are valid for 365 days (CMD_FL_CERT_DAYS overrides). Existing files in OUT_DIR
# are replaced. Needs openssl (1.1.1 or newer).
set -euo pipefail

OUT_DIR="${1:-${FLWR_HOME:-$HOME/.flwr}/certificates}"
if [ "$#" -gt 0 ]; then
    shift
fi
DAYS="${CMD_FL_CERT_DAYS:-365}"

if ! command -v openssl >/dev/null; then
    echo "[make_certs] openssl not found: install it (e.g. apt-get install openssl)" >&2
    exit 2
fi

is_ip() {  # an IPv4 or IPv6 literal
    [[ "$1" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ || "$1" == *:* ]]
}

# Subject alternative names, deduplicated, in a stable order.
NAMES=(127.0.0.1 localhost "$(hostname)")
if FQDN="$(hostname -f 2>/dev/null)" && [ -n "$FQDN" ]; then
    NAMES+=("$FQDN")
fi
NAMES+=("$@")
SAN=""
declare -A SEEN=()
for name in "${NAMES[@]}"; do
    if [ -z "$name" ] || [ -n "${SEEN[$name]:-}" ]; then
        continue
    fi
    SEEN[$name]=1
    if is_ip "$name"; then
        SAN+="${SAN:+,}IP:$name"
    else
        SAN+="${SAN:+,}DNS:$name"
    fi
done

mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
umask 077  # private keys readable by their owner only

# The CA: a self-signed certificate that may sign others.
openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days "$DAYS" \
    -subj "/CN=cmd-fl test CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$WORK/ca.key" -out "$WORK/ca.crt" 2>/dev/null

# The SuperLink's key and certificate request, then the certificate signed by the CA.
openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=cmd-fl SuperLink" \
    -keyout "$WORK/server.key" -out "$WORK/server.csr" 2>/dev/null
cat >"$WORK/server.ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = $SAN
EOF
openssl x509 -req -sha256 -days "$DAYS" -in "$WORK/server.csr" \
    -CA "$WORK/ca.crt" -CAkey "$WORK/ca.key" -CAcreateserial \
    -extfile "$WORK/server.ext" -out "$WORK/server.crt" 2>/dev/null

openssl verify -CAfile "$WORK/ca.crt" "$WORK/server.crt" >/dev/null
for file in ca.crt ca.key server.crt server.key; do
    mv -f "$WORK/$file" "$OUT_DIR/$file"
done
chmod 644 "$OUT_DIR/ca.crt" "$OUT_DIR/server.crt"
echo "[make_certs] wrote ca.crt, ca.key, server.crt, server.key to $OUT_DIR"
echo "[make_certs] server certificate names: $SAN"
