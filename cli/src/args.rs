//! The commands and flags. Conventions of kubectl and etcdctl: `-o table|json` (json is the
//! API's body), the coordinator from `--server`, `FERRATA_SERVER` or the config file's
//! context, a token only from a file or `FERRATA_TOKEN` (never a flag value: it would land in
//! shell history), `--reason` on every action, `--dry-run` and `--yes`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "ferrata",
    version,
    about = "Inspect and repair Ferrata's global transactions",
    after_help = "Exit codes: 0 ok, 1 error, 2 usage, 3 precondition failed, 4 not found, 5 unauthenticated or forbidden, \
                  6 attention needed (--fail-if-any)."
)]
pub struct Cli {
    /// The coordinator's HTTP address, e.g. http://127.0.0.1:7091 [env: FERRATA_SERVER].
    #[arg(long, global = true, env = "FERRATA_SERVER")]
    pub server: Option<String>,
    /// A file holding the token [env: FERRATA_TOKEN_FILE; FERRATA_TOKEN holds the token itself].
    #[arg(long, global = true, env = "FERRATA_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// A context of the config file ($XDG_CONFIG_HOME/ferrata/config.toml) [env: FERRATA_CONTEXT].
    #[arg(long, global = true, env = "FERRATA_CONTEXT")]
    pub context: Option<String>,
    /// PEM CA certificates to verify an https server.
    #[arg(long, global = true)]
    pub ca_cert: Option<PathBuf>,
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Leave out the header line of tables.
    #[arg(long, global = true)]
    pub no_headers: bool,
    /// How long one request may take: 500ms, 30s, 2m.
    #[arg(long, global = true, default_value = "30s", value_parser = duration)]
    pub timeout: Duration,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    /// The API's JSON body, unchanged.
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The coordinator's health, and who you are to it.
    Status,
    /// The token you use: its name, role and what it may do.
    Whoami,
    /// Global transactions.
    #[command(subcommand)]
    Txn(Txn),
    /// Dirty rollbacks: rows changed outside a global transaction that rolled back.
    #[command(subcommand)]
    Dirty(Dirty),
    /// Global row locks, their holders and waiters.
    #[command(subcommand)]
    Lock(Lock),
    /// Deadlocks the coordinator broke.
    #[command(subcommand)]
    Deadlock(Deadlock),
    /// The audit trail of operator actions.
    #[command(subcommand)]
    Audit(Audit),
    /// Named tokens (admin).
    #[command(subcommand)]
    Token(Token),
    /// Undo records, read straight from a database (no coordinator needed).
    #[command(subcommand)]
    Undo(Undo),
    /// Prints a shell completion script.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// What every action needs.
#[derive(Args, Debug, Clone)]
pub struct Act {
    /// Why: goes into the audit trail (required).
    #[arg(long)]
    pub reason: String,
    /// Show what would happen; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not ask: act at once (scripts; without it a terminal is needed to confirm).
    #[arg(long)]
    pub yes: bool,
    /// Act only if the transaction is still at this version (default: the version shown).
    #[arg(long)]
    pub expect_version: Option<u64>,
}

#[derive(Subcommand, Debug)]
pub enum Txn {
    /// Live transactions, oldest first, then recently finished ones.
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Exit 6 if anything is listed.
        #[arg(long)]
        fail_if_any: bool,
    },
    /// One transaction with its branches.
    Show { xid: String },
    /// A transaction's timeline.
    Events { xid: String },
    /// Runs a failed transaction's phase 2 again (after the data was repaired).
    Retry {
        xid: String,
        #[command(flatten)]
        act: Act,
    },
    /// Forgets a failed transaction resolved by hand and releases its rows.
    Resolve {
        xid: String,
        /// The proxies delete the undo records left (each with a ferrata_audit row).
        #[arg(long)]
        delete_undo: bool,
        #[command(flatten)]
        act: Act,
    },
    /// Stops automatic phase-2 retries of a transaction.
    Pause {
        xid: String,
        #[command(flatten)]
        act: Act,
    },
    /// Lets automatic phase-2 retries go on.
    Resume {
        xid: String,
        #[command(flatten)]
        act: Act,
    },
}

/// Which rows of a branch.
#[derive(Args, Debug, Clone)]
#[group(required = true, multiple = false)]
pub struct Rows {
    /// A row by its primary key, `id=7` or `order_id=7,line=2` (repeat for more rows).
    #[arg(long = "row")]
    pub rows: Vec<String>,
    /// Every row of the branch.
    #[arg(long)]
    pub all: bool,
}

