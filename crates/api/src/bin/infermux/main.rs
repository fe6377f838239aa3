//! `infermux`: sample from and score with a model on any backend, from the command line.
//!
//! The flags of `sample` and `logprobs` are a stable contract that scripts rely on.

mod args;
mod commands;

use clap::Parser;

fn main() {
    let cli = args::Cli::parse();
    if let Err(err) = commands::run(cli) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
