//! One file per command group; this one dispatches and holds what they share: the client,
//! output, and the confirmation an action asks for.

mod audit;
mod dirty;
mod lock;
mod status;
mod token;
mod txn;
mod undo;

use std::io::{BufRead, IsTerminal, Write};

use clap::CommandFactory;
use serde_json::Value;

use crate::args::{Cli, Command, Output};
use crate::client::Client;
use crate::context;
use crate::exit::{Exit, Failure, Result};
use crate::table::Table;

/// What a command prints with.
pub struct Out {
    pub output: Output,
    pub headers: bool,
}

impl Out {
    pub fn json(&self, v: &Value) {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    }

    pub fn table(&self, t: &Table) {
        print!("{}", t.render(self.headers));
    }

    /// The body as JSON, or `table` rendered.
    pub fn either(&self, body: &Value, table: impl FnOnce() -> Table) {
        match self.output {
            Output::Json => self.json(body),
            Output::Table => self.table(&table()),
        }
    }
}

pub async fn run(cli: Cli) -> Result<Exit> {
    let out = Out {
        output: cli.output,
        headers: !cli.no_headers,
    };
    let client = || context::target(&cli).map(|t| Client::new(t, cli.timeout));
    match &cli.command {
        Command::Status => status::status(&client()?, &out).await,
        Command::Whoami => status::whoami(&client()?, &out).await,
        Command::Txn(c) => txn::run(&client()?, &out, c).await,
        Command::Dirty(c) => dirty::run(&client()?, &out, c).await,
        Command::Lock(c) => lock::run(&client()?, &out, c).await,
        Command::Deadlock(c) => lock::deadlocks(&client()?, &out, c).await,
        Command::Audit(c) => audit::run(&client()?, &out, c).await,
        Command::Token(c) => token::run(&client()?, &out, c).await,
        // The coordinator is optional here: without one, orphans are not looked for.
        Command::Undo(c) => undo::run(client().ok(), &out, c).await,
        Command::Completion { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "ferrata", &mut std::io::stdout());
            Ok(Exit::Ok)
        }
    }
}

/// Exit 6 when `--fail-if-any` and something was listed.
pub fn attention(fail_if_any: bool, any: bool) -> Exit {
    if fail_if_any && any { Exit::Attention } else { Exit::Ok }
}

/// Asks for the XID to be typed before an action (what it does was printed on stderr
/// already); without a terminal, refuses: scripts pass `--yes`.
pub fn confirm(xid: &str) -> Result<()> {
    if !std::io::stdin().is_terminal() {
        return Err(Failure::usage(
            "refusing to act without --yes: there is no terminal to confirm on (the dry run above shows what would happen)",
        ));
    }
    eprint!("Type the XID {xid} to go ahead: ");
    std::io::stderr().flush().ok();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).ok();
    if line.trim() == xid {
        Ok(())
    } else {
        Err(Failure::usage("not confirmed; nothing was done"))
    }
}

/// Prints an action's dry run on stderr (stdout stays for the result).
pub fn show_dry_run(what: &str, dry: &Value) {
    eprintln!(
        "{what} would do:\n{}",
        serde_json::to_string_pretty(dry).unwrap_or_default()
    );
}

/// A string field, or `-`.
pub fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A primary key as `col=value,col=value`, the form `--row` takes.
pub fn key_text(key: &Value) -> String {
    key.as_object()
        .map(|k| {
            k.iter()
                .map(|(c, v)| format!("{c}={}", text(v)))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
