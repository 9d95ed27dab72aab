//! Session-level behaviour through the proxy, compared with the same operations made directly
//! against MariaDB: COM_CHANGE_USER (user, default schema, wrong password), COM_RESET_CONNECTION
//! (user variables, temporary tables, SQL and binary prepared statements), the ed25519 auth
//! plugin (mysql_async and the `mariadb` command-line client), TLS from clients to the proxy
//! (offered, used, required) and from the proxy to a TLS backend, drivers that prefer the
//! server's Unix socket, and the current schema after COM_INIT_DB and USE.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use ferrata_proxy::config::{BackendTls, ClientTls};
use ferrata_tests::ferrata_testkit::raw::{Packet, RawConn, flags};
use ferrata_tests::ferrata_testkit::{APP_PASSWORD, APP_USER, MariaDb, MariaDbOptions, ServerTls};
use ferrata_tests::{Proxy, Setup, mariadb_cli, server_error, tcp_opts};
use mysql_async::prelude::*;
use mysql_async::{ChangeUserOpts, Conn, SslOpts, Value};

#[tokio::test]
async fn change_user_switches_user_and_schema_like_directly() -> Result<()> {
    let setup = Setup::start().await?;
    let mut admin = setup.db.conn().await?;
    admin
        .query_drop(
            "CREATE USER 'other'@'%' IDENTIFIED BY 'other-pw';
             CREATE DATABASE other_db;
             GRANT ALL ON other_db.* TO 'other'@'%'",
        )
        .await?;

    let pair = setup.pair().await?;
    let mut seen = Vec::new();
    for mut conn in [pair.direct, pair.proxied] {
        conn.query_drop("SET @before = 1").await?;
        conn.change_user(
            ChangeUserOpts::default()
                .with_user(Some("other".into()))
                .with_pass(Some("other-pw".into()))
                .with_db_name(Some("other_db".into())),
        )
        .await?;
        let row: (String, Option<String>, Option<i64>) = conn
            .query_first("SELECT CURRENT_USER(), DATABASE(), @before")
            .await?
            .context("no row")?;
        assert_eq!(row, ("other@%".into(), Some("other_db".into()), None));
        // Back to the app user and its schema, so that the session keeps following along.
        conn.change_user(
            ChangeUserOpts::default()
                .with_user(Some(APP_USER.into()))
                .with_pass(Some(APP_PASSWORD.into()))
                .with_db_name(Some("test".into())),
        )
        .await?;
        let back: (String, Option<String>) = conn
            .query_first("SELECT CURRENT_USER(), DATABASE()")
            .await?
            .context("no row")?;
        assert_eq!(back, (format!("{APP_USER}@%"), Some("test".into())));

        let wrong = conn
            .change_user(
                ChangeUserOpts::default()
                    .with_user(Some("other".into()))
                    .with_pass(Some("not-the-password".into())),
            )
            .await
            .err()
            .context("a wrong password must fail COM_CHANGE_USER")?;
        seen.push(server_error(&wrong)?);
    }
    assert_eq!(seen[0].0, 1045, "{seen:?}");
    assert_eq!(seen[0].1, "28000", "{seen:?}");
    assert_eq!(seen[0], seen[1], "direct vs proxied");

    // The failed session does not disturb the proxy.
    let mut fresh = setup.proxy.conn().await?;
    assert_eq!(fresh.query_first::<i64, _>("SELECT 1").await?, Some(1));
    Ok(())
}

#[tokio::test]
async fn reset_connection_clears_session_state_like_directly() -> Result<()> {
    let setup = Setup::start().await?;
    let pair = setup.pair().await?;
    let mut outcomes = Vec::new();
    for mut conn in [pair.direct, pair.proxied] {
        conn.query_drop(
            "SET @kept = 42;
             CREATE TEMPORARY TABLE scratch (a INT);
             PREPARE by_sql FROM 'SELECT 7'",
        )
        .await?;
        let binary = conn.prep("SELECT ? + 1").await?;
        // Everything is there before the reset.
        assert_eq!(conn.exec_first::<i64, _, _>(&binary, (1,)).await?, Some(2));
        assert_eq!(conn.query_first::<i64, _>("EXECUTE by_sql").await?, Some(7));

        assert!(conn.reset().await?, "MariaDB 10.11 supports COM_RESET_CONNECTION");
        let mut after = Vec::new();
        for probe in ["SELECT @kept", "SELECT COUNT(*) FROM scratch", "EXECUTE by_sql"] {
            after.push(outcome(conn.query_first::<Value, _>(probe).await));
        }
        after.push(outcome(conn.exec_first::<Value, _, _>(&binary, (1,)).await));
        // The session is usable again, prepared statements included.
        after.push(outcome(conn.exec_first::<Value, _, _>("SELECT ? * 3", (5,)).await));
        outcomes.push(after);
    }
    assert_eq!(
        outcomes[0],
        [
            "NULL".to_owned(),
            "ERROR 1146".into(),
            "ERROR 1243".into(),
            "ERROR 1243".into(),
            "15".into()
        ]
    );
    assert_eq!(outcomes[0], outcomes[1], "direct vs proxied");
    Ok(())
}

