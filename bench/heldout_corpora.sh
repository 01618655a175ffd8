#!/usr/bin/env bash
# Builds the text corpora the lens experiments of BENCHMARKS.md read, from files a Debian machine
# with Node.js has, so that every session measures on the same texts:
#   data/corpus_licenses: ten licences of /usr/share/common-licenses (legal prose; held out)
#   data/corpus_js:       the .js files of npm's own source (code with comments; held out)
#   data/corpus_pysrc:    the Python standard library's own source, tests left out (code with
#                         docstrings; a training genre, never an eval's held-out one)
#   data/corpus_changelog: the Debian changelogs of the installed packages (terse release notes
#                         full of versions, dates and names; held out, and read only to check a
#                         lens chosen on the other genres; its texts depend on what is installed)
# The vim manual is read in place (corpus=/usr/share/vim/vim90/doc holds .txt files already).
# Usage: bash bench/heldout_corpora.sh [DATA_DIR]   (default data)
set -euo pipefail
out="${1:-data}"
licences=(Apache-2.0 Artistic BSD CC0-1.0 GFDL-1.3 GPL-2 GPL-3 LGPL-2.1 LGPL-3 MPL-2.0)
npm=/usr/lib/node_modules/npm

for f in "${licences[@]}"; do
  [ -f "/usr/share/common-licenses/$f" ] || { echo "missing /usr/share/common-licenses/$f" >&2; exit 2; }
done
[ -d "$npm" ] || { echo "missing $npm: install Debian's npm (or Node.js with npm) first" >&2; exit 2; }
[ -n "$(find /usr/share/doc -mindepth 2 -maxdepth 2 -name changelog.Debian.gz -type f -print -quit)" ] || {
  echo "no /usr/share/doc/*/changelog.Debian.gz: this image strips Debian's docs; install a package's docs first" >&2
  exit 2
}

# Built in a temporary folder and moved into place, so an interrupted run leaves nothing half-written.
tmp=""
trap '[ -n "$tmp" ] && rm -rf "$tmp"' EXIT
build() {
  local name=$1
  tmp=$(mktemp -d "$out/.$name.XXXXXX")
  "$2" "$tmp"
  rm -rf "${out:?}/$name"
  mv "$tmp" "$out/$name"
  tmp=""
  echo "$out/$name: $(find "$out/$name" -type f | wc -l) files, $(cat "$out/$name"/* | wc -w) words"
}
licences_into() { for f in "${licences[@]}"; do cp "/usr/share/common-licenses/$f" "$1/$f.txt"; done; }
# One .txt per .js file, named by its path under npm's folder ("/" read as "__"), in C-locale order.
js_into() {
  (cd "$npm" && LC_ALL=C find . -name '*.js' -type f | LC_ALL=C sort) | while read -r rel; do
    rel=${rel#./}
    cp "$npm/$rel" "$1/${rel//\//__}.txt"
  done
}
# The standard library of $PYTHON (default .venv/bin/python, whose stdlib `corpus=pydoc` reads),
# each .py file outside test folders as one .txt, named by its path ("/" read as "__").
pysrc_into() {
  local root
  root=$("${PYTHON:-.venv/bin/python}" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
  (cd "$root" && LC_ALL=C find . -name '*.py' -type f \
    -not -path '*/test/*' -not -path '*/tests/*' -not -path '*/idle_test/*' \
    -not -path '*/site-packages/*' -not -path '*/dist-packages/*' | LC_ALL=C sort) |
    while read -r rel; do
      rel=${rel#./}
      cp "$root/$rel" "$1/${rel//\//__}.txt"
    done
}

# Each /usr/share/doc/*/changelog.Debian.gz, unpacked, as PACKAGE.txt, in C-locale order.
changelog_into() {
  local f pkg
  LC_ALL=C find /usr/share/doc -mindepth 2 -maxdepth 2 -name changelog.Debian.gz -type f |
    LC_ALL=C sort |
    while read -r f; do
      pkg=${f#/usr/share/doc/}
      zcat "$f" > "$1/${pkg%%/*}.txt"
    done
}

mkdir -p "$out"
build corpus_licenses licences_into
build corpus_js js_into
build corpus_pysrc pysrc_into
build corpus_changelog changelog_into
