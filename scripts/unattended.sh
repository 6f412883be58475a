# Sourced by a long unattended run's shell loop (scripts/run_study.py never commits; this may): a timestamped
# log line, committing each finished part's small results, and retrying a command that was killed.
#
#   source scripts/unattended.sh
#   retry 3 python scripts/run_study.py studies/NAME.toml; commit_paths "NAME: finished parts" results/NAME
#   stamp MESSAGE...              # "[2026-12-01 20:31:05 +1234s] MESSAGE"
#   commit_paths MESSAGE PATH...  # git add + commit of these paths only; COMMIT=0 turns commits off
#   retry N COMMAND...            # run COMMAND up to N times, RETRY_WAIT seconds apart; the last status
#
# Runners commit only their own result paths, so a person (or another runner) can commit beside them; a
# failed commit is logged and the run goes on (the files stay on disk for the next commit).
COMMIT=${COMMIT:-1}
RETRY_WAIT=${RETRY_WAIT:-60}   # the host's OOM killer or a crash: give the memory a minute to come back
UNATTENDED_T0=$(date +%s)

stamp() { echo "[$(date -u '+%F %H:%M:%S') +$(( $(date +%s) - UNATTENDED_T0 ))s] $*"; }

commit_paths() {
    [ "$COMMIT" = 1 ] || return 0
    local msg=$1 try; shift
    for try in 1 2 3 4 5 6; do   # another git process may hold .git/index.lock for a moment
        if git add -- "$@" 2>/dev/null; then
            git diff --cached --quiet -- "$@" && return 0
            git commit -q -m "$msg" -- "$@" && { stamp "committed: $msg"; return 0; }
        fi
        sleep $(( RANDOM % 20 + 5 ))
    done
    stamp "commit FAILED: $msg"
}

retry() {
    local n=$1 attempt status=0; shift
    for (( attempt = 1; attempt <= n; attempt++ )); do
        [ "$attempt" = 1 ] || { stamp "retry $attempt/$n: $*"; sleep "$RETRY_WAIT"; }
        "$@" && return 0 || status=$?
    done
    return "$status"
}
