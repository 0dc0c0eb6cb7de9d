//! Compiles `bpf/fastpath.bpf.c` into a libbpf skeleton in OUT_DIR.
//!
//! The compiler is, in order: `$SOCKMAP_FASTPATH_CLANG`, the newest
//! `clang-N` (N >= 19) on PATH, then plain `clang`. The choice and the
//! include directories are passed on as `links` metadata (`clang`,
//! `include`) to the build script of the examples' support crate, which
//! compiles the benchmarks' reference program.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

use libbpf_cargo::SkeletonBuilder;

const CLANG_ENV: &str = "SOCKMAP_FASTPATH_CLANG";
const SOURCE: &str = "bpf/fastpath.bpf.c";
const MIN_VERSIONED_CLANG: u32 = 19;
const MAX_VERSIONED_CLANG: u32 = 40;

fn main() {
    println!("cargo:rerun-if-env-changed={CLANG_ENV}");
    println!("cargo:rerun-if-changed=bpf");

    let clang = find_clang().unwrap_or_else(|| {
        println!(
            "cargo:warning=sockmap-fastpath: no clang found to compile the BPF programs; \
             install one (Debian/Ubuntu: `apt-get install clang-19`, or run scripts/install-deps.sh) \
             or set {CLANG_ENV}=/path/to/clang"
        );
        exit(1);
    });

    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let includes: Vec<PathBuf> = std::iter::once(manifest_dir.join("bpf"))
        .chain(multiarch_include_dir())
        .collect();
    let args: Vec<String> = includes
        .iter()
        .map(|dir| format!("-I{}", dir.display()))
        .collect();

    SkeletonBuilder::new()
        .source(SOURCE)
        .clang(&clang)
        .clang_args(&args)
        .build_and_generate(out.join("fastpath.skel.rs"))
        .unwrap_or_else(|err| {
            println!(
                "cargo:warning=sockmap-fastpath: compiling {SOURCE} with {} failed: {err:#}",
                clang.display()
            );
            exit(1);
        });

    println!("cargo:clang={}", clang.display());
    let includes = env::join_paths(&includes).expect("include directories without ':'");
    println!("cargo:include={}", includes.to_string_lossy());
}

fn find_clang() -> Option<PathBuf> {
    if let Some(path) = env::var_os(CLANG_ENV) {
        return Some(PathBuf::from(path));
    }
    (MIN_VERSIONED_CLANG..=MAX_VERSIONED_CLANG)
        .rev()
        .map(|version| format!("clang-{version}"))
        .chain(std::iter::once("clang".to_owned()))
        .find_map(|name| which(&name))
}

fn which(name: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// `/usr/include/<triple>` holds `asm/types.h` on Debian-style systems;
/// without it the BPF build fails with "'asm/types.h' file not found".
fn multiarch_include_dir() -> Option<PathBuf> {
    let triple = Command::new("gcc")
        .arg("-print-multiarch")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| {
            format!(
                "{}-linux-gnu",
                env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default()
            )
        });
    let dir = Path::new("/usr/include").join(triple);
    dir.is_dir().then_some(dir)
}
