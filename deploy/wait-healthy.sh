#!/usr/bin/env bash
# Waits until every member and the proxy of compose project $1 (default
# cairn) report healthy and a write goes through the proxy; prints the time it took.
set -euo pipefail
project="${1:-cairn}"
port="${CAIRN_PORT:-2379}"
start=$(date +%s.%N)
deadline=$(( $(date +%s) + 120 ))
for member in m1 m2 m3 proxy; do
  container="$(docker ps -q --filter "label=com.docker.compose.project=$project" --filter "label=com.docker.compose.service=$member")"
  [[ -n "$container" ]] || { echo "no container for $member in project $project" >&2; exit 1; }
  until [[ "$(docker inspect -f '{{.State.Health.Status}}' "$container")" == healthy ]]; do
    (( $(date +%s) < deadline )) || { echo "$member is not healthy after 120 s" >&2; exit 1; }
    sleep 0.2
  done
done
until ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:$port" --command-timeout=2s put cairn-stack-check ok >/dev/null 2>&1; do
  (( $(date +%s) < deadline )) || { echo "the proxy on port $port does not take writes after 120 s" >&2; exit 1; }
  sleep 0.2
done
awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "stack healthy in %.1f s\n", e - s }'
