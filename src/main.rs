//! `taproot` binary: see `taproot --help`.

use clap::Parser;

fn main() {
    let cli = taproot::cli::Cli::parse();
    if let Err(e) = taproot::cli::run(cli) {
        let t = taproot::dist::topology();
        let rank = t.rank();
        if t.size() > 1 {
            eprintln!("error (rank {rank}): {e:#}");
            // The other ranks may be waiting in a collective: stop them all.
            taproot::dist::abort(1);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    taproot::dist::finalize();
}
