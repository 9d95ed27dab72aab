//! The bank test: accounts split across two MariaDB servers, each behind its own proxy
//! process, one coordinator process; 8 clients run cross-server transfers as global transactions at the
//! same time, roll back about 30% of them on purpose after both updates, and give up on the
//! ones that lose a lock race. Meanwhile 4 more clients credit the same accounts outside any
//! global transaction (a balance update and a credit row, in one local transaction), so the
//! no-dirty-writes check is exercised against rolling-back transfers. Afterwards: the total
//! balance is what the committed credits added, no balance is negative, every committed
//! transfer is in the ledger exactly once and no other is, every committed credit is in the
//! credit table, no rollback was dirty, and no undo record, prepared XA branch or global lock
//! is left. It runs with both servers' branches in AT mode, both in XA mode, mixed (one
//! server's AT, the other's XA), and with half the clients in each mode on the same accounts
//! (XA branches then write rows AT branches hold, and are checked against their locks).

use std::collections::BTreeSet;

use anyhow::Result;
use ferrata_tests::coordinator::Coordinator;
use ferrata_tests::ferrata_testkit::MariaDb;
use ferrata_tests::process::ProxyProcess;
use ferrata_tests::{until, until_undo_records_gone};
use mysql_async::prelude::*;

const TC: &str = env!("CARGO_BIN_EXE_ferrata-tc-for-tests");
const PROXY: &str = env!("CARGO_BIN_EXE_ferrata-proxy-for-tests");
const CLIENTS: u64 = 8;
const CREDITORS: u64 = 4;
const CREDITS: u64 = 15;
const TRANSFERS: u64 = 12;
const ACCOUNTS: u64 = 4;
const START_BALANCE: i64 = 10_000;

/// A real `ferrata-proxy` process in front of `db`.
fn proxy_for(db: &MariaDb, tc: &Coordinator) -> Result<ProxyProcess> {
    ProxyProcess::start(PROXY, db.addr(), &tc.endpoint(), 1_000)
}

/// How one server's branches keep their work.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
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
struct Side<'a> {
    conn: &'a mut mysql_async::Conn,
    mode: Mode,
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
enum Outcome {
    Committed(u64),
    RolledBack,
}

/// One transfer from an account on `a` to one on `b`, with a ledger row on `a`.
async fn transfer(a: &mut Side<'_>, b: &mut Side<'_>, id: u64, rollback: bool) -> Result<Outcome> {
    let xid: String = a
        .conn
        .query_first(format!("START GLOBAL TRANSACTION TIMEOUT 20000 MODE {}", a.mode.sql()))
        .await?
        .expect("an XID");
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
                let code = match e.downcast_ref::<mysql_async::Error>() {
                    Some(mysql_async::Error::Server(s)) => s.code,
                    _ => return Err(e),
                };
                anyhow::ensure!(
                    matches!(code, 1205 | 1213 | 1402 | 1613 | 1614),
                    "transfer {id}: unexpected error {e}"
                );
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
                Err(e) => return Err(e.into()),
            }
            Ok(Outcome::RolledBack)
        }
    }
}

