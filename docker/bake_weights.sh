#!/bin/sh
# Put torchvision's ResNet-18 ImageNet weights into an image at build time, so that no worker
# downloads anything at run time (imgsim looks in $TORCH_HOME/hub/checkpoints/).
#
#   imgsim-bake-weights DEST_DIR [URL] [LOCAL_DIR]
#
# As torchvision does: the file keeps the name of the URL's last path segment (default
# resnet18-f37072fd.pth) and its sha256 must start with the hex prefix in that name
# (torch.hub's check_hash). LOCAL_DIR/<name> is used when present (offline builds: put the file
# into docker/weights/); else URL is downloaded (resuming a partial download, 3 attempts);
# with neither, nothing is baked and the image can only run IMGSIM_BACKBONE=efficientnet_lite0
# (whose weights ship in its pip package). A file with the wrong hash is never kept.
set -eu
dest="$1"
url="${2:-}"
local_dir="${3:-}"
name=resnet18-f37072fd.pth
if [ -n "$url" ]; then
    name="$(basename "${url%%[?#]*}")"
fi
prefix="$(printf '%s\n' "$name" | sed -n 's/^[^.]*-\([0-9a-f][0-9a-f]*\)\..*$/\1/p')"
if [ -z "$prefix" ]; then
    echo "imgsim: $name carries no sha256 prefix (torchvision's name-<sha256 prefix>.pth);" \
         "cannot check it" >&2
    exit 1
fi

mkdir -p "$dest"
if [ -n "$local_dir" ] && [ -f "$local_dir/$name" ]; then
    echo "imgsim: baking $name from the build context"
    cp "$local_dir/$name" "$dest/$name.part"
elif [ -n "$url" ]; then
    echo "imgsim: baking $name from $url"
    python3 - "$url" "$dest/$name.part" <<'PY'
import os, sys, time, urllib.error, urllib.request
url, part = sys.argv[1], sys.argv[2]
for attempt in range(3):
    have = os.path.getsize(part) if os.path.exists(part) else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            mode = "ab" if have and resp.status == 206 else "wb"
            with open(part, mode) as out:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
        sys.exit(0)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:       # already complete
            sys.exit(0)
        if exc.code < 500:
            sys.exit(f"imgsim: {url}: HTTP {exc.code} {exc.reason}")
        err = exc
    except (OSError, urllib.error.URLError) as exc:
        err = exc
    print(f"imgsim: attempt {attempt + 1} of 3 failed: {err}", file=sys.stderr)
    time.sleep(2 * (attempt + 1))
sys.exit(f"imgsim: could not download {url}: {err}")
PY
else
    echo "imgsim: no ResNet-18 weights baked (RESNET18_WEIGHTS_URL is empty and docker/weights/$name"
    echo "        is absent); set IMGSIM_BACKBONE=efficientnet_lite0 or mount the file at run time"
    exit 0
fi
got="$(sha256sum "$dest/$name.part" | cut -c1-${#prefix})"
if [ "$got" != "$prefix" ]; then
    echo "imgsim: $name has sha256 $got..., expected $prefix...: not the torchvision file" >&2
    rm -f "$dest/$name.part"
    exit 1
fi
mv "$dest/$name.part" "$dest/$name"
echo "imgsim: baked $dest/$name (sha256 $prefix... checked)"
