//! ferrata-tc: Ferrata's transaction coordinator. This is the skeleton the foundation
//! needs (configuration and a process that starts and stops cleanly); the coordinator
//! itself (global transactions, branches, global locks, phase 2) is the next piece of work.

pub mod lock_key;
pub mod locks;
pub mod model;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// Coordinator settings, from a TOML file and flags.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// gRPC address for proxies and transaction managers.
    pub listen: SocketAddr,
    /// HTTP address for the JSON API, metrics and health.
    pub http: SocketAddr,
    /// Where the durable store lives.
    pub data_dir: PathBuf,
    /// This node's id, part of every XID it issues.
    pub node_id: u16,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8091".parse().expect("valid address"),
            http: "127.0.0.1:7091".parse().expect("valid address"),
            data_dir: PathBuf::from("./ferrata-data"),
            node_id: 1,
        }
    }
}

impl Config {
    pub fn from_toml(text: &str) -> anyhow::Result<Config> {
        Ok(toml::from_str(text)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
        let c = Config::from_toml("node_id = 7\ndata_dir = \"/var/lib/ferrata\"").unwrap();
        assert_eq!((c.node_id, c.data_dir), (7, PathBuf::from("/var/lib/ferrata")));
        assert!(Config::from_toml("nodeid = 7").is_err());
    }
}
