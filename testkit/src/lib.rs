//! Throw-away `mariadbd` servers for Ferrata's tests, benchmarks and demo, etcd clusters
//! ([`etcd`]) for the coordinator's store and HA tests, plus a raw
//! protocol client ([`raw`]) for tests that need exact bytes, and an HTTP service
//! ([`service`]) for the tests of HTTP branches.
//!
//! Each [`MariaDb`] runs in its own temporary data directory copied from a shared,
//! pre-initialised template, listens on a free loopback port and is SIGKILLed when it
//! is dropped or when the test process dies.

pub mod etcd;
pub mod layers;
pub mod netns;
pub mod raw;
pub mod service;
mod spawn;
mod template;

use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use mysql_async::OptsBuilder;
use tempfile::TempDir;
use tokio::time::Instant;

pub use spawn::{free_port, spawn_tied};

/// Account with all privileges (and GRANT OPTION) on every server, for `'%'` and
/// `'localhost'`, authenticating with `mysql_native_password`.
pub const APP_USER: &str = "app";
pub const APP_PASSWORD: &str = "app-secret";

/// How long a server may take to accept connections before start fails.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// Start attempts when the free port we picked was taken before mariadbd bound it.
const PORT_ATTEMPTS: usize = 5;
/// Unix socket paths are limited to 108 bytes including the terminator.
const MAX_SOCKET_PATH: usize = 107;
/// Per-server directories are `$TMPDIR/<DIR_PREFIX>XXXXXX`.
const DIR_PREFIX: &str = "ferrata-mariadb-";
/// A file in each server directory that its owning process keeps flock-ed, so that
/// directories of processes that died without running `Drop` can be told apart and
/// removed.
const OWNER_LOCK: &str = "owner.lock";

/// How to start a server; `Default` suits most tests.
#[derive(Debug, Clone, Default)]
pub struct MariaDbOptions {
    /// Extra `mariadbd` flags, appended last so they override the defaults.
    pub extra_args: Vec<String>,
    /// Serve TLS with this certificate.
    pub tls: Option<ServerTls>,
}

/// PEM files for the server's TLS identity.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
}

/// A running throw-away server. Dropping it kills the server and deletes its data.
pub struct MariaDb {
    /// `None` once killed.
    child: Option<Child>,
    pid: u32,
    port: u16,
    socket: PathBuf,
    // Declared after `child` so it is removed only after `Drop` has killed the server.
    dir: TempDir,
    /// Holds the flock on [`OWNER_LOCK`] until the directory is gone.
    _owner: File,
    /// What it was started with, for a restart.
    opts: MariaDbOptions,
}

/// Connection options for `addr` over TCP only, no user: a server, or a proxy in front of one.
pub fn tcp_opts(addr: SocketAddr) -> OptsBuilder {
    OptsBuilder::default()
        .ip_or_hostname(addr.ip().to_string())
        .tcp_port(addr.port())
        // Otherwise mysql_async asks the server for its socket and silently moves the
        // connection there, bypassing whatever listens on the TCP port (the proxy).
        .prefer_socket(false)
}

/// Connection options for [`APP_USER`] on database `test` at `addr` (a server or a proxy),
/// over TCP only.
pub fn app_opts(addr: SocketAddr) -> OptsBuilder {
    tcp_opts(addr)
        .user(Some(APP_USER))
        .pass(Some(APP_PASSWORD))
        .db_name(Some("test"))
}

impl MariaDb {
    /// Starts a server with default options.
    pub async fn start() -> Result<MariaDb> {
        Self::start_with(MariaDbOptions::default()).await
    }

