#!/usr/bin/env bash
# Smoke test of a running Conveyor API: submit a job, wait for it, read metrics.
# Usage: scripts/smoke-test.sh BASE_URL   (e.g. http://127.0.0.1:8000)
# Set CONVEYOR_API_KEY to send it as a Bearer token.
set -euo pipefail
BASE="${1:?usage: smoke-test.sh BASE_URL}"
auth=()
[ -n "${CONVEYOR_API_KEY:-}" ] && auth=(-H "Authorization: Bearer $CONVEYOR_API_KEY")
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval('d'+sys.argv[1]))" "$1"; }

resp=$(curl -sf "${auth[@]}" -X POST "$BASE/api/jobs" -H 'Content-Type: application/json' \
    -d '{"job_type":"test_job","payload":{"message":"smoke test"}}')
JOB_ID=$(echo "$resp" | json "['job_id']")
echo "submitted $JOB_ID"

deadline=$((SECONDS + 30))
while :; do
    status=$(curl -sf "${auth[@]}" "$BASE/api/jobs/$JOB_ID" | json "['job']['status']")
    [ "$status" = completed ] && break
    if [ "$status" = failed ] || [ "$status" = cancelled ] || [ $SECONDS -ge $deadline ]; then
        echo "FAIL: job $JOB_ID is $status" >&2
        exit 1
    fi
    sleep 0.2
done
echo "completed"

pending=$(curl -sf "${auth[@]}" "$BASE/api/jobs/metrics" | json "['metrics']['queue_depths']['pending']")
case "$pending" in
    ''|*[!0-9]*) echo "FAIL: queue_depths.pending is not a number: $pending" >&2; exit 1 ;;
esac
echo "metrics ok (pending=$pending)"

# The job's lifecycle events, from the outbox (what the WebSocket streams live).
types=$(curl -sf "${auth[@]}" "$BASE/api/events?job_id=$JOB_ID" \
    | python3 -c "import json,sys; print(','.join(e['type'] for e in json.load(sys.stdin)['events']))")
case "$types" in
    job_submitted,job_started,job_completed) echo "events ok ($types)" ;;
    *) echo "FAIL: events of $JOB_ID are '$types'" >&2; exit 1 ;;
esac
echo "SMOKE TEST PASSED"
