# Shell helpers the bench scripts share. Source it after setting PG (a Postgres URL).

# The URL of database $1 on the server of $PG.
db_url() { echo "${PG%/*}/$1"; }

# The median of the numbers given (integers: the lower-middle mean for an even count).
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : int((v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }

# The median of the ratios given (`$1`: its printf format, e.g. "%.2f"; the rest: the ratios).
median_ratio() {
  local format=$1
  shift
  printf '%s\n' "$@" | sort -g | awk -v f="$format" '{ v[NR] = $1 } END { printf f, (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# Loads `$2` outbox rows shaped like real events into the database at URL `$1`: 4 events per
# order (created, confirmed, cancelled twice), interleaved, ids growing with seq.
preload_outbox() {
  local url="$1" events="$2"
  psql -X -q "$url" >/dev/null <<SQL
INSERT INTO outbox (event_id, aggregate_type, aggregate_id, seq, event_type, payload, occurred_at, traceparent)
SELECT '01JBENCH' || lpad(g::text, 18, '0'), 'order', '01JBENCHAGGR' || lpad((g % o)::text, 14, '0'), g / o + 1,
       (ARRAY['OrderCreated', 'OrderConfirmed', 'OrderCancelled', 'OrderCancelled'])[g / o + 1],
       CASE WHEN g / o = 0 THEN jsonb_build_object('order_id', '01JBENCHAGGR' || lpad((g % o)::text, 14, '0'),
              'customer_id', 'c-' || (g % 977),
              'items', jsonb_build_array(jsonb_build_object('sku', 'SKU-' || (g % 200), 'quantity', 2, 'unit_price_cents', 1250)),
              'total_cents', 2500)
            ELSE jsonb_build_object('order_id', '01JBENCHAGGR' || lpad((g % o)::text, 14, '0')) END,
       now(), '00-' || md5(g::text) || '-' || substr(md5(g::text), 1, 16) || '-01'
FROM generate_series(0, $events - 1) AS g, (SELECT ($events + 3) / 4 AS o) AS orders;
VACUUM ANALYZE outbox;
SQL
}
