#!/usr/bin/env bash
# Is `labctl load` the bottleneck? One run on one machine: a native stack,
# then wrk and `labctl load` in closed loop (same connections, same
# duration, same A endpoints), interleaved over rounds, medians side by
# side; then `labctl load --rps` open loop at rates near the capacity just
# measured, with its drops and its own dispatch lag. Stops the stack.
#
#   scripts/loadgen-vs-wrk.sh [--rounds N] [--duration SECONDS] [--connections C]
#
# Needs the release binaries (cargo build --release -p labctl -p service-a
# -p service-b -p partner-api), wrk (apt-get install wrk) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=3
duration=10
connections=32
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds=$2; shift 2 ;;
        --duration) duration=$2; shift 2 ;;
        --connections) connections=$2; shift 2 ;;
        *) echo "usage: $0 [--rounds N] [--duration SECONDS] [--connections C]" >&2; exit 2 ;;
    esac
done

# labctl up runs the service binaries found next to labctl.
bin="${CARGO_TARGET_DIR:-target}/release"
labctl="$bin/labctl"
for need in "$labctl" "$bin/service-a" "$bin/service-b" "$bin/partner-api"; do
    [ -x "$need" ] || { echo "missing $need: cargo build --release -p labctl -p service-a -p service-b -p partner-api" >&2; exit 1; }
done
command -v wrk >/dev/null || { echo "missing wrk: apt-get install wrk" >&2; exit 1; }

work=$(mktemp -d)
state="$work/lab"
stop() {
    "$labctl" down --state-dir "$state" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap stop EXIT

echo "== starting a native stack (mode fixed, 2 Bs) in $state"
"$labctl" up --mode fixed --ports auto --detach --state-dir "$state" >/dev/null
"$labctl" status --state-dir "$state" --json >"$work/status.json"
read -r a_url a_admin < <(python3 - "$work/status.json" <<'EOF'
import json, sys
status = json.load(open(sys.argv[1]))
a = next(s for s in status["services"] if s["name"] == "service-a")
print(a["url"], a["admin_url"])
EOF
)
echo "A: $a_url (admin $a_admin)"

# wrk's requests with a random item id, as labctl's {rand} (1..=10000).
cat >"$work/items.lua" <<'EOF'
math.randomseed(1)
request = function()
  return wrk.format("GET", "/api/items/" .. math.random(1, 10000))
end
EOF

# One measurement as a line: "<tool> <endpoint> <req/s> <p50 ms> <p99 ms>".
run_wrk() { # endpoint-name url [lua]
    wrk -t2 -c"$connections" -d"${duration}s" --latency ${3:+-s "$3"} "$2" >"$work/wrk.txt"
    python3 - "$1" "$work/wrk.txt" <<'EOF'
import re, sys
out = open(sys.argv[2]).read()
def ms(v):
    n, unit = re.match(r"([\d.]+)(us|ms|s)", v).groups()
    return float(n) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
p50 = ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
p99 = ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
print("wrk", sys.argv[1], rps, p50, p99, errors.group(1) if errors else 0)
EOF
}

run_labctl() { # endpoint-name base-url path
    "$labctl" load --url "$2" --path "$3" --concurrency "$connections" \
        --duration "${duration}s" --json "$work/report.json" >/dev/null
    python3 - "$1" "$work/report.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[2]))
print("labctl", sys.argv[1], r["rps"], r["latency_ms"]["p50"], r["latency_ms"]["p99"],
      r["requests"] - r["ok"])
EOF
}

results="$work/results.txt"
echo "== closed loop, $connections connections, ${duration}s per measurement, $rounds rounds interleaved"
for round in $(seq 1 "$rounds"); do
    for line in \
        "$(run_wrk healthz "$a_admin/healthz")" \
        "$(run_labctl healthz "$a_admin" /healthz)" \
        "$(run_wrk items "$a_url" "$work/items.lua")" \
        "$(run_labctl items "$a_url" '/api/items/{rand}')"; do
        echo "round $round: $line"
        echo "$line" >>"$results"
    done
done

echo
echo "== medians of $rounds rounds (closed loop, $connections connections, same stack, same endpoints)"
python3 - "$results" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
print(f"{'endpoint':<26} {'tool':<7} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
for endpoint, label in [("healthz", "A admin /healthz"), ("items", "A /api/items/{rand}")]:
    for tool in ["wrk", "labctl"]:
        sel = [r for r in rows if r[0] == tool and r[1] == endpoint]
        med = lambda i: statistics.median(float(r[i]) for r in sel)
        print(f"{label:<26} {tool:<7} {med(2):>9.0f} {med(3):>8.2f} {med(4):>8.2f} {med(5):>7.0f}")
EOF

capacity=$(python3 - "$results" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
print(int(statistics.median(float(r[2]) for r in rows if r[0] == "labctl" and r[1] == "items")))
EOF
)

echo
echo "== open loop at A /api/items/{rand}, near the closed-loop capacity ($capacity req/s), ${duration}s each"
# sent: requests sent per second of the schedule; answered: finished per
# second of the whole run, the drain after the last due request included.
printf '%-8s %9s %9s %9s %8s %10s %10s %9s %9s %10s\n' \
    "target" "req/s" "sent" "answered" "dropped" "lag p99" "lag max" "p50 ms" "p99 ms" "in flight"
for share in 50 75 90; do
    rate=$((capacity * share / 100))
    "$labctl" load --url "$a_url" --path '/api/items/{rand}' --rps "$rate" \
        --duration "${duration}s" --json "$work/open.json" >/dev/null
    python3 - "$work/open.json" "$share" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
lag = r["dispatch_lag_ms"]
print(f"{sys.argv[2] + '%':<8} {r['target_rps']:>9.0f} {r['sent_rps']:>9.0f} {r['rps']:>9.0f} {r['dropped']:>8} "
      f"{lag['p99']:>8.2f}ms {lag['max']:>8.2f}ms {r['latency_ms']['p50']:>9.2f} "
      f"{r['latency_ms']['p99']:>9.2f} {r['peak_in_flight']:>10}")
EOF
done
