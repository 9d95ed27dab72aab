//! The pristine data directory that every throw-away server starts from: built once
//! with `mariadb-install-db` (users and the `test` database included), shared between
//! processes, and copied per server.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

use crate::{APP_PASSWORD, APP_USER};

/// Redo log size for the template and every server started from it. The default (96M)
/// would make each per-server copy ~110 MiB; a server started with a different size
/// resizes the log on startup, so `extra_args` may still override it.
pub(crate) const INNODB_LOG_FILE_SIZE: &str = "--innodb-log-file-size=16M";

/// Run by the bootstrap server. Grant tables are not loaded in bootstrap mode, so
/// `CREATE USER` fails until `FLUSH PRIVILEGES` loads them.
fn setup_sql() -> String {
    format!(
        "FLUSH PRIVILEGES;\n\
         -- Anonymous users would shadow TCP logins; the hostname-bound root account only\n\
         -- produces a warning on every start under skip-name-resolve.\n\
         DELETE FROM mysql.global_priv WHERE User = '' OR (User = 'root' AND Host = @@hostname);\n\
         DELETE FROM mysql.proxies_priv WHERE User = '' OR (User = 'root' AND Host = @@hostname);\n\
         CREATE USER '{APP_USER}'@'%' IDENTIFIED BY '{APP_PASSWORD}';\n\
         CREATE USER '{APP_USER}'@'localhost' IDENTIFIED BY '{APP_PASSWORD}';\n\
         GRANT ALL PRIVILEGES ON *.* TO '{APP_USER}'@'%' WITH GRANT OPTION;\n\
         GRANT ALL PRIVILEGES ON *.* TO '{APP_USER}'@'localhost' WITH GRANT OPTION;\n\
         CREATE DATABASE test CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci;\n"
    )
}

fn install_args() -> Vec<&'static str> {
    // `--no-defaults` must come first: install-db hands it to the bootstrap server.
    let mut args = vec![
        "--no-defaults",
        "--auth-root-authentication-method=normal",
        "--skip-test-db",
        "--skip-name-resolve",
        INNODB_LOG_FILE_SIZE,
    ];
    if crate::running_as_root() {
        args.push("--user=root");
    }
    args
}

/// Path of the template data directory, building it if no process has done so yet.
/// Blocking: call from a blocking-capable thread.
pub(crate) fn template_dir() -> Result<PathBuf> {
    // Serialises the threads of this process; the flock below serialises processes.
    static CACHED: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut cached = CACHED.lock().unwrap_or_else(|poison| poison.into_inner());
    if let Some(dir) = cached.as_ref() {
        return Ok(dir.clone());
    }

    let version = mariadbd_version()?;
    let sql = setup_sql();
    let args = install_args();
    // The key changes whenever the server or what we put into the template changes, so
    // a stale template from an older testkit or mariadbd is never reused.
    let fingerprint = fnv1a([version.as_str(), sql.as_str()].into_iter().chain(args.iter().copied()));
    let release: String = version
        .split_whitespace()
        .skip_while(|word| *word != "Ver")
        .nth(1)
        .unwrap_or("unknown")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '_' })
        .collect();
    let key = format!("{release}-{fingerprint:016x}");

    // Per user: the template is private to its owner (install-db makes it 0700).
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let root = std::env::temp_dir().join(format!("ferrata-testkit-{uid}"));
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let dir = root.join(&key);
    if !dir.is_dir() {
        let lock = File::create(root.join(format!("{key}.lock")))?;
        // Released when `lock` is closed at the end of this function.
        crate::flock(&lock, libc::LOCK_EX).context("locking the template directory")?;
        // Another process may have built it while we waited for the lock.
        if !dir.is_dir() {
            build(&root, &dir, &sql, &args)?;
        }
    }
    *cached = Some(dir.clone());
    Ok(dir)
}

/// Builds the template in a staging directory next to `dir` and renames it into place,
/// so `dir` either does not exist or is complete, even if this process dies midway.
fn build(root: &Path, dir: &Path, sql: &str, args: &[&str]) -> Result<()> {
    let staging = tempfile::Builder::new().prefix(".staging-").tempdir_in(root)?;
    let sql_file = staging.path().join("setup.sql");
    fs::write(&sql_file, sql)?;
    let data = staging.path().join("data");
    let output = Command::new("mariadb-install-db")
        .args(args)
        .arg(format!("--datadir={}", data.display()))
        .arg(format!("--extra-file={}", sql_file.display()))
        .output()
        .context("running mariadb-install-db (is mariadb-server installed?)")?;
    if !output.status.success() {
        bail!(
            "mariadb-install-db failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    fs::rename(&data, dir).with_context(|| format!("moving the template to {}", dir.display()))
}

fn mariadbd_version() -> Result<String> {
    let output = Command::new(crate::mariadbd_path())
        .arg("--version")
        .output()
        .context("running mariadbd --version (is mariadb-server installed?)")?;
    if !output.status.success() {
        bail!("mariadbd --version failed: {}", output.status);
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Stable across Rust releases, unlike `DefaultHasher`, which matters for a key that
/// different test binaries (maybe built by different toolchains) must agree on.
fn fnv1a<'a>(parts: impl Iterator<Item = &'a str>) -> u64 {
    parts
        .flat_map(|part| part.bytes().chain([0]))
        .fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        })
}

/// Copies the template's contents into the (existing, empty) per-server directory.
pub(crate) fn copy_into(template: &Path, dest: &Path) -> io::Result<()> {
    for entry in fs::read_dir(template)? {
        let entry = entry?;
        let target = dest.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            fs::create_dir(&target)?;
            copy_into(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}
