//! The MySQL/MariaDB client/server protocol, as far as the proxy needs to understand it.
//!
//! The proxy relays bytes; these modules only decode the few fields it must read (packet
//! headers, capability and status flags, the first bytes of responses) and build the few
//! packets it writes itself (ERR packets, the masked handshake). Decoding is kept apart from
//! connection logic, one packet kind per file.

pub mod constants;
pub mod err;
pub mod execute;
pub mod frame;
pub mod handshake;
pub mod lenenc;
pub mod ok;
pub mod response;
pub mod resultset;

pub use constants::{Capabilities, Command, ServerStatus, SetOption};
