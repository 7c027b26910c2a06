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
