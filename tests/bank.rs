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

use anyhow::Result;
use ferrata_tests::bank::{Books, Mode, Outcome, Side, check_books, create_accounts, credit, transfer};
use ferrata_tests::coordinator::Coordinator;
use ferrata_tests::ferrata_testkit::MariaDb;
use ferrata_tests::process::ProxyProcess;

const TC: &str = env!("CARGO_BIN_EXE_ferrata-tc-for-tests");
const PROXY: &str = env!("CARGO_BIN_EXE_ferrata-proxy-for-tests");
const CLIENTS: u64 = 8;
const CREDITORS: u64 = 4;
const CREDITS: u64 = 15;
const TRANSFERS: u64 = 12;

/// A real `ferrata-proxy` process in front of `db`.
fn proxy_for(db: &MariaDb, tc: &Coordinator) -> Result<ProxyProcess> {
    ProxyProcess::start(PROXY, db.addr(), &tc.endpoint(), 1_000)
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
    create_accounts([&db_a, &db_b]).await?;

    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let (oa, ob) = (pa.opts(), pb.opts());
        clients.push(tokio::spawn(async move {
            let mut a = mysql_async::Conn::new(oa).await?;
            let mut b = mysql_async::Conn::new(ob).await?;
            let (mut committed, mut rolled_back) = (Vec::new(), Vec::new());
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
                    transfer(&mut a, &mut b, id, n % 10 < 3, 20_000).await?
                } else {
                    transfer(&mut b, &mut a, id, n % 10 < 3, 20_000).await?
                };
                match outcome {
                    Outcome::Committed(id) => committed.push(id),
                    Outcome::RolledBack(id) => rolled_back.push(id),
                }
            }
            anyhow::Ok((committed, rolled_back))
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
    let mut books = Books::default();
    for c in clients {
        let (committed, rolled_back) = c.await??;
        books.committed.extend(committed);
        books.rolled_back.extend(rolled_back);
    }
    assert!(!books.committed.is_empty(), "some transfers committed");
    for c in creditors {
        books.credited.extend(c.await??.into_iter().map(|(id, _)| id));
    }
    assert!(!books.credited.is_empty(), "some credits committed");
    check_books([&db_a, &db_b], &[&tc], &books).await
}