#[derive(Subcommand, Debug)]
pub enum Dirty {
    /// One line per failed branch of a failed rollback.
    List {
        #[arg(long)]
        fail_if_any: bool,
    },
    /// A branch's rows now: before, after and current values, column by column.
    Show {
        xid: String,
        /// The branch (default: the one whose rollback failed).
        #[arg(long)]
        branch: Option<u64>,
        /// Bytes as hex instead of text.
        #[arg(long)]
        hex: bool,
        /// Rows the rollback would restore as they are, too.
        #[arg(long)]
        all_rows: bool,
    },
    /// Keeps the rows' current values: they leave the undo record, their locks go.
    Accept(Settle),
    /// Writes the rows' before image over their current values.
    Restore(Settle),
}

/// Which rows of which branch an accept or restore settles, and why.
#[derive(Args, Debug)]
pub struct Settle {
    pub xid: String,
    /// The branch (default: the one whose rollback failed).
    #[arg(long)]
    pub branch: Option<u64>,
    #[command(flatten)]
    pub rows: Rows,
    #[command(flatten)]
    pub act: Act,
}

#[derive(Subcommand, Debug)]
pub enum Lock {
    /// Held rows with their holders and waiters.
    List {
        #[arg(long)]
        resource: Option<String>,
        #[arg(long)]
        schema: Option<String>,
        #[arg(long)]
        table: Option<String>,
        /// Only rows held by this transaction.
        #[arg(long)]
        holder: Option<String>,
        /// Only rows someone waits for.
        #[arg(long)]
        waiting: bool,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        #[arg(long)]
        fail_if_any: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum Deadlock {
    /// The most recent deadlocks, newest last.
    List {
        #[arg(long)]
        fail_if_any: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum Audit {
    /// Audit records, oldest first.
    List {
        #[arg(long)]
        xid: Option<String>,
        #[arg(long)]
        actor: Option<String>,
        #[arg(long)]
        action: Option<String>,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Checks the hash chain; exits 1 if it is broken.
    Verify,
}

#[derive(Subcommand, Debug)]
pub enum Token {
    /// Creates a token; its secret is printed once.
    Create {
        #[arg(long)]
        name: String,
        /// viewer, operator, admin, application or proxy.
        #[arg(long)]
        role: String,
        /// It stops working after this long: 12h, 30d.
        #[arg(long, value_parser = duration)]
        expires: Option<Duration>,
        #[arg(long)]
        reason: String,
    },
    List,
    /// Refuses the token from now on.
    Revoke {
        name: String,
        #[arg(long)]
        reason: String,
    },
}

/// Where the undo records are.
#[derive(Args, Debug, Clone)]
pub struct Database {
    /// mysql://user@host:port/database; the password comes from FERRATA_DB_PASSWORD or
    /// --password-file, never the URL.
    #[arg(long)]
    pub database: String,
    #[arg(long)]
    pub password_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Undo {
    /// Undo records, with their tables and rows; flags records whose transaction the
    /// coordinator no longer knows (when one is configured).
    List {
        #[command(flatten)]
        db: Database,
        #[arg(long)]
        xid: Option<String>,
        #[arg(long)]
        branch: Option<u64>,
        #[arg(long)]
        table: Option<String>,
        /// Only records older than this: 10m, 2h.
        #[arg(long, value_parser = duration)]
        older_than: Option<Duration>,
        /// normal or marker (anti-hanging markers).
        #[arg(long)]
        status: Option<String>,
    },
    /// One record's images, column by column with their types.
    Show {
        #[command(flatten)]
        db: Database,
        xid: String,
        #[arg(long)]
        branch: Option<u64>,
    },
}

/// `500ms`, `30s`, `10m`, `2h`, `7d`.
pub fn duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 10m, 2h or 7d"))?;
    let ms = match unit {
        "ms" => n,
        "s" | "" => n * 1000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        "d" => n * 86_400_000,
        _ => return Err(format!("{s:?}: the unit must be ms, s, m, h or d")),
    };
    Ok(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(duration("3 weeks").is_err());
        assert!(duration("").is_err());
    }

    #[test]
    fn a_token_is_never_a_flag_value_and_actions_need_a_reason() {
        assert!(Cli::try_parse_from(["ferrata", "--token", "x", "status"]).is_err());
        assert!(Cli::try_parse_from(["ferrata", "txn", "retry", "1-1"]).is_err());
        assert!(
            Cli::try_parse_from(["ferrata", "dirty", "accept", "1-1", "--reason", "r"]).is_err(),
            "rows or --all"
        );
        assert!(
            Cli::try_parse_from([
                "ferrata", "dirty", "accept", "1-1", "--all", "--row", "id=1", "--reason", "r"
            ])
            .is_err()
        );
        assert!(Cli::try_parse_from(["ferrata", "dirty", "restore", "1-1", "--row", "id=1", "--reason", "r"]).is_ok());
    }
}
