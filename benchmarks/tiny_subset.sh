#!/usr/bin/env bash
# A Tiny-ImageNet-200 subset: the first CLASSES classes (sorted wnids) and the first PER_CLASS training images of
# each (sorted names), as hard links (copies across file systems).
#   HOLDOUT=0 (default): val/ = all their official validation images (the retrieval results' data/tiny100).
#   HOLDOUT=k: val/ = the next k training images of each class (a validation split for choosing probes'
#   regularisation and fitting the cascade) and test/ = the official validation images (the comparison of
#   configs/tinyimagenet/cpu_subset.yaml: make tiny-compare).
# usage: benchmarks/tiny_subset.sh TINY_IMAGENET_DIR OUT [CLASSES=100] [PER_CLASS=100] [HOLDOUT=0]
# (TINY_IMAGENET_DIR: the {train,val}/<wnid>/*.JPEG tree that ../shared/datasets/tiny_imagenet.sh builds)
set -eu
[ $# -ge 2 ] || { echo "usage: $0 TINY_IMAGENET_DIR OUT [CLASSES] [PER_CLASS] [HOLDOUT]" >&2; exit 2; }
SRC=$1; OUT=$2; CLASSES=${3:-100}; PER_CLASS=${4:-100}; HOLDOUT=${5:-0}
[ -d "$SRC/train" ] && [ -d "$SRC/val" ] || { echo "$SRC has no train/ and val/ folders" >&2; exit 1; }
link() { ln "$1" "$2" 2>/dev/null || cp "$1" "$2"; }
rm -rf "$OUT"
for wnid in $(ls "$SRC/train" | sort | head -n "$CLASSES"); do
  mkdir -p "$OUT/train/$wnid" "$OUT/val/$wnid"
  files=$(ls "$SRC/train/$wnid" | sort)
  for f in $(echo "$files" | head -n "$PER_CLASS"); do link "$SRC/train/$wnid/$f" "$OUT/train/$wnid/$f"; done
  if [ "$HOLDOUT" -gt 0 ]; then
    for f in $(echo "$files" | tail -n +"$((PER_CLASS + 1))" | head -n "$HOLDOUT"); do
      link "$SRC/train/$wnid/$f" "$OUT/val/$wnid/$f"; done
    official="$OUT/test/$wnid"; mkdir -p "$official"
  else
    official="$OUT/val/$wnid"
  fi
  for f in $(ls "$SRC/val/$wnid" | sort); do link "$SRC/val/$wnid/$f" "$official/$f"; done
done
for split in train val test; do
  [ -d "$OUT/$split" ] && echo "$split: $(ls "$OUT/$split" | wc -l) classes, $(find "$OUT/$split" -type f | wc -l) images"
done
exit 0
