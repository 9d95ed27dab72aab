//! The bank workload, shared by the bank test (`bank.rs`) and the high-availability test
//! (`ha.rs`): accounts split across two MariaDB servers, transfers between them as global
//! transactions (a share rolled back on purpose), credits outside any global transaction on
//! the same accounts, and the books checked afterwards against what the clients were told.

use std::collections::BTreeSet;

use anyhow::{Context, Result};
use mysql_async::prelude::*;

use crate::coordinator::Coordinator;
use crate::ferrata_testkit::MariaDb;
use crate::{until, until_undo_records_gone};

pub const ACCOUNTS: u64 = 4;
pub const START_BALANCE: i64 = 10_000;

/// How one server's branches keep their work.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    At,
    Xa,
}

impl Mode {
    fn sql(self) -> &'static str {
        match self {
            Mode::At => "AT",
            Mode::Xa => "XA",
        }
    }
}

/// A session on one server, with the mode its branches use there.
pub struct Side<'a> {
    pub conn: &'a mut mysql_async::Conn,
    pub mode: Mode,
}

impl Side<'_> {
    /// Runs `statements` as one branch: in XA mode between BEGIN and COMMIT (a connection
    /// holds one prepared branch per global transaction), in AT mode one autocommit branch
    /// each.
    async fn branch(&mut self, statements: &[String]) -> Result<()> {
        let xa = self.mode == Mode::Xa;
        if xa {
            self.conn.query_drop("BEGIN").await?;
        }
        for sql in statements {
            self.conn.query_drop(sql).await?;
        }
        if xa {
            self.conn.query_drop("COMMIT").await?;
        }
        Ok(())
    }
}

/// How one transfer ended.
pub enum Outcome {
    Committed(u64),
    RolledBack(u64),
}

/// The MySQL error code of `e`, if the server (or the proxy) sent one.
pub fn server_code(e: &anyhow::Error) -> Option<u16> {
    match e.downcast_ref::<mysql_async::Error>() {
        Some(mysql_async::Error::Server(s)) => Some(s.code),
        _ => None,
    }
}

/// Creates the account, ledger and credit tables on both servers.
pub async fn create_accounts(servers: [&MariaDb; 2]) -> Result<()> {
    for db in servers {
        let mut c = db.conn().await?;
        c.query_drop("CREATE TABLE account (id INT PRIMARY KEY, balance BIGINT NOT NULL)")
            .await?;
        c.query_drop("CREATE TABLE ledger (id BIGINT PRIMARY KEY, src INT, dst INT, amount BIGINT)")
            .await?;
        c.query_drop("CREATE TABLE credit (id BIGINT PRIMARY KEY, account INT, amount BIGINT)")
            .await?;
        for id in 1..=ACCOUNTS {
            c.query_drop(format!("INSERT INTO account VALUES ({id}, {START_BALANCE})"))
                .await?;
        }
    }
    Ok(())
}

/// One transfer from an account on `a` to one on `b`, with a ledger row on `a`, in a global
/// transaction with a timeout of `timeout_ms`. A lost lock race gives up like a deliberate
/// rollback; any other error is returned as it came (its MySQL error inside).
pub async fn transfer(a: &mut Side<'_>, b: &mut Side<'_>, id: u64, rollback: bool, timeout_ms: u64) -> Result<Outcome> {
    let xid: String = a
        .conn
        .query_first(format!(
            "START GLOBAL TRANSACTION TIMEOUT {timeout_ms} MODE {}",
            a.mode.sql()
        ))
        .await?
        .context("START GLOBAL TRANSACTION answers an XID")?;
    let (from, to, amount) = (
        id % ACCOUNTS + 1,
        (id / ACCOUNTS) % ACCOUNTS + 1,
        (id % 7 + 1) as i64 * 10,
    );
    let phase_one = async {
        a.branch(&[
            format!("UPDATE account SET balance = balance - {amount} WHERE id = {from}"),
            format!("INSERT INTO ledger VALUES ({id}, {from}, {to}, {amount})"),
        ])
        .await?;
        b.conn
            .query_drop(format!("JOIN GLOBAL TRANSACTION '{xid}' MODE {}", b.mode.sql()))
            .await?;
        b.branch(&[format!(
            "UPDATE account SET balance = balance + {amount} WHERE id = {to}"
        )])
        .await?;
        b.conn.query_drop("LEAVE GLOBAL TRANSACTION").await?;
        anyhow::Ok(())
    }
    .await;
    match phase_one {
        Ok(()) if !rollback => {
            a.conn.query_drop("COMMIT GLOBAL").await?;
            Ok(Outcome::Committed(id))
        }
        other => {
            // A lost lock race (1205, 1213; in XA mode also the branch rolled back by its
            // database, 1402, 1613, 1614) gives up like a deliberate rollback does.
            if let Err(e) = other {
                if !matches!(server_code(&e), Some(1205 | 1213 | 1402 | 1613 | 1614)) {
                    return Err(e.context(format!("transfer {id}")));
                }
                // An XA branch left open ends first.
                let _ = a.conn.query_drop("ROLLBACK").await;
                let _ = b.conn.query_drop("ROLLBACK").await;
                let _ = b.conn.query_drop("LEAVE GLOBAL TRANSACTION").await;
            }
            match a.conn.query_drop(format!("ROLLBACK GLOBAL '{xid}'")).await {
                Ok(()) => {}
                // A restore waited out a row lock (an XA branch of another transfer holds the
                // row until its own check fails it): the coordinator retries the rollback,
                // and the books are checked once every rollback finished.
                Err(mysql_async::Error::Server(s)) if s.code == 1401 && s.message.contains("RollbackRetrying") => {}
                Err(e) => return Err(anyhow::Error::from(e).context(format!("rolling back transfer {id}"))),
            }
            Ok(Outcome::RolledBack(id))
        }
    }
}

