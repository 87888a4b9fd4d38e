//! `zoo`: the candle-zoo command line. Each subcommand lives in its own module and only parses
//! arguments, calls the library crates and prints results.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod classify;
mod common;
mod embed;

#[derive(Parser)]
#[command(
    name = "zoo",
    version,
    about = "CLIP, SigLIP, BLIP and Medusa/MTP LLMs on Candle"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Embed images and texts with a CLIP or SigLIP model and score every pair.
    Embed(embed::EmbedArgs),
    /// Zero-shot image classification over a set of labels.
    Classify(classify::ClassifyArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Embed(args) => embed::run(args),
        Command::Classify(args) => classify::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
