//! Builds the eBPF programs (`ebpf/`, crate `ambit-ebpf`, whose binaries are the objects
//! `ambit-inbound` and `ambit-outbound`) with the nightly toolchain that
//! `ebpf/rust-toolchain.toml` pins and bpf-linker, for `src/capture/ebpf.rs` to embed. Without
//! that toolchain the agent is built with no programs: it says so when eBPF capture is asked
//! for, and `--redirect auto` falls back to nftables.

use std::path::Path;
use std::process::Command;

const PACKAGE: &str = "ambit-ebpf";
const OBJECTS: [&str; 2] = ["ambit-inbound", "ambit-outbound"];

fn main() -> aya_build::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = Path::new(&manifest_dir).join("../ebpf");
    let toolchain_file = ebpf_dir.join("rust-toolchain.toml");
    println!(
        "cargo:rerun-if-changed={}",
        ebpf_dir.join("common").display()
    );
    println!("cargo:rerun-if-changed={}", toolchain_file.display());
    // Rebuilt when bpf-linker changes, or appears where `cargo install` puts it.
    let cargo_bin = std::env::var("CARGO_HOME")
        .map(|home| Path::new(&home).join("bin"))
        .or_else(|_| std::env::var("HOME").map(|home| Path::new(&home).join(".cargo/bin")))?;
    println!("cargo:rerun-if-changed={}", cargo_bin.display());

    let toolchain = pinned_toolchain(&toolchain_file)?;
    if let Some(missing) = missing_toolchain(&toolchain) {
        println!(
            "cargo:warning=building ambit without its eBPF programs: {missing}; run scripts/install-ebpf-toolchain"
        );
        let out_dir = std::env::var("OUT_DIR")?;
        for object in OBJECTS {
            std::fs::write(Path::new(&out_dir).join(object), [])?;
        }
        return Ok(());
    }
    let root_dir = ebpf_dir.to_string_lossy().into_owned();
    let package = aya_build::Package {
        name: PACKAGE,
        root_dir: &root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&toolchain))
}

/// The `channel` of the programs' `rust-toolchain.toml`.
fn pinned_toolchain(file: &Path) -> aya_build::Result<String> {
    let text = std::fs::read_to_string(file)?;
    text.lines()
        .find_map(|line| line.strip_prefix("channel = "))
        .map(|channel| channel.trim_matches('"').to_owned())
        .ok_or_else(|| std::io::Error::other(format!("{} names no channel", file.display())).into())
}

/// What of the eBPF toolchain is missing, if anything.
fn missing_toolchain(toolchain: &str) -> Option<String> {
    let runs = |command: &mut Command| command.output().is_ok_and(|o| o.status.success());
    if !runs(Command::new("bpf-linker").arg("--version")) {
        return Some("bpf-linker is not on PATH".to_owned());
    }
    let sysroot = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    match sysroot {
        None => Some(format!("the {toolchain} toolchain is not installed")),
        Some(sysroot)
            if !Path::new(&sysroot)
                .join("lib/rustlib/src/rust/library")
                .exists() =>
        {
            Some(format!("the {toolchain} toolchain has no rust-src"))
        }
        Some(_) => None,
    }
}
