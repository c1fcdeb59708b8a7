#!/usr/bin/env bash
# Screenshots of the built documentation in headless Chromium, to look at what a reader sees
# (math rendered, tables readable, navigation). Not run in CI.
#
#   sphinx-build -W --keep-going -b html docs docs/_build/html
#   bash docs/screenshots.sh [OUT_DIR] [PAGE ...]        # default: docs/_build/screenshots, key pages
#   WIDTH=900 HEIGHT=6000 bash docs/screenshots.sh /tmp/shots mixer   # a narrow window, a long page
#
# Needs Debian's chromium (apt-get install chromium). Every host name resolves to nothing, so the
# pages must render from the built files alone: a page whose math shows as raw LaTeX has a
# network dependency.
set -euo pipefail
cd "$(dirname "$0")/.."
html=docs/_build/html
out=${1:-docs/_build/screenshots}
shift || true
pages=("$@")
if [ ${#pages[@]} -eq 0 ]; then
  pages=(index reading-guide lagrangians ham mixer mixer-energy metaformer training oracle api/ham)
fi
[ -f "$html/index.html" ] || { echo "no built site in $html: run sphinx-build first" >&2; exit 1; }
mkdir -p "$out"
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
for page in "${pages[@]}"; do
  file="$PWD/$html/$page.html"
  [ -f "$file" ] || { echo "no page $file" >&2; exit 1; }
  png="$out/$(echo "$page" | tr / -).png"
  chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
    --disable-component-update --no-first-run --user-data-dir="$profile" \
    --host-resolver-rules="MAP * ~NOTFOUND" --hide-scrollbars \
    --window-size="${WIDTH:-1400},${HEIGHT:-2200}" --virtual-time-budget=15000 \
    --screenshot="$png" "file://$file" >/dev/null 2>&1
  echo "$png"
done
