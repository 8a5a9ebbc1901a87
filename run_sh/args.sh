# Sourced by the run_sh scripts: their arguments in any order.
#
# The caller sets `usage` (e.g. "DATA_DIR [BASE_DIR] [--reduced]"), `options` (the
# options it takes, e.g. "--reduced"; empty: none) and `max_positional`, then sources this
# file. It sets `reduced` ("--reduced" or "") and `positional` (the other arguments, in
# order); with no positional argument at all, DATA_DIR is $ROBUST_SPARSE_DATA_DIR when set.
# A bad option or too many arguments ends the script with one line and status 2.
reduced=""
positional=()
for arg in "$@"; do
  case "$arg" in
    -h|--help)
      echo "usage: $0 $usage"
      exit 0 ;;
    -*)
      if [ "$arg" = "--reduced" ] && [[ " ${options:-} " == *" --reduced "* ]]; then
        reduced="--reduced"
      else
        echo "error: $0: unknown option $arg (usage: $0 $usage)" >&2
        exit 2
      fi ;;
    *) positional+=("$arg") ;;
  esac
done
if [ "${#positional[@]}" -gt "$max_positional" ]; then
  echo "error: $0: too many arguments: $* (usage: $0 $usage)" >&2
  exit 2
fi
if [ "${#positional[@]}" -eq 0 ] && [ -n "${ROBUST_SPARSE_DATA_DIR:-}" ]; then
  positional=("$ROBUST_SPARSE_DATA_DIR")
fi
if [ "${#positional[@]}" -eq 0 ]; then
  echo "error: $0: give DATA_DIR or set ROBUST_SPARSE_DATA_DIR (usage: $0 $usage)" >&2
  exit 2
fi
