#!/usr/bin/env bash
# Oxford Flowers-102 for the deep-metric-learning protocol: train on classes 1-51, retrieve among the unseen
# classes 52-102 (all images of each class, the official train/val/test split ignored), as hard links.
#   OUT/train/<001..051>/*.jpg   OUT/test/<052..102>/*.jpg
# usage: benchmarks/flowers_dml_split.sh FLOWERS_DIR OUT
# (FLOWERS_DIR: the {train,val,test}/<label>/ tree that ../shared/datasets/flowers102.sh builds)
set -eu
[ $# -eq 2 ] || { echo "usage: $0 FLOWERS_DIR OUT" >&2; exit 2; }
SRC=$1; OUT=$2
for s in train val test; do [ -d "$SRC/$s" ] || { echo "$SRC has no $s/ folder" >&2; exit 1; }; done
link() { ln "$1" "$2" 2>/dev/null || cp "$1" "$2"; }
rm -rf "$OUT"
for s in train val test; do
  for d in "$SRC/$s"/*/; do
    label=$(basename "$d")
    if [ "$((10#$label))" -le 51 ]; then split=train; else split=test; fi
    mkdir -p "$OUT/$split/$label"
    for f in "$d"*; do link "$f" "$OUT/$split/$label/$(basename "$f")"; done
  done
done
for split in train test; do echo "$split: $(ls "$OUT/$split" | wc -l) classes, $(find "$OUT/$split" -type f | wc -l) images"; done
