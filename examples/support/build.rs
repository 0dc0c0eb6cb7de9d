//! Compiles `reference.bpf.c` (the benchmarks' minimal redirect) into a
//! skeleton in OUT_DIR, with the clang and include directories that
//! sockmap-fastpath's own build script chose (its `links` metadata), so
//! the library its users depend on never builds it.

use std::env;
use std::path::PathBuf;
use std::process::exit;

use libbpf_cargo::SkeletonBuilder;

const SOURCE: &str = "reference.bpf.c";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    let from_library = |key: &str| {
        env::var_os(format!("DEP_SOCKMAP_FASTPATH_{key}"))
            .unwrap_or_else(|| panic!("sockmap-fastpath's build script sets {key}"))
    };
    let clang = PathBuf::from(from_library("CLANG"));
    let args: Vec<String> = env::split_paths(&from_library("INCLUDE"))
        .map(|dir| format!("-I{}", dir.display()))
        .collect();
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    SkeletonBuilder::new()
        .source(SOURCE)
        .clang(&clang)
        .clang_args(&args)
        .build_and_generate(out.join("reference.skel.rs"))
        .unwrap_or_else(|err| {
            println!(
                "cargo:warning=compiling {SOURCE} with {} failed: {err:#}",
                clang.display()
            );
            exit(1);
        });
}
