use std::process::ExitCode;

use ambit_agent::Cli;
use clap::Parser;

// glibc's allocator keeps freed memory from many short-lived connections; jemalloc returns it.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    Cli::parse().run()
}
