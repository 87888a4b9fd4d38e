//! `zoo chat`: an interactive chat with an instruct LLM. Each line read from stdin is a user
//! turn; the conversation is rendered by the model's chat template (HF's
//! `apply_chat_template(add_generation_prompt=True)`) and the reply streams to stdout as it
//! decodes. `/reset` starts over (keeping `--system`), `/exit` or end of input stops.

use std::io::{BufRead, Write};

use anyhow::{Context, Result};
use clap::Args;
use zoo_datasets::chat::Message;

use crate::common::LlmArgs;
use crate::generate::DecodingArgs;

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: LlmArgs,
    /// A system turn that opens every conversation.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub decoding: DecodingArgs,
}

pub fn run(args: ChatArgs) -> Result<()> {
    let llm = args.model.load()?;
    let decoder = args.decoding.decoder(&llm)?;
    let template = llm.tokenizer.chat_template()?.with_context(|| {
        format!(
            "{} has no chat template (tokenizer_config.json chat_template or GGUF \
             tokenizer.chat_template): use zoo generate",
            llm.source.describe()
        )
    })?;
    let opening: Vec<Message> = args
        .system
        .iter()
        .map(|s| Message::new("system", s))
        .collect();
    // Refuse a template that cannot render before the first turn is typed.
    template.render(&[opening.clone(), vec![Message::new("user", "hi")]].concat())?;
    let mut messages = opening.clone();
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    let interactive = std::io::IsTerminal::is_terminal(&stdin);
    if interactive {
        eprintln!(
            "chatting with {} (/reset starts over, /exit ends)",
            llm.source.describe()
        );
    }
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("cannot read stdin")?;
        let turn = line.trim();
        match turn {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages = opening.clone();
                if interactive {
                    eprintln!("(a new conversation)");
                }
                continue;
            }
            _ => {}
        }
        messages.push(Message::new("user", turn));
        let prompt = template.encode(&llm.tokenizer, &messages)?;
        let eos = llm.eos();
        let mut reply: Vec<u32> = Vec::new();
        let mut shown = String::new();
        let decoded = decoder.decode(&prompt, &mut |token| {
            if !eos.contains(&token) {
                reply.push(token);
            }
            let text = llm
                .tokenizer
                .inner()
                .decode(&reply, true)
                .map_err(|e| anyhow::anyhow!("cannot decode the reply: {e}"))?;
            // Print once a character is complete, and only text that extends what is shown.
            if !text.ends_with('\u{FFFD}') && text.starts_with(&shown) {
                stdout.write_all(&text.as_bytes()[shown.len()..])?;
                stdout.flush()?;
                shown = text;
            }
            Ok(())
        })?;
        let text = llm
            .tokenizer
            .inner()
            .decode(&reply, true)
            .map_err(|e| anyhow::anyhow!("cannot decode the reply: {e}"))?;
        if let Some(rest) = text.strip_prefix(shown.as_str()) {
            stdout.write_all(rest.as_bytes())?;
        }
        writeln!(stdout)?;
        stdout.flush()?;
        if interactive {
            let new = decoded.row.len() - prompt.len();
            eprintln!(
                "({new} tokens, {:.1} tokens/s)",
                new as f64 / decoded.seconds.max(1e-9)
            );
        }
        messages.push(Message::new("assistant", &text));
    }
    Ok(())
}