/// One credit outside any global transaction, retried while it loses lock races (1205,
/// 1213). `Some(amount)` once committed; `None` if it gave up.
async fn credit(c: &mut mysql_async::Conn, id: u64) -> Result<Option<i64>> {
    let (account, amount) = (id % ACCOUNTS + 1, (id % 5 + 1) as i64);
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
            Err(e) => {
                let code = match e.downcast_ref::<mysql_async::Error>() {
                    Some(mysql_async::Error::Server(s)) => s.code,
                    _ => return Err(e),
                };
                anyhow::ensure!(matches!(code, 1205 | 1213), "credit {id}: unexpected error {e}");
                c.query_drop("ROLLBACK").await?;
            }
        }
    }
    Ok(None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transfers_keep_the_books_balanced() -> Result<()> {
    books_balanced(|_| [Mode::At, Mode::At]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_xa_transfers_keep_the_books_balanced() -> Result<()> {
    books_balanced(|_| [Mode::Xa, Mode::Xa]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transfers_with_at_on_one_server_and_xa_on_the_other_keep_the_books_balanced() -> Result<()> {
    books_balanced(|_| [Mode::At, Mode::Xa]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_at_and_xa_transfers_on_the_same_accounts_keep_the_books_balanced() -> Result<()> {
    books_balanced(|client| {
        if client % 2 == 0 {
            [Mode::At, Mode::At]
        } else {
            [Mode::Xa, Mode::Xa]
        }
    })
    .await
}

/// The bank run with client `c`'s branches on server A and server B in `modes(c)`.
async fn books_balanced(modes: fn(u64) -> [Mode; 2]) -> Result<()> {
    // XA branches hold their rows until phase 2, across both servers: two transfers that each
    // wait for a row the other's prepared branch holds wait for each other (no database sees
    // both waits), until a lock wait times out. Keep that short.
    let options = || ferrata_tests::ferrata_testkit::MariaDbOptions {
        extra_args: vec!["--innodb-lock-wait-timeout=2".into()],
        ..Default::default()
    };
    let (db_a, db_b) = (
        MariaDb::start_with(options()).await?,
        MariaDb::start_with(options()).await?,
    );
    let tc = Coordinator::start(TC)?;
    let (pa, pb) = (proxy_for(&db_a, &tc)?, proxy_for(&db_b, &tc)?);
    for db in [&db_a, &db_b] {
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

    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let (oa, ob) = (pa.opts(), pb.opts());
        clients.push(tokio::spawn(async move {
            let mut a = mysql_async::Conn::new(oa).await?;
            let mut b = mysql_async::Conn::new(ob).await?;
            let mut committed = Vec::new();
            for n in 0..TRANSFERS {
                let id = client * 1000 + n;
                let [mode_a, mode_b] = modes(client);
                let mut a = Side {
                    conn: &mut a,
                    mode: mode_a,
                };
                let mut b = Side {
                    conn: &mut b,
                    mode: mode_b,
                };
                // Alternate the direction so both servers' accounts are debited.
                let outcome = if n % 2 == 0 {
                    transfer(&mut a, &mut b, id, n % 10 < 3).await?
                } else {
                    transfer(&mut b, &mut a, id, n % 10 < 3).await?
                };
                if let Outcome::Committed(id) = outcome {
                    committed.push(id);
                }
            }
            anyhow::Ok(committed)
        }));
    }
    let mut creditors = Vec::new();
    for creditor in 0..CREDITORS {
        let (oa, ob) = (pa.opts(), pb.opts());
        creditors.push(tokio::spawn(async move {
            let mut a = mysql_async::Conn::new(oa).await?;
            let mut b = mysql_async::Conn::new(ob).await?;
            // (id, amount) of each committed credit.
            let mut committed = Vec::new();
            for n in 0..CREDITS {
                let id = creditor * 1000 + n;
                let conn = if n % 2 == 0 { &mut a } else { &mut b };
                if let Some(amount) = credit(conn, id).await? {
                    committed.push((id, amount));
                }
            }
            anyhow::Ok(committed)
        }));
    }
    let mut committed = BTreeSet::new();
    for c in clients {
        committed.extend(c.await??);
    }
    assert!(!committed.is_empty(), "some transfers committed");
    let mut credited = BTreeSet::new();
    let mut credited_total = 0;
    for c in creditors {
        for (id, amount) in c.await?? {
            credited.insert(id);
            credited_total += amount;
        }
    }
    assert!(!credited.is_empty(), "some credits committed");

    // Phase 2 of the last commits is asynchronous: wait for the undo records and the
    // prepared branches to go.
    until_undo_records_gone(&[&db_a, &db_b]).await?;
    for db in [&db_a, &db_b] {
        until("no prepared XA branch", async || {
            let prepared: Vec<(i64, i64, i64, Vec<u8>)> = db.conn().await?.query("XA RECOVER").await?;
            Ok(prepared.is_empty())
        })
        .await?;
    }

    let mut total = 0;
    let mut ledger = BTreeSet::new();
    let mut credits = BTreeSet::new();
    for db in [&db_a, &db_b] {
        let mut c = db.conn().await?;
        let balances: Vec<i64> = c.query("SELECT balance FROM account").await?;
        assert!(balances.iter().all(|b| *b >= 0), "no negative balance: {balances:?}");
        total += balances.iter().sum::<i64>();
        let ids: Vec<u64> = c.query("SELECT id FROM ledger").await?;
        for id in ids {
            assert!(ledger.insert(id), "transfer {id} is in the ledgers twice");
        }
        let ids: Vec<u64> = c.query("SELECT id FROM credit").await?;
        credits.extend(ids);
    }
    assert_eq!(
        total,
        2 * ACCOUNTS as i64 * START_BALANCE + credited_total,
        "transfers moved money without making or losing any; credits added theirs"
    );
    assert_eq!(
        credits, credited,
        "the credit tables hold exactly the committed credits"
    );
    assert_eq!(ledger, committed, "the ledgers hold exactly the committed transfers");
    let locks = tc.get("/v1/locks").await?;
    assert_eq!(
        locks["locks"].as_array().map(Vec::len),
        Some(0),
        "no global lock is left: {locks}"
    );
    let failed = tc.get("/v1/transactions?status=RollbackFailed").await?;
    assert_eq!(
        failed["transactions"].as_array().map(Vec::len),
        Some(0),
        "no dirty rollback: {failed}"
    );
    Ok(())
}
