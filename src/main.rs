//! The `retrom3` command line. Every subcommand prints errors as one line on stderr and exits
//! non-zero; progress bars go to stderr, data to files.

mod cli;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    if let Err(e) = cli::run(args) {
        eprintln!("retrom3: error: {e}");
        std::process::exit(1);
    }
}