    /// Starts a server and waits until it accepts connections.
    pub async fn start_with(opts: MariaDbOptions) -> Result<MariaDb> {
        let template = tokio::task::spawn_blocking(|| {
            static SWEEP: Once = Once::new();
            SWEEP.call_once(|| remove_abandoned_dirs(DIR_PREFIX));
            template::template_dir()
        })
        .await??;
        let mut attempt = 1;
        loop {
            let source = template.clone();
            let (dir, owner) = tokio::task::spawn_blocking(move || -> Result<_> {
                let dir = tempfile::Builder::new().prefix(DIR_PREFIX).tempdir()?;
                let owner = claim(dir.path())?;
                template::copy_into(&source, dir.path()).context("copying the template data directory")?;
                Ok((dir, owner))
            })
            .await??;

            let port = free_port()?;
            let mut db = Self::spawn(dir, owner, port, &opts)?;
            match db.wait_ready().await {
                Ok(()) => return Ok(db),
                // Someone bound the port between free_port() and mariadbd; `db` is
                // dropped (killed, data removed) and we try again on another port.
                Err(_) if attempt < PORT_ATTEMPTS && db.port_was_taken() => attempt += 1,
                Err(err) => return Err(err),
            }
        }
    }

    fn spawn(dir: TempDir, owner: File, port: u16, opts: &MariaDbOptions) -> Result<MariaDb> {
        let (child, socket) = Self::spawn_in(dir.path(), port, opts)?;
        Ok(MariaDb {
            pid: child.id(),
            child: Some(child),
            port,
            socket,
            dir,
            _owner: owner,
            opts: opts.clone(),
        })
    }

