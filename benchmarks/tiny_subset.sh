#!/usr/bin/env bash
# The Tiny-ImageNet-200 subset of the retrieval results: the first CLASSES classes (sorted wnids), the first
# PER_CLASS training images of each (sorted names) and all their official validation images, as hard links.
# usage: benchmarks/tiny_subset.sh TINY_IMAGENET_DIR OUT [CLASSES=100] [PER_CLASS=100]
# (TINY_IMAGENET_DIR: the {train,val}/<wnid>/*.JPEG tree that ../shared/datasets/tiny_imagenet.sh builds)
set -eu
[ $# -ge 2 ] || { echo "usage: $0 TINY_IMAGENET_DIR OUT [CLASSES] [PER_CLASS]" >&2; exit 2; }
SRC=$1; OUT=$2; CLASSES=${3:-100}; PER_CLASS=${4:-100}
[ -d "$SRC/train" ] && [ -d "$SRC/val" ] || { echo "$SRC has no train/ and val/ folders" >&2; exit 1; }
rm -rf "$OUT"
for split in train val; do
  for wnid in $(ls "$SRC/$split" | sort | head -n "$CLASSES"); do
    mkdir -p "$OUT/$split/$wnid"
    files=$(ls "$SRC/$split/$wnid" | sort)
    [ "$split" = train ] && files=$(echo "$files" | head -n "$PER_CLASS")
    for f in $files; do ln "$SRC/$split/$wnid/$f" "$OUT/$split/$wnid/$f" 2>/dev/null || cp "$SRC/$split/$wnid/$f" "$OUT/$split/$wnid/$f"; done
  done
  echo "$split: $(ls "$OUT/$split" | wc -l) classes, $(find "$OUT/$split" -type f | wc -l) images"
done
