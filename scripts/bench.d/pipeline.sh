# The pipeline benchmarks' measurement (scripts/bench-partitions, scripts/bench-nats): a
# pre-loaded outbox drained by one relay, then the events applied by one consumer, each timed,
# with the CPU each used and the broker's. Source it after lib.sh, with RUN, EVENTS, RELAY,
# CONSUMER and WORK set; `broker_pids` holds the broker's processes (for their CPU) and `pids`
# the service running (killed on exit by the caller's trap); NAME names the script in errors.

now() { date +%s.%N; }
# Waits until the command given succeeds; gives up (failing the run) after 900 s.
wait_for() { # what command...
  local what="$1" deadline=$((SECONDS + 900))
  shift
  until "$@"; do
    ((SECONDS < deadline)) || { echo "${NAME:-bench}: gave up waiting for $what" >&2; exit 1; }
    sleep 0.05
  done
}
outbox_empty() { [ "$(psql -X -At "$1" -c "SELECT count(*) FROM outbox")" = 0 ]; }
all_applied() { [ "$(psql -X -At "$1" -c "SELECT count(*) FROM processed_messages")" -ge "$EVENTS" ]; }
migrated() { [ "$(psql -X -At "$1" -c "SELECT to_regclass('outbox_published') IS NOT NULL" 2>/dev/null)" = t ]; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# CPU seconds (user + system) a process has used.
cpu_of() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.3f", ($14 + $15) / hz }' "/proc/$1/stat"; }
cpu_sum() { local t=0 p; for p in "$@"; do t=$(awk -v a="$t" -v b="$(cpu_of "$p")" 'BEGIN { print a + b }'); done; echo "$t"; }

# One topology: drain by one relay, then apply by one consumer. Prints
# "relay_rate relay_cpu_us broker_cpu_us consumer_rate consumer_cpu_us broker_cpu_us".
measure() { # name partitions [env for every service...]
  local name="$1" partitions="$2"
  shift 2
  local orders_db="${RUN}_${name}_o" inventory_db="${RUN}_${name}_i"
  psql -X -q "$PG" -c "CREATE DATABASE \"$orders_db\"" -c "CREATE DATABASE \"$inventory_db\"" >/dev/null
  # A stream of its own: each records its number of partitions.
  local env=(REDIS_STREAM="${NAME:-bench}-$name" STREAM_PARTITIONS="$partitions" HTTP_ADDR=127.0.0.1:0 ADMIN_ADDR=127.0.0.1:0 RUST_LOG=warn "$@")
  # Migrated by the relay itself, then loaded.
  env DATABASE_URL="$(db_url "$orders_db")" "${env[@]}" "$RELAY" >/dev/null 2>&1 &
  local migrating=$!
  wait_for "the relay's migrations" migrated "$(db_url "$orders_db")"
  kill -TERM "$migrating"; wait "$migrating" || true
  preload_outbox "$(db_url "$orders_db")" "$EVENTS"
  local broker0 start end relay_pid
  broker0=$(cpu_sum "${broker_pids[@]}")
  start=$(now)
  env DATABASE_URL="$(db_url "$orders_db")" "${env[@]}" "$RELAY" >/dev/null 2>&1 &
  relay_pid=$!
  pids=("$relay_pid")
  wait_for "the relay to drain the outbox ($name)" outbox_empty "$(db_url "$orders_db")"
  end=$(now)
  local relay_cpu broker_cpu
  relay_cpu=$(cpu_of "$relay_pid")
  broker_cpu=$(awk -v a="$(cpu_sum "${broker_pids[@]}")" -v b="$broker0" 'BEGIN { print a - b }')
  kill -TERM "$relay_pid"; wait "$relay_pid" || true
  local relay_rate
  relay_rate=$(awk -v n="$EVENTS" -v s="$start" -v e="$end" 'BEGIN { printf "%.0f", n / (e - s) }')
  # The consumer: migrated, stocked, then timed from its start to the last event applied.
  env DATABASE_URL="$(db_url "$inventory_db")" "${env[@]}" "$CONSUMER" migrate >/dev/null
  psql -X -q "$(db_url "$inventory_db")" -c \
    "INSERT INTO inventory (sku, on_hand) SELECT 'SKU-' || n, 1000000000 FROM generate_series(0, 199) n" >/dev/null
  broker0=$(cpu_sum "${broker_pids[@]}")
  start=$(now)
  env DATABASE_URL="$(db_url "$inventory_db")" CONSUMER_GROUP=bench CONSUMER_NAME=bench-1 "${env[@]}" "$CONSUMER" >/dev/null 2>&1 &
  local consumer_pid=$!
  pids=("$consumer_pid")
  wait_for "the consumer to apply every event ($name)" all_applied "$(db_url "$inventory_db")"
  end=$(now)
  local consumer_cpu consumer_broker
  consumer_cpu=$(cpu_of "$consumer_pid")
  consumer_broker=$(awk -v a="$(cpu_sum "${broker_pids[@]}")" -v b="$broker0" 'BEGIN { print a - b }')
  kill -TERM "$consumer_pid"; wait "$consumer_pid" || true
  pids=()
  local consumer_rate
  consumer_rate=$(awk -v n="$EVENTS" -v s="$start" -v e="$end" 'BEGIN { printf "%.0f", n / (e - s) }')
  us() { awk -v c="$1" -v n="$EVENTS" 'BEGIN { printf "%.1f", c * 1e6 / n }'; }
  echo "$relay_rate $(us "$relay_cpu") $(us "$broker_cpu") $consumer_rate $(us "$consumer_cpu") $(us "$consumer_broker")"
}

