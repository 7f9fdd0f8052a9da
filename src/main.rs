//! `taproot` binary: see `taproot --help`.

use clap::Parser;

fn main() {
    let cli = taproot::cli::Cli::parse();
    if let Err(e) = taproot::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
