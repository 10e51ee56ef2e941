#!/usr/bin/env bash
# Builds the runtime image of deploy/docker/Dockerfile without a Docker engine or
# a registry, then checks it from its filesystem:
#
#   1. base image: `debootstrap --variant=minbase bookworm` -> tar -> `podman import`
#      (the Dockerfile's BASE_IMAGE; cached as a tarball under $WORK)
#   2. `podman build --isolation chroot --pull=never --target runtime` with
#      BINARY_FROM=prebuilt: the binary comes from a build context holding only
#      it, so nothing is compiled here
#   3. the image's config: user 65532:65532, entrypoint /usr/local/bin/tessera
#   4. its layers over the base: exactly the CA bundle, passwd/group and the binary
#   5. `podman image mount` + chroot as user 65532: the image's own
#      /usr/local/bin/tessera runs `--help` with the image's libraries
#
#   deploy/tests/build_image.sh [BINARY]      # default: target/debug/tessera
#   deploy/tests/build_image.sh --cuda LIBDIR BINARY
#
# With --cuda it builds deploy/docker/Dockerfile.cuda the same way from a binary
# built with `--features cuda` and the CUDA libraries in LIBDIR (the `lib` folder of
# tools/install-cuda-toolkit's wheels); the image then also holds those libraries
# under /usr/local/lib/tessera-cuda, and step 5 also checks that the image's binary
# finds them and refuses `--device cuda:0` for want of the NVIDIA driver only (no
# driver or GPU here).
#
# BINARY is any Linux build of tessera; CI passes the target/debug/tessera that
# `cargo test` already built (optimised: [profile.test] opt-level = 3), so the
# image step compiles nothing. Needs root, podman (with buildah's chroot
# isolation), debootstrap, python3, and the Debian mirror (debootstrap, and the
# Dockerfile's ca-certificates install). Environment: WORK (default
# /var/tmp/tessera-image: storage, cache), DEBIAN_MIRROR, STORAGE_DRIVER
# (default overlay; vfs where overlay mounts are not allowed).
set -euo pipefail

repo="$(cd "$(dirname "$0")/../.." && pwd)"
cuda_libs=""
if [ "${1:-}" = --cuda ]; then
  cuda_libs="$(realpath "$2")"
  shift 2
fi
binary="$(realpath "${1:-$repo/target/debug/tessera}")"
work="${WORK:-/var/tmp/tessera-image}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
driver="${STORAGE_DRIVER:-overlay}"
base=localhost/tessera-base:bookworm
image=localhost/tessera:ci
dockerfile="$repo/deploy/docker/Dockerfile"
# The CUDA libraries the cuda image carries (what candle opens at run time).
cuda_files=(libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libnvrtc-builtins.so.13.0)
if [ -n "$cuda_libs" ]; then
  image=localhost/tessera-cuda:ci
  dockerfile="$repo/deploy/docker/Dockerfile.cuda"
fi

podman=(podman --root "$work/storage" --runroot "$work/run" --storage-driver "$driver"
        --events-backend file)

step_start=0
step() {
  step_start=$SECONDS
  echo "== $*"
}
done_step() {
  echo "   done in $((SECONDS - step_start))s"
}
fail() {
  echo "FAIL: $*" >&2
  exit 1
}

[ "$(id -u)" = 0 ] || fail "run as root (debootstrap, podman image mount, chroot)"
[ -x "$binary" ] || fail "no binary at $binary: build one first (cargo test or cargo build)"
for tool in podman debootstrap python3; do
  command -v "$tool" >/dev/null || fail "$tool is not installed"
done
mkdir -p "$work"
total_start=$SECONDS

step "base image: debootstrap --variant=minbase bookworm ($mirror)"
tarball="$work/bookworm-minbase.tar"
if [ -s "$tarball" ]; then
  echo "   cached: $tarball"
else
  rm -rf "$work/rootfs"
  debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log"; fail "debootstrap"; }
  # Package caches do not belong in a base image.
  rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
  tar --numeric-owner -C "$work/rootfs" -cf "$tarball.part" .
  mv "$tarball.part" "$tarball"
  rm -rf "$work/rootfs"
fi
done_step

step "podman import -> $base"
"${podman[@]}" import --quiet "$tarball" "$base" >/dev/null
done_step

step "podman build --isolation chroot --target runtime of $(basename "$dockerfile") (prebuilt $binary)"
context="$(mktemp -d "$work/context.XXXXXX")"
trap 'rm -rf "$context"' EXIT
cp "$binary" "$context/tessera"
extra=()
if [ -n "$cuda_libs" ]; then
  mkdir "$context/cuda-libraries"
  for lib in "${cuda_files[@]}"; do
    cp -L "$cuda_libs/$lib" "$context/cuda-libraries/" || fail "no $lib in $cuda_libs"
  done
  extra=(--build-arg LIBRARIES_FROM=context-libraries --build-arg CUDA_LIBRARIES=cuda-libraries)
fi
"${podman[@]}" build --isolation chroot --pull=never \
  -f "$dockerfile" --target runtime \
  --build-arg BASE_IMAGE="$base" \
  --build-arg BINARY_FROM=prebuilt --build-arg PREBUILT=tessera "${extra[@]}" \
  -t "$image" "$context" >"$work/build.log" 2>&1 \
  || { tail -n 30 "$work/build.log"; fail "podman build (log: $work/build.log)"; }
grep -E '^\[[0-9]+/[0-9]+\] (STEP 1/|COMMIT)' "$work/build.log" | sed 's/^/   /'
done_step

