#!/usr/bin/env bash
# The base images deploy/docker/Dockerfile builds FROM, made on this machine: no container
# registry is reachable here, only Debian's package mirror (and crates.io, PyPI from the host).
#
#   debian:<release>-slim        a minbase root filesystem from debootstrap, slimmed the way
#                                Debian's official slim images are (no docs, man pages or
#                                locales), imported with `docker import`
#   rust:<rust>-slim-<release>   that image plus gcc and libc6-dev from the mirror and this
#                                machine's own Rust toolchain (rustc, cargo, the std library;
#                                no docs, no other components) under /usr/local/rustup and
#                                /usr/local/cargo, with the environment of the official rust
#                                image (the toolchain layers are kept as
#                                lockstep-ci/rust-toolchain:<version>-slim-<release>); and on
#                                top, the crates Cargo.lock names (`cargo vendor`, run here),
#                                with $CARGO_HOME/config.toml pointing cargo at them: a
#                                container build on this machine cannot fetch from crates.io,
#                                so this stand-in carries the crates instead, and the
#                                Dockerfile stays the one users build.
#
# The tags are the ones the Dockerfile's FROM lines name, read from its ARGs. What is already
# present is left alone, so a rerun costs a second; only a changed Cargo.lock remakes the crates
# layer (the images carry its hash in a label). An image of these names that this script did
# not make (a real one, pulled) is used as it is. The debootstrap tarball is kept in
# $LOCKSTEP_CI_CACHE (default ~/.cache/lockstep-ci), so remaking the images after
# `docker image rm` needs no debootstrap. Images made here carry the label
# lockstep.ci.base-image, which everything built FROM them inherits.
#
# Needs root (debootstrap) and a Rust toolchain installed with rustup whose version is the
# Dockerfile's RUST_VERSION. Installs debootstrap with apt-get when it is missing.
# Knobs: DEBIAN_MIRROR (default http://deb.debian.org/debian), BASE_IMAGES_REBUILD=1 (remove
# the images and the tarball first, and make them again).
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKERFILE=deploy/docker/Dockerfile
CACHE=${LOCKSTEP_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lockstep-ci}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
LABEL=lockstep.ci.base-image

say() { printf '[base-images %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() {
  printf 'base-images: %s\n' "$*" >&2
  exit 1
}

# dockerfile_arg NAME: the default of `ARG NAME=...` in the Dockerfile.
dockerfile_arg() {
  local value
  value=$(sed -n "s/^ARG $1=\(.*\)$/\1/p" "$DOCKERFILE" | head -n 1)
  [ -n "$value" ] || die "$DOCKERFILE has no \`ARG $1=...\` line"
  echo "$value"
}

RELEASE=$(dockerfile_arg DEBIAN_RELEASE)
RUST_MINOR=$(dockerfile_arg RUST_VERSION)
DEBIAN_IMAGE=debian:$RELEASE-slim
RUST_IMAGE=rust:$RUST_MINOR-slim-$RELEASE
TARBALL=$CACHE/debian-$RELEASE-minbase.tar
LOCK_HASH=$(sha256sum Cargo.lock | cut -c1-16)
for from in "$RUST_IMAGE" "$DEBIAN_IMAGE"; do
  # The FROM lines spell these tags with the ARGs; check that they still do.
  grep -q "^FROM ${from%%:*}:" "$DOCKERFILE" || die "$DOCKERFILE no longer builds FROM ${from%%:*}: update this script"
done

present() { docker image inspect "$1" >/dev/null 2>&1; }
label() { docker image inspect -f "{{ index .Config.Labels \"$2\" }}" "$1" 2>/dev/null; }
# The builder is ready when it is present and either not ours or made for this Cargo.lock.
rust_ready() {
  present "$RUST_IMAGE" && { [ -z "$(label "$RUST_IMAGE" "$LABEL")" ] ||
    [ "$(label "$RUST_IMAGE" lockstep.ci.cargo-lock)" = "$LOCK_HASH" ]; }
}

WORK=
cleanup() {
  local rc=$?
  set +e
  [ -z "$WORK" ] || rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "${BASE_IMAGES_REBUILD:-}" = 1 ]; then
  say "BASE_IMAGES_REBUILD=1: removing $RUST_IMAGE, $DEBIAN_IMAGE and $TARBALL"
  docker image rm "$RUST_IMAGE" "$(docker image ls -q lockstep-ci/rust-toolchain)" "$DEBIAN_IMAGE" >/dev/null 2>&1 || true
  rm -f "$TARBALL"
fi

