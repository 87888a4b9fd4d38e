//! `zoo`: the candle-zoo command line. Each subcommand lives in its own module and only parses
//! arguments, calls the library crates and prints results.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// `println!` that returns the write's error instead of panicking on it, so that a closed
/// stdout (`zoo ... | head -1`) ends the command quietly (see [`is_broken_pipe`]).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*)
    }};
}

mod bench;
mod capfilt;
mod caption;
mod chat;
mod classify;
mod common;
mod demo;
mod embed;
mod eval;
mod flags;
mod generate;
mod matching;
mod memory;
mod train;

#[derive(Parser)]
#[command(
    name = "zoo",
    version,
    about = "CLIP, SigLIP, BLIP and Medusa/MTP LLMs on Candle"
)]
struct Cli {
    /// Attention backend for every model: `naive` (matmuls and a softmax, the N×N scores in
    /// memory), `fused` (tiled online-softmax kernel on the CPU with its own backward; Metal
    /// inference takes candle's sdpa), or `auto`, fused where `zoo bench attention` measured it
    /// faster.
    #[arg(long, global = true, default_value = "auto", value_parser = parse_backend)]
    attention: zoo_models::layers::AttentionBackend,
    #[command(subcommand)]
    command: Command,
}

fn parse_backend(s: &str) -> Result<zoo_models::layers::AttentionBackend, String> {
    s.parse()
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
    /// Generate text with a Llama-architecture LLM (HF checkpoint or GGUF).
    Generate(generate::GenerateArgs),
    /// Chat with an instruct LLM: its chat template, streamed replies, `/reset`.
    Chat(chat::ChatArgs),
    /// Benchmarks: `zoo bench embed|train-step|caption|generate|attention`, JSON and a table.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Train a model: `zoo train clip|siglip|blip`.
    Train(Box<train::TrainArgs>),
    /// Evaluate a model: `zoo eval zeroshot|retrieval|caption|lm`.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Bootstrap noisy web pairs with BLIP's CapFilt: synthetic captions, then an ITM filter.
    Capfilt(Box<capfilt::CapfiltArgs>),
    /// Train a tiny CLIP on synthetic shapes and evaluate it zero-shot, offline; `zoo demo
    /// caption`: train a tiny BLIP captioner and score its captions of held-out images.
    Demo(demo::DemoArgs),
}

/// mimalloc instead of the system allocator. glibc serves every allocation above its mmap
/// threshold (at most 32 MiB by default) with a fresh `mmap`, so a large activation, such as
/// BLIP's `[32, 16, 30524]` logits, is page-faulted in anew at every training step; with glibc,
/// `zoo demo caption` spent more time in the kernel than computing.
/// Wrapped to count peak memory while `zoo bench` measures it (see [`memory`]).
#[global_allocator]
static GLOBAL: memory::Tracking<mimalloc::MiMalloc> = memory::Tracking(mimalloc::MiMalloc);

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory for reuse instead of returning it to the OS after 10 ms (mimalloc's
/// default), so the same large buffers serve every step instead of being faulted in again. The
/// process holds on to its peak memory until it exits. Measured on `zoo demo caption --steps
/// 40` (2 cores): glibc 29 s wall (25 s in the kernel), mimalloc 17 s, this 13-15 s.
fn tune_allocator() {
    // SAFETY: sets a process-wide mimalloc option; no memory is touched.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// Fixes the CPU thread count once. Candle asks for it at every matmul and, unless
/// `RAYON_NUM_THREADS` is set, counts physical cores by reading `/proc/cpuinfo` each time
/// (`num_cpus::get_physical`): a fifth of the run time of `zoo bench generate` on a small LM
/// was spent formatting and parsing that file.
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        // Runs first in main, before any other thread exists.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
}

/// Runs `f` on a thread of the compute pool, the pool every parallel op of the command then
/// uses. Called from outside a pool, each parallel op would hand its work to the pool and put
/// the calling thread to sleep until it is done: a sleep and a wake-up per op, hundreds per
/// token when decoding, and a third thread on two cores. From inside, the caller takes part in
/// the op's work. The stack is as large as the main thread's would be.
fn on_compute_threads<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    let threads = candle_core::utils::get_num_threads();
    match rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .stack_size(MAIN_STACK_BYTES)
        .build()
    {
        Ok(pool) => pool.install(f),
        // No threads to be had: run here, with the global pool behind the ops.
        Err(_) => f(),
    }
}

/// The main thread's stack on Linux (8 MiB), for the thread a command runs on.
const MAIN_STACK_BYTES: usize = 8 << 20;

/// Whether `e` comes from writing to a pipe whose reader has closed it.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn main() -> ExitCode {
    tune_allocator();
    pin_thread_count();
    let cli = Cli::parse();
    zoo_models::layers::set_attention_backend(cli.attention);
    let result = on_compute_threads(move || match cli.command {
        Command::Embed(args) => embed::run(args),
        Command::Classify(args) => classify::run(args),
        Command::Caption(args) => caption::run(args),
        Command::Match(args) => matching::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Train(args) => train::run_train(*args),
        Command::Eval(cmd) => eval::run(cmd),
        Command::Capfilt(args) => capfilt::run_capfilt(*args),
        Command::Demo(args) => demo::run_demo(args),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away: nothing is left to say, as ripgrep and other Unix filters do.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
