//! `ambit-cni`: run by the container runtime with `CNI_*` variables and the network
//! configuration on stdin; the result or error goes to stdout.

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let outcome = ambit_cni::run(|name| std::env::var_os(name), std::io::stdin().lock());
    let mut stdout = std::io::stdout().lock();
    if !outcome.stdout.is_empty() && writeln!(stdout, "{}", outcome.stdout).is_err() {
        return ExitCode::FAILURE;
    }
    ExitCode::from(outcome.exit_code)
}
