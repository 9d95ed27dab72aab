//! Which coordinator, with which token: a flag beats the environment, which beats the config
//! file's context (`$XDG_CONFIG_HOME/ferrata/config.toml`, else `~/.config/...`):
//!
//! ```toml
//! current_context = "prod"
//!
//! [contexts.prod]
//! server = "https://tc.example.net:7091"
//! token_file = "/home/dba/.ferrata/prod.token"
//! ca_cert = "/etc/ferrata/ca.pem"
//! ```
//!
//! The token is read from a file (`--token-file`, `FERRATA_TOKEN_FILE`, the context's
//! `token_file`) or from `FERRATA_TOKEN` (for CI), never from a flag.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::args::Cli;
use crate::exit::{Failure, Result};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    current_context: Option<String>,
    #[serde(default)]
    contexts: BTreeMap<String, ContextEntry>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContextEntry {
    server: Option<String>,
    token_file: Option<PathBuf>,
    ca_cert: Option<PathBuf>,
}

/// Where and how to reach the coordinator.
#[derive(Clone, Debug)]
pub struct Target {
    pub server: String,
    pub token: Option<String>,
    pub ca_cert: Option<PathBuf>,
}

fn config_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("ferrata").join("config.toml"))
}

fn read_config(path: &Path) -> Result<ConfigFile> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|e| Failure::usage(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ConfigFile::default()),
        Err(e) => Err(Failure::error(format!("reading {}: {e}", path.display()))),
    }
}

fn read_token(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::usage(format!("reading the token file {}: {e}", path.display())))?;
    let token = text.trim().to_owned();
    if token.is_empty() {
        return Err(Failure::usage(format!("the token file {} is empty", path.display())));
    }
    Ok(token)
}

/// The coordinator the command line names, or the usage error that says how to name one.
pub fn target(cli: &Cli) -> Result<Target> {
    let file = match config_path() {
        Some(path) => read_config(&path)?,
        None => ConfigFile::default(),
    };
    let context = match cli.context.as_ref().or(file.current_context.as_ref()) {
        Some(name) => file
            .contexts
            .get(name)
            .cloned()
            .ok_or_else(|| Failure::usage(format!("no context {name:?} in the config file")))?,
        None => ContextEntry::default(),
    };
    let server = cli.server.clone().or(context.server).ok_or_else(|| {
        Failure::usage(
            "which coordinator? Give --server http://host:7091, FERRATA_SERVER, or a context in the config file",
        )
    })?;
    let token = match (
        &cli.token_file,
        std::env::var("FERRATA_TOKEN").ok(),
        &context.token_file,
    ) {
        (Some(path), _, _) => Some(read_token(path)?),
        (None, Some(token), _) if !token.trim().is_empty() => Some(token.trim().to_owned()),
        (None, _, Some(path)) => Some(read_token(path)?),
        _ => None,
    };
    Ok(Target {
        server: server.trim_end_matches('/').to_owned(),
        token,
        ca_cert: cli.ca_cert.clone().or(context.ca_cert),
    })
}
