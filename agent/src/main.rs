use std::process::ExitCode;

use ambit_agent::Cli;
use clap::Parser;

// glibc's allocator keeps freed memory from many short-lived connections; jemalloc returns it.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, which it reads before `main`: a thread of its own returns freed pages to
/// the kernel a second after they are freed, so that bursts (enrolling pods, loading programs,
/// many connections at once) do not stay resident. One thread for every arena: by default
/// jemalloc starts up to four as arenas fill, each waking up on its own. Straight to
/// `MADV_DONTNEED`: pages released with `MADV_FREE` would still count as resident until the
/// kernel needs them.
#[expect(
    unsafe_code,
    reason = "jemalloc finds its options by this symbol's name"
)]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: Option<&u8> = Some(
    &b"background_thread:true,max_background_threads:1,dirty_decay_ms:1000,muzzy_decay_ms:0\0"[0],
);

fn main() -> ExitCode {
    Cli::parse().run()
}