#[tokio::test]
async fn ed25519_user_authenticates_like_directly() -> Result<()> {
    let setup = Setup::start().await?;
    create_ed25519_user(&setup.db).await?;
    let targets = [tcp_opts(setup.db.addr()), tcp_opts(setup.proxy.addr)];

    let mut users = Vec::new();
    let mut failures = Vec::new();
    for target in &targets {
        let mut conn = Conn::new(target.clone().user(Some(ED_USER)).pass(Some(ED_PASSWORD))).await?;
        let user: String = conn.query_first("SELECT CURRENT_USER()").await?.context("no row")?;
        users.push(user);
        conn.disconnect().await?;

        let wrong = Conn::new(target.clone().user(Some(ED_USER)).pass(Some("wrong")))
            .await
            .err()
            .context("a wrong ed25519 password must fail")?;
        failures.push(server_error(&wrong)?);
    }
    assert_eq!(users, [format!("{ED_USER}@%"), format!("{ED_USER}@%")]);
    assert_eq!((failures[0].0, failures[0].1.as_str()), (1045, "28000"), "{failures:?}");
    assert_eq!(failures[0], failures[1], "direct vs proxied");
    Ok(())
}

#[tokio::test]
async fn mariadb_cli_with_ed25519_user_works_through_the_proxy() -> Result<()> {
    let setup = Setup::start().await?;
    create_ed25519_user(&setup.db).await?;
    let mut outputs = Vec::new();
    for addr in [setup.db.addr(), setup.proxy.addr] {
        let run = |password| {
            let args = [
                "--skip-ssl",
                "--batch",
                "--skip-column-names",
                "--execute",
                "SELECT CURRENT_USER(), 6 * 7",
            ];
            async move { mariadb_cli(addr, ED_USER, password, None, &args).await }
        };
        let (code, stdout, stderr) = run(ED_PASSWORD).await?;
        let (wrong_code, _, wrong_stderr) = run("wrong").await?;
        assert_ne!(wrong_code, Some(0));
        outputs.push((code == Some(0), stdout, stderr, wrong_stderr));
    }
    let (success, stdout, stderr, _) = &outputs[0];
    assert!(success, "direct: {stderr}");
    assert_eq!(stdout, &format!("{ED_USER}@%\t42\n"));
    assert!(outputs[0].3.contains("ERROR 1045 (28000)"), "{}", outputs[0].3);
    assert_eq!(outputs[0], outputs[1], "direct vs proxied");
    Ok(())
}

#[tokio::test]
async fn clients_can_use_tls_to_the_proxy_and_can_be_required_to() -> Result<()> {
    let certs = Certs::self_signed()?;
    for required in [false, true] {
        let setup = Setup::start_with(MariaDbOptions::default(), |config| {
            config.tls = Some(ClientTls {
                cert: certs.cert.clone(),
                key: certs.key.clone(),
                required,
            });
        })
        .await?;
        let greeting_caps = if required {
            // A plaintext client cannot log in; it gets the reason in an ERR.
            let err = Conn::new(setup.proxy.opts())
                .await
                .err()
                .context("a plaintext client must be refused when TLS is required")?;
            let (code, state, _) = server_error(&err)?;
            assert_eq!((code, state.as_str()), (3159, "08004"), "{err}");
            None
        } else {
            Some(setup.proxy.raw(flags::DEFAULT).await?.server_capabilities())
        };
        if let Some(caps) = greeting_caps {
            assert_ne!(caps & flags::CLIENT_SSL, 0, "the greeting must offer TLS");
        }

        // mysql_async trusting only our certificate: the handshake can succeed only if the
        // proxy itself terminated TLS with it (MariaDB here has no TLS at all).
        let ssl = SslOpts::default().with_root_certs(vec![certs.cert.clone().into()]);
        let mut conn = Conn::new(setup.proxy.opts().ssl_opts(ssl)).await?;
        let row: (i64, Option<String>) = conn.query_first("SELECT 1 + 1, DATABASE()").await?.context("no row")?;
        assert_eq!(row, (2, Some("test".into())), "required = {required}");
        // The backend leg stays plaintext: TLS was the proxy's, not the server's.
        assert_eq!(ssl_cipher(&mut conn).await?, "");
        conn.disconnect().await?;
    }
    Ok(())
}

