//! The benchmarks' minimal reference redirect (`reference.bpf.c`): what a
//! sockmap redirect costs without this crate's safety checks. Never use it
//! for real traffic (see the C file's header).

#![allow(
    clippy::all,
    missing_docs,
    unsafe_code,
    unsafe_op_in_unsafe_fn,
    unused_imports
)]

include!(concat!(env!("OUT_DIR"), "/reference.skel.rs"));