/// One credit outside any global transaction, retried while it loses lock races (1205,
/// 1213). `Some(amount)` once committed; `None` if it gave up. Other errors are returned as
/// they came.
pub async fn credit(c: &mut mysql_async::Conn, id: u64) -> Result<Option<i64>> {
    let (account, amount) = credit_of(id);
    for _ in 0..20 {
        let attempt = async {
            c.query_drop("BEGIN").await?;
            c.query_drop(format!(
                "UPDATE account SET balance = balance + {amount} WHERE id = {account}"
            ))
            .await?;
            c.query_drop(format!("INSERT INTO credit VALUES ({id}, {account}, {amount})"))
                .await?;
            c.query_drop("COMMIT").await?;
            anyhow::Ok(())
        }
        .await;
        match attempt {
            Ok(()) => return Ok(Some(amount)),
            Err(e) if matches!(server_code(&e), Some(1205 | 1213)) => c.query_drop("ROLLBACK").await?,
            Err(e) => return Err(e.context(format!("credit {id}"))),
        }
    }
    Ok(None)
}

/// The account and amount of credit `id`.
fn credit_of(id: u64) -> (u64, i64) {
    (id % ACCOUNTS + 1, (id % 5 + 1) as i64)
}

/// What the clients were told.
#[derive(Default)]
pub struct Books {
    /// Transfers whose COMMIT GLOBAL succeeded.
    pub committed: BTreeSet<u64>,
    /// Transfers the client saw roll back (on purpose, or refused by the coordinator).
    pub rolled_back: BTreeSet<u64>,
    /// Transfers whose outcome the client never learned (a fault cut them off).
    pub unknown: BTreeSet<u64>,
    /// Credits whose COMMIT succeeded.
    pub credited: BTreeSet<u64>,
    /// Credits whose COMMIT's outcome the client never learned.
    pub credits_unknown: BTreeSet<u64>,
}

/// Asserts that what the tables hold of `what` has everything a client saw committed, and
/// nothing else but what a fault left unknown.
fn acknowledged_exactly(what: &str, in_tables: &BTreeSet<u64>, committed: &BTreeSet<u64>, unknown: &BTreeSet<u64>) {
    let missing: Vec<_> = committed.difference(in_tables).collect();
    assert!(
        missing.is_empty(),
        "committed {what} missing from the tables: {missing:?}"
    );
    let extra: Vec<_> = in_tables
        .iter()
        .filter(|id| !committed.contains(id) && !unknown.contains(id))
        .collect();
    assert!(
        extra.is_empty(),
        "{what} in the tables that no client committed: {extra:?}"
    );
}

/// Waits until phase 2 of the last transactions is done (no undo record, no prepared XA
/// branch), then checks the books: no money made or lost (the total is the start plus the
/// credits in the tables), no negative balance, every transfer the client saw committed in
/// the ledgers exactly once and no transfer the client saw roll back, the same for credits,
/// no global lock left and no dirty rollback on any of `tcs` (several serving nodes: the
/// locks are listed by the one that leads them).
pub async fn check_books(servers: [&MariaDb; 2], tcs: &[&Coordinator], books: &Books) -> Result<()> {
    until_undo_records_gone(&servers).await?;
    for db in servers {
        until("no prepared XA branch", async || {
            let prepared: Vec<(i64, i64, i64, Vec<u8>)> = db.conn().await?.query("XA RECOVER").await?;
            Ok(prepared.is_empty())
        })
        .await?;
    }

    let mut total = 0;
    let mut ledger = BTreeSet::new();
    let mut credits = BTreeSet::new();
    let mut credited_total = 0;
    for db in servers {
        let mut c = db.conn().await?;
        let balances: Vec<i64> = c.query("SELECT balance FROM account").await?;
        assert!(balances.iter().all(|b| *b >= 0), "no negative balance: {balances:?}");
        total += balances.iter().sum::<i64>();
        let ids: Vec<u64> = c.query("SELECT id FROM ledger").await?;
        for id in ids {
            assert!(ledger.insert(id), "transfer {id} is in the ledgers twice");
        }
        let rows: Vec<(u64, u64, i64)> = c.query("SELECT id, account, amount FROM credit").await?;
        for (id, account, amount) in rows {
            assert_eq!((account, amount), credit_of(id), "credit {id} is as it was made");
            credited_total += amount;
            credits.insert(id);
        }
    }
    assert_eq!(
        total,
        2 * ACCOUNTS as i64 * START_BALANCE + credited_total,
        "transfers moved money without making or losing any; credits added theirs"
    );
    acknowledged_exactly("credits", &credits, &books.credited, &books.credits_unknown);
    acknowledged_exactly("transfers", &ledger, &books.committed, &books.unknown);
    let undone: Vec<_> = books.rolled_back.intersection(&ledger).collect();
    assert!(
        undone.is_empty(),
        "transfers in the ledgers that were rolled back: {undone:?}"
    );

    let mut listed = 0;
    for tc in tcs {
        let (status, locks) = tc.get_answer("/v1/locks").await?;
        if status == 503 && locks["code"] == "lock_authority_unavailable" {
            continue;
        }
        assert_eq!(status, 200, "{locks}");
        assert_eq!(
            locks["locks"].as_array().map(Vec::len),
            Some(0),
            "no global lock is left: {locks}"
        );
        listed += 1;
    }
    assert!(listed > 0, "a node lists the locks");
    for tc in tcs {
        let failed = tc.get("/v1/transactions?status=RollbackFailed").await?;
        assert_eq!(
            failed["transactions"].as_array().map(Vec::len),
            Some(0),
            "no dirty rollback: {failed}"
        );
    }
    Ok(())
}