    /// SIGKILLs the server (a crash) and starts it again on the same data and port.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        let (child, _) = Self::spawn_in(self.dir.path(), self.port, &self.opts)?;
        self.pid = child.id();
        self.child = Some(child);
        self.wait_ready().await
    }

    fn spawn_in(data: &Path, port: u16, opts: &MariaDbOptions) -> Result<(std::process::Child, PathBuf)> {
        let socket = data.join("mariadbd.sock");
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            bail!(
                "socket path {} is too long for a Unix socket; point TMPDIR at a shorter directory",
                socket.display()
            );
        }
        let log = data.join("error.log");
        // A server's own temporary directory: at start-up a server deletes every `#sql*` file
        // in its tmpdir, which would pull the temporary tables out from under servers sharing
        // /tmp (ERROR 6 "Error on delete of '/tmp/#sql-temptable-...'").
        let tmp = data.join("tmp");
        fs::create_dir_all(&tmp)?;

        let mut cmd = Command::new(mariadbd_path());
        // --no-defaults must be the first argument.
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--log-error={}", log.display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .arg(format!("--pid-file={}", data.join("mariadbd.pid").display()))
            .args([
                "--skip-name-resolve",
                // Small and lax InnoDB: fast start, and durability does not matter here.
                "--innodb-buffer-pool-size=32M",
                template::INNODB_LOG_FILE_SIZE,
                "--innodb-flush-log-at-trx-commit=2",
                "--innodb-doublewrite=0",
                "--skip-log-bin",
                "--performance-schema=OFF",
                // Tests send BLOBs larger than one 16 MiB protocol packet.
                "--max-allowed-packet=1G",
                "--local-infile=1",
                "--plugin-load-add=auth_ed25519",
                "--max-connections=1000",
                // Tests that feed garbage would otherwise get 127.0.0.1 blocked after
                // 100 failed handshakes.
                "--max-connect-errors=1000000000",
                // What Debian's packaged configuration uses; the compiled-in default
                // (latin1) would surprise anyone comparing against a real install.
                "--character-set-server=utf8mb4",
                "--collation-server=utf8mb4_general_ci",
            ]);
        if running_as_root() {
            cmd.arg("--user=root");
        }
        if let Some(tls) = &opts.tls {
            cmd.arg(format!("--ssl-cert={}", tls.cert_pem.display()))
                .arg(format!("--ssl-key={}", tls.key_pem.display()));
        }
        cmd.args(&opts.extra_args);
        // Option errors are printed before mariadbd switches to --log-error, so stderr
        // goes to the same file and error_log() shows them too.
        let stderr = File::options().create(true).append(true).open(&log)?;
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr);

        let child = spawn_tied(cmd).context("spawning mariadbd (is mariadb-server installed?)")?;
        Ok((child, socket))
    }

    /// Polls the Unix socket until the server answers a handshake. The socket is created
    /// only after the TCP port was bound, so success also means the port is ours.
    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_DEADLINE;
        let socket_opts = OptsBuilder::default()
            .socket(Some(self.socket.to_string_lossy()))
            .user(Some("root"));
        let mut delay = Duration::from_millis(10);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "mariadbd exited during startup ({status}); error log:\n{}",
                    self.error_log()
                );
            }
            let attempt = tokio::time::timeout_at(deadline, mysql_async::Conn::new(socket_opts.clone())).await;
            match attempt {
                Ok(Ok(conn)) => {
                    conn.disconnect().await?;
                    return Ok(());
                }
                Ok(Err(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(200));
                }
                Ok(Err(err)) => bail!(
                    "mariadbd did not accept connections within {START_DEADLINE:?} ({err}); error log:\n{}",
                    self.error_log()
                ),
                Err(_) => bail!(
                    "mariadbd did not accept connections within {START_DEADLINE:?}; error log:\n{}",
                    self.error_log()
                ),
            }
        }
    }

    fn port_was_taken(&self) -> bool {
        let log = self.error_log();
        log.contains("Bind on TCP/IP port") || log.contains("Address already in use")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, self.port).into()
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Connection options for [`APP_USER`] on database `test`, over TCP.
    pub fn opts(&self) -> OptsBuilder {
        app_opts(self.addr())
    }

    /// Connection options for `root` (empty password), over TCP.
    pub fn root_opts(&self) -> OptsBuilder {
        tcp_opts(self.addr()).user(Some("root"))
    }

    /// A connection made with [`MariaDb::opts`].
    pub async fn conn(&self) -> Result<mysql_async::Conn> {
        mysql_async::Conn::new(self.opts())
            .await
            .with_context(|| format!("connecting to MariaDB on port {}", self.port))
    }

    /// SIGKILLs the server and reaps it. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Errors mean it is already gone, which is what we want.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last lines of the server's error log, for failure messages.
    pub fn error_log(&self) -> String {
        const TAIL_LINES: usize = 40;
        match fs::read(self.dir.path().join("error.log")) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
            }
            Err(err) => format!("(cannot read the error log: {err})"),
        }
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Takes ownership of a fresh server directory: creates [`OWNER_LOCK`] already locked
/// (locked under a temporary name, then renamed) so no other process can ever see it
/// unlocked while we live.
pub(crate) fn claim(dir: &Path) -> Result<File> {
    let staging = dir.join(format!("{OWNER_LOCK}.new"));
    let file = File::create(&staging)?;
    flock(&file, libc::LOCK_EX | libc::LOCK_NB)?;
    fs::rename(&staging, dir.join(OWNER_LOCK))?;
    Ok(file)
}

