//! `zoo`: the candle-zoo command line. Each subcommand lives in its own module and only parses
//! arguments, calls the library crates and prints results.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod capfilt;
mod caption;
mod classify;
mod common;
mod demo;
mod embed;
mod eval;
mod matching;
mod train;

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
    /// Caption images with BLIP: greedy, beam search or nucleus sampling.
    Caption(caption::CaptionArgs),
    /// Score image-text pairs with BLIP: ITM probability and ITC cosine.
    Match(matching::MatchArgs),
    /// Train a model: `zoo train clip|siglip`.
    Train(Box<train::TrainArgs>),
    /// Evaluate a model: `zoo eval zeroshot|retrieval|caption`.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Bootstrap noisy web pairs with BLIP's CapFilt: synthetic captions, then an ITM filter.
    Capfilt(Box<capfilt::CapfiltArgs>),
    /// Train a tiny CLIP on synthetic shapes and evaluate it zero-shot, offline.
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Embed(args) => embed::run(args),
        Command::Classify(args) => classify::run(args),
        Command::Caption(args) => caption::run(args),
        Command::Match(args) => matching::run(args),
        Command::Train(args) => train::run_train(*args),
        Command::Eval(cmd) => eval::run(cmd),
        Command::Capfilt(args) => capfilt::run_capfilt(*args),
        Command::Demo(args) => demo::run_demo(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
