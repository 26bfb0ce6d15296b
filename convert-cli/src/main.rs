//! `vdconv`: convert, inspect and check VHD, VHDX, qcow2 and raw disk images.
//!
//! The binary is thin: it parses arguments, calls `vdisk`, prints and exits. See
//! [`ExitCode`](crate::exit::Code) for the documented exit codes.

mod args;
mod commands;
mod exit;
mod progress;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = args::Cli::parse();
    let cancel = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // Without the handler Ctrl-C still stops the process; the engine then cannot clean up
        // its temporary file, so say so rather than fail.
        if signal_hook::flag::register(sig, Arc::clone(&cancel)).is_err() {
            eprintln!("vdconv: warning: cannot install the interrupt handler");
        }
    }
    // A write past a file-size limit (ulimit -f) must fail with EFBIG so the temporary output is
    // removed, not kill the process: the flag handler replaces the default action.
    let xfsz = Arc::new(AtomicBool::new(false));
    let _ = signal_hook::flag::register(signal_hook::consts::SIGXFSZ, xfsz);
    let code = commands::run(cli, &cancel);
    std::process::ExitCode::from(code as u8)
}