/// Removes the server directories named `prefix...` that test processes left behind when they
/// were killed (their servers died with them through PDEATHSIG, but nobody deleted the data).
pub(crate) fn remove_abandoned_dirs(prefix: &str) {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        // No lock file: not ours, or a directory being claimed right now.
        let Ok(lock) = File::open(entry.path().join(OWNER_LOCK)) else {
            continue;
        };
        if flock(&lock, libc::LOCK_EX | libc::LOCK_NB).is_ok() {
            // Best effort: a failure only leaves garbage, as before.
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// `flock(2)` on `file`; the lock lasts until the file is closed.
pub(crate) fn flock(file: &File, operation: libc::c_int) -> std::io::Result<()> {
    // SAFETY: plain syscall on a descriptor that `file` keeps open.
    if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Debian installs mariadbd in /usr/sbin, which is not on every user's PATH.
fn mariadbd_path() -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("mariadbd"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/mariadbd"))
}

#[cfg(test)]
mod tests {
    use mysql_async::prelude::Queryable;

    use super::*;

    fn alive(pid: u32) -> bool {
        // SAFETY: signal 0 only checks that the process exists.
        unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
    }

    #[tokio::test]
    async fn two_servers_at_once_and_drop_kills() -> Result<()> {
        let (a, b) = tokio::try_join!(MariaDb::start(), MariaDb::start())?;
        assert_ne!(a.port(), b.port());

        for db in [&a, &b] {
            let mut conn = db.conn().await?;
            let port: u16 = conn.query_first("SELECT @@port").await?.unwrap();
            assert_eq!(port, db.port());
            let db_name: Option<String> = conn.query_first("SELECT DATABASE()").await?.unwrap();
            assert_eq!(db_name.as_deref(), Some("test"));
            conn.disconnect().await?;

            let mut root = mysql_async::Conn::new(db.root_opts()).await?;
            let anonymous: u64 = root
                .query_first("SELECT COUNT(*) FROM mysql.user WHERE User = ''")
                .await?
                .unwrap();
            assert_eq!(anonymous, 0);
            root.disconnect().await?;
        }

        let (pid_a, dir_a) = (a.pid(), a.data_dir().to_owned());
        let pid_b = b.pid();
        assert!(alive(pid_a) && alive(pid_b));
        drop(a);
        assert!(!alive(pid_a), "drop must kill mariadbd");
        assert!(!dir_a.exists(), "drop must remove the data directory");
        assert!(alive(pid_b), "dropping one server must not touch another");

        let mut b = b;
        b.kill();
        b.kill();
        assert!(!alive(pid_b));
        Ok(())
    }

    #[test]
    fn abandoned_dirs_are_removed_and_owned_ones_kept() -> Result<()> {
        let owned = tempfile::Builder::new().prefix(DIR_PREFIX).tempdir()?;
        let _owner = claim(owned.path())?;
        let abandoned = tempfile::Builder::new().prefix(DIR_PREFIX).tempdir()?;
        drop(claim(abandoned.path())?);

        remove_abandoned_dirs(DIR_PREFIX);
        assert!(owned.path().join(OWNER_LOCK).exists());
        assert!(!abandoned.path().exists());
        Ok(())
    }

    #[tokio::test]
    async fn tls() -> Result<()> {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
        let pem_dir = tempfile::tempdir()?;
        let tls = ServerTls {
            cert_pem: pem_dir.path().join("cert.pem"),
            key_pem: pem_dir.path().join("key.pem"),
        };
        fs::write(&tls.cert_pem, certified.cert.pem())?;
        fs::write(&tls.key_pem, certified.signing_key.serialize_pem())?;
        let db = MariaDb::start_with(MariaDbOptions {
            extra_args: Vec::new(),
            tls: Some(tls),
        })
        .await?;

        let ssl = mysql_async::SslOpts::default().with_danger_accept_invalid_certs(true);
        let mut conn = mysql_async::Conn::new(db.opts().ssl_opts(ssl)).await?;
        let (_, cipher): (String, String) = conn
            .query_first("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
            .await?
            .unwrap();
        assert!(!cipher.is_empty(), "the connection should be encrypted");
        conn.disconnect().await?;
        Ok(())
    }

    #[tokio::test]
    async fn extra_args_override_and_bad_args_fail_with_log() -> Result<()> {
        let db = MariaDb::start_with(MariaDbOptions {
            extra_args: vec!["--max-connections=77".into()],
            tls: None,
        })
        .await?;
        let mut conn = db.conn().await?;
        let max: u64 = conn.query_first("SELECT @@max_connections").await?.unwrap();
        assert_eq!(max, 77);
        conn.disconnect().await?;

        let err = MariaDb::start_with(MariaDbOptions {
            extra_args: vec!["--no-such-option=1".into()],
            tls: None,
        })
        .await
        .err()
        .expect("an unknown option must fail the start");
        assert!(
            format!("{err:#}").contains("no-such-option"),
            "error should quote the log: {err:#}"
        );
        Ok(())
    }
}
