//! The `retrom3` command line. Every subcommand prints errors as one line on stderr and exits
//! non-zero; progress bars go to stderr, data to files.

mod cli;

use clap::Parser;

fn main() {
    // The tokenizers crate panics on some malformed tokenizer.json files; the library catches
    // those panics and returns an error naming the file, so their default report (a second,
    // multi-line message) is left out here. Any other panic is a bug and is reported in one line.
    std::panic::set_hook(Box::new(|info| {
        let from_tokenizers = info
            .location()
            .is_some_and(|l| l.file().contains("/tokenizers-"));
        if !from_tokenizers {
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let at = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            eprintln!("retrom3: internal error (a bug, please report it): {msg}{at}");
        }
    }));
    let args = cli::Cli::parse();
    if let Err(e) = cli::run(args) {
        eprintln!("retrom3: error: {e}");
        std::process::exit(1);
    }
}
