//! The outbound object; see the crate's documentation.

#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
#[expect(
    unsafe_code,
    reason = "the program reads its context through a raw pointer"
)]
#[path = "../outbound.rs"]
mod outbound;

/// The programs only exist for the BPF target; a host build (`cargo check --workspace`) gets
/// this stub.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
