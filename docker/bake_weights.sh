#!/bin/sh
# Put torchvision's ResNet-18 ImageNet weights into an image at build time, so that no worker
# downloads anything at run time (imgsim looks in $TORCH_HOME/hub/checkpoints/).
#
#   imgsim-bake-weights DEST_DIR [URL] [LOCAL_DIR]
#
# LOCAL_DIR/resnet18-f37072fd.pth is used when present (offline builds: put the file into
# docker/weights/); else URL is downloaded; with neither, nothing is baked and the image can
# only run IMGSIM_BACKBONE=efficientnet_lite0 (whose weights ship in its pip package).
# torchvision names the file after the first 8 hex digits of its sha256; that is checked.
set -eu
dest="$1"
url="${2:-}"
local_dir="${3:-}"
name=resnet18-f37072fd.pth
prefix=f37072fd

mkdir -p "$dest"
if [ -n "$local_dir" ] && [ -f "$local_dir/$name" ]; then
    echo "imgsim: baking $name from the build context"
    cp "$local_dir/$name" "$dest/$name.part"
elif [ -n "$url" ]; then
    echo "imgsim: baking $name from $url"
    python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
        "$url" "$dest/$name.part"
else
    echo "imgsim: no ResNet-18 weights baked (RESNET18_WEIGHTS_URL is empty and docker/weights/$name"
    echo "        is absent); set IMGSIM_BACKBONE=efficientnet_lite0 or mount the file at run time"
    exit 0
fi
got="$(sha256sum "$dest/$name.part" | cut -c1-8)"
if [ "$got" != "$prefix" ]; then
    echo "imgsim: $name has sha256 $got..., expected $prefix...: not the torchvision file" >&2
    rm -f "$dest/$name.part"
    exit 1
fi
mv "$dest/$name.part" "$dest/$name"