#[tokio::test]
async fn proxy_speaks_tls_to_a_tls_backend() -> Result<()> {
    let certs = Certs::self_signed()?;
    let setup = Setup::start_with(
        MariaDbOptions {
            tls: Some(ServerTls {
                cert_pem: certs.cert.clone(),
                key_pem: certs.key.clone(),
            }),
            ..MariaDbOptions::default()
        },
        |config| {
            config.backend_tls = Some(BackendTls {
                ca: certs.cert.clone(),
                server_name: None,
            })
        },
    )
    .await?;
    let mut conn = setup.proxy.conn().await?;
    assert_ne!(ssl_cipher(&mut conn).await?, "", "the backend leg must be encrypted");
    assert_eq!(conn.query_first::<i64, _>("SELECT 40 + 2").await?, Some(42));

    // The same server behind a proxy without backend_tls: plaintext, so the check above
    // really tells the two apart.
    let plain = Proxy::start(setup.db.addr()).await?;
    let mut conn = plain.conn().await?;
    assert_eq!(ssl_cipher(&mut conn).await?, "");
    Ok(())
}

#[tokio::test]
async fn backend_tls_failures_reach_the_client_as_err_2026() -> Result<()> {
    let server_certs = Certs::self_signed()?;
    let other_ca = Certs::self_signed()?;
    let tls_server = MariaDb::start_with(MariaDbOptions {
        tls: Some(ServerTls {
            cert_pem: server_certs.cert.clone(),
            key_pem: server_certs.key.clone(),
        }),
        ..MariaDbOptions::default()
    })
    .await?;
    let plain_server = MariaDb::start().await?;
    // (server, CA the proxy trusts, what the message must say)
    let cases = [
        (&tls_server, &other_ca, "TLS handshake"),
        (&plain_server, &server_certs, "does not offer TLS"),
    ];
    for (server, ca, fragment) in cases {
        let mut config = ferrata_tests::test_config(server.addr());
        config.backend_tls = Some(BackendTls {
            ca: ca.cert.clone(),
            server_name: None,
        });
        let proxy = Proxy::start_with(config).await?;
        let err = Conn::new(proxy.opts()).await.err().context("login must fail")?;
        let mysql_async::Error::Server(e) = &err else {
            bail!("expected an ERR packet, got {err:?}");
        };
        assert_eq!((e.code, e.state.as_str()), (2026, "HY000"), "{err}");
        assert!(
            e.message.contains(fragment) && e.message.contains("backend_tls"),
            "{err}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn backend_over_a_unix_socket_serves_like_directly() -> Result<()> {
    let db = MariaDb::start().await?;
    let mut config = ferrata_tests::test_config(db.addr());
    config.backend = db.socket_path().to_string_lossy().into_owned();
    let proxy = Proxy::start_with(config).await?;

    let mut proxied = proxy.conn().await?;
    let mut direct = db.conn().await?;
    let sql = "SELECT SUBSTRING_INDEX(CURRENT_USER(), '@', 1), DATABASE(), 'ü😀', 40 + 2";
    type Row = (String, String, String, i64);
    let through: Option<Row> = proxied.query_first(sql).await?;
    assert_eq!(through, direct.query_first(sql).await?);
    // The server sees the proxy's session arrive on its socket, not over TCP.
    let host: Option<String> = proxied
        .query_first("SELECT HOST FROM information_schema.PROCESSLIST WHERE ID = CONNECTION_ID()")
        .await?;
    assert_eq!(host.as_deref(), Some("localhost"));
    Ok(())
}

#[tokio::test]
async fn drivers_preferring_the_socket_stay_on_the_proxy() -> Result<()> {
    let setup = Setup::start().await?;
    let socket = setup.db.socket_path().to_string_lossy().into_owned();
    let leaky = Proxy::start_with({
        let mut config = ferrata_tests::test_config(setup.db.addr());
        config.hide_server_socket = false;
        config
    })
    .await?;

    // (options, expected @@socket, whether the session should still be over TCP)
    let cases = [
        (setup.db.opts(), Some(socket.clone()), false),
        (setup.proxy.opts(), None, true),
        // Without the rewrite the driver would leave the proxy: this is what the setting prevents.
        (leaky.opts(), Some(socket), false),
    ];
    for (opts, socket, over_tcp) in cases {
        let mut conn = Conn::new(opts.prefer_socket(true)).await?;
        let (seen_socket, host): (Option<String>, String) = conn
            .query_first("SELECT @@socket, HOST FROM information_schema.PROCESSLIST WHERE ID = CONNECTION_ID()")
            .await?
            .context("no row")?;
        assert_eq!(seen_socket, socket);
        assert_eq!(host.starts_with("127.0.0.1:"), over_tcp, "session host {host}");
        assert_eq!(host == "localhost", !over_tcp, "session host {host}");
        conn.disconnect().await?;
    }
    Ok(())
}

#[tokio::test]
async fn schema_follows_init_db_and_use_like_directly() -> Result<()> {
    let setup = Setup::start().await?;
    setup
        .db
        .conn()
        .await?
        .query_drop("CREATE DATABASE first_db; CREATE DATABASE second_db; CREATE TABLE second_db.only_here (a INT)")
        .await?;
    let (mut direct, mut proxied) = setup.raw_pair(flags::DEFAULT).await?;

    let steps: [&[u8]; 8] = [
        b"\x02first_db",
        b"\x03SELECT DATABASE()",
        b"\x03USE second_db",
        b"\x03SELECT DATABASE(), COUNT(*) FROM only_here",
        b"\x02no_such_db",
        b"\x03SELECT DATABASE()",
        b"\x03use `first_db`",
        b"\x03SELECT DATABASE()",
    ];
    let mut transcripts = Vec::new();
    for conn in [&mut direct, &mut proxied] {
        let mut transcript = Vec::new();
        for step in steps {
            transcript.push(command(conn, step).await?);
        }
        transcripts.push(transcript);
    }
    let direct = &transcripts[0];
    let row = |packets: &[Packet]| packets[packets.len() - 2].payload.clone();
    assert_eq!(row(&direct[1]), b"\x08first_db");
    assert_eq!(row(&direct[3]), b"\x09second_db\x010");
    assert_eq!(
        direct[4][0].payload[..3],
        [0xff, 0x19, 0x04],
        "ERR 1049 unknown database"
    );
    assert_eq!(row(&direct[5]), b"\x09second_db");
    assert_eq!(row(&direct[7]), b"\x08first_db");
    assert_eq!(transcripts[0], transcripts[1], "direct vs proxied, byte for byte");
    Ok(())
}

// ---- helpers ----

const ED_USER: &str = "edwards";
const ED_PASSWORD: &str = "ed-secret";

async fn create_ed25519_user(db: &MariaDb) -> Result<()> {
    let mut conn = db.conn().await?;
    conn.query_drop(format!(
        "CREATE USER '{ED_USER}'@'%' IDENTIFIED VIA ed25519 USING PASSWORD('{ED_PASSWORD}')"
    ))
    .await?;
    let plugin: String = conn
        .query_first(format!("SELECT plugin FROM mysql.user WHERE User = '{ED_USER}'"))
        .await?
        .context("user not created")?;
    assert_eq!(plugin, "ed25519");
    Ok(())
}

/// A query outcome as text: the value, or `ERROR <code>`.
fn outcome(result: mysql_async::Result<Option<Value>>) -> String {
    match result {
        Ok(Some(value)) => value.as_sql(true),
        Ok(None) => "no row".into(),
        Err(mysql_async::Error::Server(e)) => format!("ERROR {}", e.code),
        Err(e) => format!("{e}"),
    }
}

/// The cipher of the server-side end of this session, empty without TLS.
async fn ssl_cipher(conn: &mut Conn) -> Result<String> {
    let (_, cipher): (String, String) = conn
        .query_first("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        .await?
        .context("no Ssl_cipher row")?;
    Ok(cipher)
}

/// Sends one raw command and reads its whole response.
async fn command(conn: &mut RawConn, payload: &[u8]) -> Result<Vec<Packet>> {
    conn.send_command(payload).await?;
    conn.read_response().await
}

/// A self-signed certificate for `localhost` and 127.0.0.1, in PEM files.
struct Certs {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

impl Certs {
    fn self_signed() -> Result<Certs> {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])?;
        let dir = tempfile::tempdir()?;
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, certified.cert.pem())?;
        std::fs::write(&key, certified.signing_key.serialize_pem())?;
        Ok(Certs { _dir: dir, cert, key })
    }
}
