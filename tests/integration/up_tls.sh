#!/usr/bin/env bash
# `ablate up` end to end: TLS is on by default. The first start makes a local CA, the scheduler's and the workers'
# certificates, a token signing key and (legacy) tokens in <state>/pki (files 0600); the scheduler requires them,
# workers use mTLS, and the CLI finds the CA and the signing key through <state>/stack.json and mints a short-lived
# token per call. Without them a call is refused; so is an expired signed token. Keys and tokens appear in no log.
# A restart keeps the PKI; `ablate up --insecure` is plaintext.
#   up_tls.sh BIN_DIR WORK_DIR
set -euo pipefail
bin=$(cd "$1" && pwd); work=$2
rm -rf "$work"; mkdir -p "$work"; work=$(cd "$work" && pwd)
st="$work/state"; pki="$st/pki"; elsewhere="$work/elsewhere"
mkdir -p "$elsewhere"
cleanup() { "$bin/ablate" down --state_dir "$st" > /dev/null 2>&1 || true; }
trap cleanup EXIT
fail() {
  echo "UP_TLS FAIL: $*" >&2
  for f in "$work"/*.out "$st"/logs/scheduler.log "$st"/logs/worker-*.log; do
    [ -f "$f" ] && { echo "--- $f"; tail -n 20 "$f"; }
  done >&2
  exit 1
}
addr() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["scheduler"])' "$st/stack.json"; }
mode() { stat -c %a "$1"; }
cat > "$work/sweep.yaml" <<'YAML'
name: up-tls
grid:
  model_size: [tiny]
  context_length: [64]
train:
  dataset: fortunes
  num_train_steps: 20
  warmup_steps: 2
  batch_size: 4
  eval_interval: 10
  log_interval: 5
YAML

# 1. First start: TLS on, the PKI made, every file 0600 in a 0700 directory.
"$bin/ablate" up --state_dir "$st" --data_root "$work/data" --workers 1 > "$work/up1.out" 2>&1 || fail "ablate up"
grep -q "TLS on" "$work/up1.out" || fail "ablate up did not turn TLS on"
grep -q "TLS: made ca.pem" "$work/up1.out" || fail "the first start did not make the PKI"
[ "$(mode "$pki")" = 700 ] || fail "$pki has mode $(mode "$pki")"
wid="$(hostname)-w0"
for f in ca.pem ca-key.pem scheduler.pem scheduler-key.pem "$wid.pem" "$wid-key.pem" user.token admin.token tokens \
         token-signing.key revoked-tokens; do
  [ -f "$pki/$f" ] || fail "$pki/$f missing"
done
for f in "$pki"/*; do [ "$(mode "$f")" = 600 ] || fail "$f has mode $(mode "$f")"; done
a=$(addr)
grep -q "tls=on client_ca=on tokens_file=on signed_tokens=on revoked_tokens_file=on" "$st/logs/scheduler.log" \
  || fail "the scheduler runs without TLS/authentication/signed tokens"
grep -q "auth=mtls" "$st/logs/worker-0.log" || fail "the worker does not use its client certificate"
echo "stack up with TLS at $a; PKI in $pki"

# 2. The CLI uses the stack's CA and user token by itself: a sweep runs to success (real ablate-train).
"$bin/ablate" submit "$work/sweep.yaml" --state_dir "$st" --wait > "$work/submit.out" 2>&1 \
  || fail "submit --wait over TLS: $(tail -5 "$work/submit.out")"
"$bin/ablate" status 1 --state_dir "$st" > "$work/status.out" 2>&1 || fail "status over TLS"
grep -q succeeded "$work/status.out" || fail "the job did not succeed: $(cat "$work/status.out")"
echo "submit --wait, status: ok over TLS"

# 3. Without the stack's settings: plaintext cannot talk to it; TLS without a token, or a wrong one, is refused.
set +e
"$bin/ablate" status --scheduler "$a" --state_dir "$elsewhere" > "$work/plain.out" 2>&1; rc1=$?
ABLATE_CA="$pki/ca.pem" "$bin/ablate" status --scheduler "$a" --state_dir "$elsewhere" > "$work/notoken.out" 2>&1; rc2=$?
ABLATE_CA="$pki/ca.pem" ABLATE_TOKEN=0123456789abcdef0123456789abcdef "$bin/ablate" status --scheduler "$a" \
  --state_dir "$elsewhere" > "$work/wrongtoken.out" 2>&1; rc3=$?
set -e
[ "$rc1" = 1 ] && grep -q "cannot reach" "$work/plain.out" || fail "a plaintext call got through (rc $rc1)"
[ "$rc2" = 1 ] && grep -q "not authenticated" "$work/notoken.out" || fail "a call without a token got through (rc $rc2)"
[ "$rc3" = 1 ] && grep -q "not authenticated" "$work/wrongtoken.out" || fail "a wrong token got through (rc $rc3)"
# Signed tokens issued by hand with the stack's key: an admin token works; an expired one is refused, saying so.
"$bin/ablate" token issue --state_dir "$st" --tenant local --role admin --ttl 10m --out "$work/admin.jwt" \
  > "$work/issue.out" 2>&1 || fail "ablate token issue: $(cat "$work/issue.out")"
"$bin/ablate" token issue --state_dir "$st" --tenant local --role admin --ttl 1m --backdate 1h \
  --out "$work/expired.jwt" > "$work/issue2.out" 2>&1 || fail "ablate token issue (expired)"
ABLATE_CA="$pki/ca.pem" "$bin/ablate" status --scheduler "$a" --state_dir "$elsewhere" --token_file "$work/admin.jwt" \
  > "$work/admin.out" 2>&1 || fail "a signed admin token was refused: $(cat "$work/admin.out")"
set +e
ABLATE_CA="$pki/ca.pem" "$bin/ablate" status --scheduler "$a" --state_dir "$elsewhere" --token_file "$work/expired.jwt" \
  > "$work/expired.out" 2>&1; rc4=$?
set -e
[ "$rc4" = 1 ] && grep -q "token expired" "$work/expired.out" || fail "an expired token got through (rc $rc4)"
echo "plaintext, no token, wrong token, expired signed token: refused; signed admin token: ok"

# 4. No token and no private key in any log or output.
# A token is its first line; of a P-256 key (PKCS#8) the 32-byte private scalar follows a 36-byte header common
# to every such key, so base64 characters 49-90 are the secret ones.
for f in "$pki"/*.token "$pki"/*-key.pem "$pki"/token-signing.key "$work"/*.jwt; do
  case "$f" in
    *.token|*.key|*.jwt) secret=$(head -n1 "$f") ;;
    *) secret=$(grep -v -- '-----' "$f" | tr -d '\n' | cut -c49-90) ;;
  esac
  [ "${#secret}" -ge 40 ] || fail "could not read the secret part of $f"
  if grep -rqF -- "$secret" "$st/logs" "$work"/*.out; then fail "the content of $(basename "$f") appears in a log"; fi
done
echo "no key or token in the logs"

# 5. A restart keeps the PKI (same CA, nothing made) and the CLI still works.
ca_sum=$(sha256sum < "$pki/ca.pem")
"$bin/ablate" down --state_dir "$st" > "$work/down1.out" 2>&1 || fail "ablate down"
"$bin/ablate" up --state_dir "$st" --data_root "$work/data" --workers 1 > "$work/up2.out" 2>&1 || fail "second ablate up"
[ "$(sha256sum < "$pki/ca.pem")" = "$ca_sum" ] || fail "the restart replaced the CA"
if grep -q "TLS: made" "$work/up2.out"; then fail "the restart re-made PKI files: $(grep 'TLS: made' "$work/up2.out")"; fi
"$bin/ablate" status --state_dir "$st" > "$work/status2.out" 2>&1 || fail "status after the restart"
echo "restart: PKI kept, CLI ok"

# 6. --insecure: plaintext, as before, on request.
"$bin/ablate" down --state_dir "$st" > "$work/down2.out" 2>&1 || fail "ablate down"
"$bin/ablate" up --state_dir "$st" --data_root "$work/data" --workers 1 --insecure > "$work/up3.out" 2>&1 \
  || fail "ablate up --insecure"
grep -q "TLS OFF" "$work/up3.out" || fail "--insecure did not say that TLS is off"
grep -q '"tls": null' "$st/stack.json" || fail "stack.json of an --insecure stack names TLS settings"
"$bin/ablate" status --scheduler "$(addr)" --state_dir "$elsewhere" > "$work/status3.out" 2>&1 \
  || fail "plaintext status against the --insecure stack"
echo "--insecure: plaintext ok"
echo "UP_TLS PASS"
