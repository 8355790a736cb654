#!/usr/bin/env bash
# Two builds of the lab side by side on A's hot path (HTTP → gRPC → B →
# MySQL), in one run: README, "The hot path, profiled: before and after".
#
#   scripts/bench-hotpath.sh BEFORE_BIN_DIR AFTER_BIN_DIR
#
# Each directory holds labctl, service-a, service-b and partner-api of one
# build (labctl runs the binaries next to itself). Every round starts a
# fresh stack per build (same config, free ports), warms it up, then drives
# closed-loop load at A's HTTP port and reads the CPU time A, every B and
# MySQL used in the measured window from /proc/<pid>/stat (utime + stime).
# The builds alternate which goes first from round to round, and the table
# gives medians over the rounds. One load generator (AFTER's labctl) drives
# both builds, so only the lab differs.
#
# Settings (environment): ROUNDS (3), DURATION (10s), WARMUP (3s),
# CONCURRENCY (32), BACKENDS (2), MODE (fixed), SET (extra `--set KEY=VALUE`
# for the stacks, space-separated), OUT (a temporary directory: per-run
# load reports and the stacks' logs are kept there).
set -euo pipefail

if [[ $# -ne 2 ]]; then
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
before=$(realpath "$1")
after=$(realpath "$2")
for dir in "$before" "$after"; do
    for bin in labctl service-a service-b partner-api; do
        [[ -x $dir/$bin ]] || { echo "error: $dir/$bin is missing" >&2; exit 2; }
    done
done
command -v jq >/dev/null || { echo "error: jq is needed (apt-get install jq)" >&2; exit 2; }

rounds=${ROUNDS:-3}
duration=${DURATION:-10s}
warmup=${WARMUP:-3s}
concurrency=${CONCURRENCY:-32}
backends=${BACKENDS:-2}
mode=${MODE:-fixed}
out=${OUT:-$(mktemp -d -t bench-hotpath.XXXXXX)}
mkdir -p "$out"
loadgen=$after/labctl
tick=$(getconf CLK_TCK)
sets=()
for kv in ${SET:-}; do sets+=(--set "$kv"); done

# CPU ticks (user + system) of a process so far. Fields after the command
# name, which may hold spaces, so it is cut off first: utime and stime are
# fields 14 and 15 of the whole line.
ticks() {
    sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'
}

# Sum of ticks over several pids.
ticks_of() {
    local sum=0 pid
    for pid in "$@"; do sum=$((sum + $(ticks "$pid"))); done
    echo "$sum"
}

state_dir=""
cleanup() {
    if [[ -n $state_dir && -d $state_dir ]]; then
        "$loadgen" down --state-dir "$state_dir" >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

results=$out/results.tsv
printf 'build\tround\trps\tp50_ms\tp99_ms\terrors\tok\ta_cpu_s\tb_cpu_s\tmysql_cpu_s\n' >"$results"

# One measured run: fresh stack of `build`, warm-up, measured load, CPU.
run_one() {
    local build=$1 dir=$2 round=$3
    state_dir=$out/$build-$round
    rm -rf "$state_dir"
    echo "== round $round: $build" >&2
    "$dir/labctl" up --ports auto --detach --state-dir "$state_dir" --mode "$mode" \
        --backends "$backends" "${sets[@]}" >"$out/$build-$round.up.log" 2>&1 || {
        cat "$out/$build-$round.up.log" >&2
        return 1
    }
    local status a_url a_pid b_pids mysql_pid
    status=$("$dir/labctl" status --json --state-dir "$state_dir")
    a_url=$(jq -r '.services[] | select(.name == "service-a") | .url' <<<"$status")
    a_pid=$(jq -r '.services[] | select(.name == "service-a") | .pid' <<<"$status")
    mapfile -t b_pids < <(jq -r '.services[] | select(.name | startswith("service-b-")) | .pid' <<<"$status")
    mysql_pid=$(jq -r '.services[] | select(.name == "mysql") | .pid' <<<"$status")

    "$loadgen" load --url "$a_url" --duration "$warmup" --concurrency "$concurrency" >/dev/null
    local a0 b0 m0 a1 b1 m1
    a0=$(ticks "$a_pid"); b0=$(ticks_of "${b_pids[@]}"); m0=$(ticks "$mysql_pid")
    "$loadgen" load --url "$a_url" --duration "$duration" --concurrency "$concurrency" \
        --json "$out/$build-$round.load.json" >/dev/null
    a1=$(ticks "$a_pid"); b1=$(ticks_of "${b_pids[@]}"); m1=$(ticks "$mysql_pid")

    "$loadgen" down --state-dir "$state_dir" >/dev/null 2>&1
    state_dir=""
    jq -r --arg build "$build" --arg round "$round" --argjson tick "$tick" \
        --argjson a $((a1 - a0)) --argjson b $((b1 - b0)) --argjson m $((m1 - m0)) \
        '[$build, $round, .rps, .latency_ms.p50, .latency_ms.p99,
          ([.errors[]] | add // 0), .ok,
          $a / $tick, $b / $tick, $m / $tick] | @tsv' \
        "$out/$build-$round.load.json" >>"$results"
}

for round in $(seq 1 "$rounds"); do
    if ((round % 2)); then
        run_one before "$before" "$round"; run_one after "$after" "$round"
    else
        run_one after "$after" "$round"; run_one before "$before" "$round"
    fi
done

# Medians per build; CPU per 10 000 answered requests is taken per round
# (CPU seconds × 10 000 / ok requests), then the median.
awk -F'\t' -v rounds="$rounds" '
    function median(list,   n, a, i, j, t) {
        n = split(list, a, " ")
        for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] + 0 > a[j] + 0; j--) {
            t = a[j]; a[j] = a[j - 1]; a[j - 1] = t
        }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    NR == 1 { next }
    {
        b = $1
        rps[b] = rps[b] " " $3; p50[b] = p50[b] " " $4; p99[b] = p99[b] " " $5
        err[b] = err[b] " " $6
        per = ($7 > 0) ? 10000 / $7 : 0
        a[b] = a[b] " " $8 * per; bb[b] = bb[b] " " $9 * per; m[b] = m[b] " " $10 * per
    }
    END {
        printf "| build | req/s | p50 ms | p99 ms | A CPU s / 10k req | B CPU s / 10k req (all Bs) | MySQL CPU s / 10k req | errors |\n"
        printf "|---|---:|---:|---:|---:|---:|---:|---:|\n"
        split("before after", order, " ")
        for (k = 1; k <= 2; k++) {
            b = order[k]
            printf "| %s | %.0f | %.2f | %.2f | %.3f | %.3f | %.3f | %d |\n", b, median(rps[b]),
                median(p50[b]), median(p99[b]), median(a[b]), median(bb[b]), median(m[b]),
                median(err[b])
        }
        printf "\nmedians of %d rounds; per-round figures: %s\n", rounds, FILENAME
    }
' "$results"
