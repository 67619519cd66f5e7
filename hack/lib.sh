# shellcheck shell=bash
# Shared by hack/cluster.sh and hack/node.sh (sourced, not run): their processes, by PID.
#
# Each process started here runs detached, logs to $LOGS/NAME.log and has its PID in
# $RUN/NAME.pid. A PID counts as ours only while its command line still names a mark (by
# default $CLUSTER_DIR), so a reused PID is never signalled. The caller defines log and die,
# and sets RUN, LOGS and CLUSTER_DIR.

alive() {  # alive NAME [MARK]: run/NAME.pid is alive and its command line names MARK
  local pidfile="$RUN/$1.pid" pid
  [[ -f "$pidfile" ]] || return 1
  pid="$(cat "$pidfile")"
  [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
  grep -q -- "${2:-$CLUSTER_DIR}" <<<"$(tr '\0' ' ' <"/proc/$pid/cmdline")"
}

start() {  # start NAME BINARY ARGS...: detached, logs in logs/NAME.log, PID in run/NAME.pid
  local name="$1"
  shift
  if alive "$name"; then
    log "$name already runs (pid $(cat "$RUN/$name.pid"))"
    return
  fi
  setsid "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN/$name.pid"
  log "started $name (pid $!)"
}

stop() {  # stop NAME [MARK]: SIGTERM, SIGKILL after 15 s; only a PID whose cmdline has MARK
  local name="$1" mark="${2:-$CLUSTER_DIR}" pid
  alive "$name" "$mark" || { rm -f "$RUN/$name.pid"; return 0; }
  pid="$(cat "$RUN/$name.pid")"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 150); do
    alive "$name" "$mark" || break
    sleep 0.1
  done
  if alive "$name" "$mark"; then kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$RUN/$name.pid"
  log "stopped $name (pid $pid)"
}

wait_for() {  # wait_for WHAT SECONDS COMMAND...: COMMAND succeeds within SECONDS, or die
  local what="$1" secs="$2"
  shift 2
  for _ in $(seq $((secs * 5))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  die "$what did not come up in ${secs}s; see $LOGS"
}