step "image config (podman image inspect)"
config="$("${podman[@]}" image inspect "$image" --format '{{json .Config}}')"
base_layers="$("${podman[@]}" image inspect "$base" --format '{{json .RootFS.Layers}}')"
layers="$("${podman[@]}" image inspect "$image" --format '{{json .RootFS.Layers}}')"
python3 - "$config" "$base_layers" "$layers" <<'PY'
import json, sys
config, base, layers = (json.loads(a) for a in sys.argv[1:])
problems = []
if config.get("User") != "65532:65532":
    problems.append(f"User is {config.get('User')!r}, want '65532:65532' (non-root, numeric)")
if config.get("Entrypoint") != ["/usr/local/bin/tessera"]:
    problems.append(f"Entrypoint is {config.get('Entrypoint')!r}")
if layers[: len(base)] != base:
    problems.append("the image does not start with the base image's layers")
print(f"   User={config.get('User')} Entrypoint={config.get('Entrypoint')} Cmd={config.get('Cmd')}")
print(f"   {len(layers)} layers: {len(base)} of the base + {len(layers) - len(base)} added")
for p in problems:
    print(f"   PROBLEM: {p}")
sys.exit(1 if problems else 0)
PY
done_step

step "files added over the base (podman save, layer contents)"
rm -rf "$work/oci"
"${podman[@]}" save --quiet --format oci-dir -o "$work/oci" "$image" >/dev/null
python3 - "$work/oci" "$(echo "$base_layers" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" \
  "$([ -n "$cuda_libs" ] && echo "${cuda_files[*]}")" <<'PY'
import json, os, sys, tarfile
oci, n_base = sys.argv[1], int(sys.argv[2])
cuda = sys.argv[3].split() if len(sys.argv) > 3 else []
def blob(digest):
    algo, hexd = digest.split(":")
    return os.path.join(oci, "blobs", algo, hexd)
index = json.load(open(os.path.join(oci, "index.json")))
manifest = json.load(open(blob(index["manifests"][0]["digest"])))
allowed = {
    "etc/passwd", "etc/group", "etc/ssl/certs/ca-certificates.crt", "usr/local/bin/tessera",
} | {f"usr/local/lib/tessera-cuda/{lib}" for lib in cuda}
seen, problems = {}, []
for layer in manifest["layers"][n_base:]:
    with tarfile.open(blob(layer["digest"]), "r:*") as tar:
        for m in tar.getmembers():
            name = m.name.lstrip("./").rstrip("/")
            if m.isdir():
                continue
            if name not in allowed or not m.isfile() or ".wh." in name:
                problems.append(f"unexpected {name} ({'file' if m.isfile() else m.type!r})")
            seen[name] = m
missing = allowed - set(seen)
if missing:
    problems.append(f"missing {sorted(missing)}")
binary = seen.get("usr/local/bin/tessera")
if binary and (binary.uid != 0 or binary.mode & 0o7777 != 0o755):
    problems.append(f"usr/local/bin/tessera: uid {binary.uid} mode {oct(binary.mode)}, want root-owned 0755")
for name, m in sorted(seen.items()):
    print(f"   {name}  {m.size:,} bytes  uid {m.uid}  mode {oct(m.mode & 0o7777)}")
for p in problems:
    print(f"   PROBLEM: {p}")
sys.exit(1 if problems else 0)
PY
rm -rf "$work/oci"
done_step

step "the image's tessera runs as user 65532 (podman image mount + chroot)"
root="$("${podman[@]}" image mount "$image")"
unmount() { "${podman[@]}" image unmount "$image" >/dev/null || true; rm -rf "$context"; }
trap unmount EXIT
cmp -s "$binary" "$root/usr/local/bin/tessera" || fail "/usr/local/bin/tessera is not $binary"
grep -q '^tessera:x:65532:65532:' "$root/etc/passwd" || fail "no tessera user (65532) in /etc/passwd"
[ -s "$root/etc/ssl/certs/ca-certificates.crt" ] || fail "empty CA bundle"
help="$(chroot --userspec=65532:65532 "$root" /usr/local/bin/tessera --help)" \
  || fail "/usr/local/bin/tessera --help failed in the image"
for role in gateway vision-worker scheduler expert-worker; do
  grep -q "^  $role " <<<"$help" || fail "tessera --help lists no $role subcommand"
  chroot --userspec=65532:65532 "$root" /usr/local/bin/tessera "$role" --help >/dev/null \
    || fail "tessera $role --help failed in the image"
done
echo "   ${help%%$'\n'*}"
if [ -n "$cuda_libs" ]; then
  # The image's own environment (LD_LIBRARY_PATH) as the container runtime sets it.
  env_args=()
  while IFS= read -r kv; do env_args+=("$kv"); done < <(
    "${podman[@]}" image inspect "$image" --format '{{range .Config.Env}}{{println .}}{{end}}' | sed '/^$/d')
  printf '%s\n' "${env_args[@]}" | grep -q '^LD_LIBRARY_PATH=/usr/local/lib/tessera-cuda$' \
    || fail "the image sets no LD_LIBRARY_PATH=/usr/local/lib/tessera-cuda"
  refusal="$(chroot --userspec=65532:65532 "$root" /usr/bin/env -i "${env_args[@]}" \
    /usr/local/bin/tessera generate --model /nonexistent --prompt hi --device cuda:0 2>&1)" \
    && fail "--device cuda:0 started without a driver"
  grep -q 'the NVIDIA driver is not installed' <<<"$refusal" || fail "unexpected refusal: $refusal"
  grep -q 'cuBLAS\|cuRAND\|NVRTC' <<<"$refusal" \
    && fail "the image's CUDA libraries are not found: $refusal"
  echo "   --device cuda:0 without a driver: ${refusal#error: }"
fi
done_step

size="$("${podman[@]}" image inspect "$image" --format '{{.Size}}')"
echo "PASS: $image ($((size / 1024 / 1024)) MiB) in $((SECONDS - total_start))s"
