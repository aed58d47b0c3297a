# tools/demo-common.sh - what tools/demo and tools/sandbox-demo share.
# Sourced (not run) from the repository root by a demo script.
#
#   demo_prepare            install packages (tools/setup), build the guest
#                           assets and tidevm (release)
#   demo_run_inside SCRIPT SECS
#                           run "SCRIPT --inside" here, or inside the nested
#                           harness (at most SECS seconds) when this
#                           /dev/kvm cannot boot Linux; does not return
#   api METHOD PATH [JSON]  a REST API call on the socket "$sock"; fails on
#                           an error status, printing its answer
#   rss PID                 a process's resident set size ("123 kB")
#   wait_for SECS WHAT CMD...
#                           run CMD until it succeeds, for at most SECS
#                           seconds, while tidevm ("$vmm") is alive

demo_prepare() {
  tools/setup
  tools/guest-assets >/dev/null
  cargo build --release -p vmm
}

demo_run_inside() {
  if tools/kvm-can-boot-linux; then
    exec "$1" --inside
  fi
  echo "demo: this /dev/kvm cannot boot Linux; running inside the nested harness (a few minutes)"
  exec tools/harness --timeout "$2" -- "$1" --inside
}

api() {
  local body=()
  [ $# -lt 3 ] || body=(-H 'Content-Type: application/json' -d "$3")
  curl -sS --fail-with-body --unix-socket "$sock" -X "$1" "http://localhost$2" "${body[@]}"
}

rss() {
  awk '/VmRSS/ {print $2, $3}' "/proc/$1/status"
}

wait_for() {
  local secs=$1 what=$2 start=$SECONDS
  shift 2
  until "$@"; do
    kill -0 "$vmm" 2>/dev/null || { echo "demo: tidevm exited while waiting for $what" >&2; exit 1; }
    [ $((SECONDS - start)) -lt "$secs" ] || { echo "demo: no $what within $secs s" >&2; exit 1; }
    sleep 0.2
  done
}