if present "$DEBIAN_IMAGE" && rust_ready; then
  say "$DEBIAN_IMAGE and $RUST_IMAGE are present"
  exit 0
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/lockstep-base-images.XXXXXX")

# --- debian:<release>-slim ----------------------------------------------------------------------
# The root filesystem, debootstrapped once into the cache as a tarball.
make_tarball() {
  local rootfs=$WORK/rootfs
  [ "$(id -u)" -eq 0 ] || die "debootstrap needs root (run as root, or make $TARBALL as root first)"
  if ! command -v debootstrap >/dev/null; then
    say "installing debootstrap with apt-get"
    apt-get update -qq >/dev/null || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null ||
      die "apt-get install debootstrap failed"
  fi
  say "debootstrap --variant=minbase $RELEASE from $MIRROR"
  debootstrap --variant=minbase "$RELEASE" "$rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || {
    tail -n 30 "$WORK/debootstrap.log" >&2
    die "debootstrap failed (log above)"
  }
  # Slim as Debian's official -slim images: dpkg leaves out docs, man pages and locales on every
  # later install too, apt keeps no caches or translations, and what is there now goes.
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  printf 'Acquire::Languages "none";\n' >"$rootfs/etc/apt/apt.conf.d/docker-no-languages"
  printf 'APT::AutoRemove::SuggestsImportant "false";\n' >"$rootfs/etc/apt/apt.conf.d/docker-autoremove-suggests"
  # The mirror's suites of the official image (release, updates, security), in deb822 form.
  rm -f "$rootfs/etc/apt/sources.list"
  cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $RELEASE $RELEASE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: $RELEASE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
  find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
  rm -rf "$rootfs"/usr/share/{man,groff,info,lintian,linda}/* "$rootfs"/var/cache/apt/* \
    "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* "$rootfs"/tmp/*
  # Docker provides these per container.
  rm -f "$rootfs/etc/resolv.conf" "$rootfs/etc/hostname" "$rootfs/etc/machine-id"
  : >"$rootfs/etc/machine-id"
  mkdir -p "$CACHE"
  tar --numeric-owner -C "$rootfs" -cf "$TARBALL.partial" .
  mv "$TARBALL.partial" "$TARBALL"
  rm -rf "$rootfs"
  say "cached $TARBALL ($(du -m "$TARBALL" | cut -f1) MB)"
}

if ! present "$DEBIAN_IMAGE"; then
  [ -f "$TARBALL" ] || make_tarball
  say "docker import $TARBALL as $DEBIAN_IMAGE"
  docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    --change "LABEL $LABEL=debian" \
    --message "debootstrap --variant=minbase $RELEASE (.ci/base-images.sh)" \
    "$TARBALL" "$DEBIAN_IMAGE" >/dev/null
fi

# --- rust:<rust>-slim-<release> -----------------------------------------------------------------
command -v rustup >/dev/null || die "rustup is not on PATH: the builder image copies this machine's rustup toolchain"
version=$(rustc --version | awk '{ print $2 }')
case $version in
  "$RUST_MINOR" | "$RUST_MINOR".*) ;;
  *) die "this machine's rustc is $version, the Dockerfile's RUST_VERSION is $RUST_MINOR: install that toolchain with rustup or change the ARG" ;;
esac
TOOLCHAIN_IMAGE=lockstep-ci/rust-toolchain:$version-slim-$RELEASE

# The `minimal` profile of rustup: rustc (with rustdoc), cargo and the std library for the host,
# plus rustup itself and its proxies, where the official image has them.
make_toolchain_image() {
  local sysroot host toolchain context=$WORK/toolchain bin f proxy
  sysroot=$(rustc --print sysroot)
  host=$(rustc -vV | sed -n 's/^host: //p')
  toolchain=$version-$host
  mkdir -p "$context/rustup/toolchains/$toolchain/bin" "$context/rustup/toolchains/$toolchain/lib/rustlib" \
    "$context/cargo/bin"
  for bin in rustc rustdoc cargo; do
    cp "$sysroot/bin/$bin" "$context/rustup/toolchains/$toolchain/bin/"
  done
  cp -a "$sysroot"/lib/*.so* "$context/rustup/toolchains/$toolchain/lib/"
  cp -a "$sysroot/lib/rustlib/$host" "$context/rustup/toolchains/$toolchain/lib/rustlib/"
  for f in rust-installer-version multirust-channel-manifest.toml multirust-config.toml \
    manifest-rustc-"$host" manifest-cargo-"$host" manifest-rust-std-"$host"; do
    if [ -f "$sysroot/lib/rustlib/$f" ]; then cp "$sysroot/lib/rustlib/$f" "$context/rustup/toolchains/$toolchain/lib/rustlib/"; fi
  done
  printf '%s\n' "rustc-$host" "cargo-$host" "rust-std-$host" >"$context/rustup/toolchains/$toolchain/lib/rustlib/components"
  printf 'version = "12"\ndefault_toolchain = "%s"\nprofile = "minimal"\nauto_self_update = "disable"\n\n[overrides]\n' \
    "$toolchain" >"$context/rustup/settings.toml"
  cp "$(command -v rustup)" "$context/cargo/bin/rustup"
  for proxy in cargo rustc rustdoc; do ln -s rustup "$context/cargo/bin/$proxy"; done
  # Writable by any user, as in the official image; set here, since a chmod in the image would
  # copy every file into a second layer.
  chmod -R a+w "$context/rustup" "$context/cargo"
  cat >"$context/Dockerfile" <<EOF
FROM $DEBIAN_IMAGE
ENV RUSTUP_HOME=/usr/local/rustup \\
    CARGO_HOME=/usr/local/cargo \\
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    RUST_VERSION=$version
RUN apt-get update \\
 && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev wget \\
 && rm -rf /var/lib/apt/lists/*
COPY rustup/ /usr/local/rustup/
COPY cargo/ /usr/local/cargo/
RUN rustup --version && cargo --version && rustc --version
LABEL $LABEL=rust
EOF
  say "building $TOOLCHAIN_IMAGE: $DEBIAN_IMAGE, gcc and libc6-dev, this machine's $toolchain ($(du -sm "$context" | cut -f1) MB)"
  docker build --quiet -t "$TOOLCHAIN_IMAGE" "$context" >"$WORK/toolchain-build.log" 2>&1 || {
    tail -n 30 "$WORK/toolchain-build.log" >&2
    die "building $TOOLCHAIN_IMAGE failed (log above)"
  }
  rm -rf "$context"
}

# The crates of Cargo.lock, vendored on this machine (which reaches crates.io), as a directory
# source that replaces crates.io for every cargo in the image.
make_rust_image() {
  local context=$WORK/crates old
  mkdir -p "$context/cargo"
  say "cargo vendor (Cargo.lock $LOCK_HASH)"
  cargo vendor --locked --quiet "$context/cargo/vendor" >/dev/null 2>"$WORK/vendor.log" || {
    tail -n 30 "$WORK/vendor.log" >&2
    die "cargo vendor failed (log above)"
  }
  chmod -R a+rX "$context/cargo"
  cat >"$context/cargo/config.toml" <<'EOF'
# Made by Lockstep's .ci/base-images.sh: crates.io is not reachable from container builds on
# the machine that made this image, so cargo takes the crates from the vendored copy.
[source.crates-io]
replace-with = "vendored-sources"

[source.vendored-sources]
directory = "/usr/local/cargo/vendor"
EOF
  cat >"$context/Dockerfile" <<EOF
FROM $TOOLCHAIN_IMAGE
COPY cargo/ /usr/local/cargo/
LABEL lockstep.ci.cargo-lock=$LOCK_HASH
EOF
  old=$(docker image inspect -f '{{.Id}}' "$RUST_IMAGE" 2>/dev/null || true)
  say "building $RUST_IMAGE: $TOOLCHAIN_IMAGE and $(find "$context/cargo/vendor" -mindepth 1 -maxdepth 1 | wc -l) vendored crates ($(du -sm "$context" | cut -f1) MB)"
  docker build --quiet -t "$RUST_IMAGE" "$context" >"$WORK/rust-build.log" 2>&1 || {
    tail -n 30 "$WORK/rust-build.log" >&2
    die "building $RUST_IMAGE failed (log above)"
  }
  rm -rf "$context"
  # The image for the previous Cargo.lock, unless builds still use it as their base (those go
  # with the dangling builds that deploy-tests.sh prunes).
  if [ -n "$old" ] && [ "$old" != "$(docker image inspect -f '{{.Id}}' "$RUST_IMAGE")" ]; then
    docker image rm "$old" >/dev/null 2>&1 || true
  fi
}

if ! rust_ready; then
  present "$TOOLCHAIN_IMAGE" || make_toolchain_image
  make_rust_image
fi

size() { docker image inspect -f '{{.Size}}' "$1" | awk '{ printf "%.0f MB", $1 / 1e6 }'; }
say "$DEBIAN_IMAGE: $(size "$DEBIAN_IMAGE"), $RUST_IMAGE: $(size "$RUST_IMAGE")"
