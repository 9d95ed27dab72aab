//! Protocol constants: command bytes, capability flags (including MariaDB's extended ones)
//! and server status flags.

/// Capability flags, as one 64-bit set: the low 32 bits are the standard MySQL flags, the
/// high 32 bits MariaDB's extended flags (sent in otherwise reserved handshake bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities(pub u64);

impl Capabilities {
    /// Bit 0: MySQL's CLIENT_LONG_PASSWORD, which MariaDB calls CLIENT_MYSQL. When a MariaDB
    /// server or client leaves it clear, the extended capability bytes are present.
    pub const CLIENT_MYSQL: u64 = 1;
    pub const FOUND_ROWS: u64 = 1 << 1;
    pub const CONNECT_WITH_DB: u64 = 1 << 3;
    pub const COMPRESS: u64 = 1 << 5;
    pub const LOCAL_FILES: u64 = 1 << 7;
    pub const PROTOCOL_41: u64 = 1 << 9;
    pub const SSL: u64 = 1 << 11;
    pub const SECURE_CONNECTION: u64 = 1 << 15;
    pub const MULTI_STATEMENTS: u64 = 1 << 16;
    pub const MULTI_RESULTS: u64 = 1 << 17;
    pub const PS_MULTI_RESULTS: u64 = 1 << 18;
    pub const PLUGIN_AUTH: u64 = 1 << 19;
    pub const CONNECT_ATTRS: u64 = 1 << 20;
    pub const PLUGIN_AUTH_LENENC_DATA: u64 = 1 << 21;
    pub const SESSION_TRACK: u64 = 1 << 23;
    pub const DEPRECATE_EOF: u64 = 1 << 24;
    pub const ZSTD_COMPRESSION: u64 = 1 << 26;
    pub const QUERY_ATTRIBUTES: u64 = 1 << 27;
    pub const MARIADB_PROGRESS: u64 = 1 << 32;
    pub const MARIADB_COM_MULTI: u64 = 1 << 33;
    pub const MARIADB_STMT_BULK_OPERATIONS: u64 = 1 << 34;
    pub const MARIADB_EXTENDED_METADATA: u64 = 1 << 35;
    pub const MARIADB_CACHE_METADATA: u64 = 1 << 36;

    /// What the proxy cannot follow in a byte stream it has to read: compression changes the
    /// framing, query attributes change command layouts. TLS is decided separately.
    /// (Followed: progress reports, ERR packets with code 0xFFFF that do not end a response;
    /// cached metadata, a byte after the column count; bulk execute, whose response is an
    /// execute's and whose parameters the proxy never reads: it refuses a bulk execute it
    /// would have to protect.)
    pub const UNSUPPORTED: u64 =
        Self::COMPRESS | Self::ZSTD_COMPRESSION | Self::QUERY_ATTRIBUTES | Self::MARIADB_COM_MULTI;

    pub fn has(self, flag: u64) -> bool {
        self.0 & flag != 0
    }

    /// Sets or clears `flag`.
    pub fn set(&mut self, flag: u64, on: bool) {
        if on {
            self.0 |= flag;
        } else {
            self.0 &= !flag;
        }
    }

    pub fn low(self) -> u32 {
        self.0 as u32
    }

    pub fn high(self) -> u32 {
        (self.0 >> 32) as u32
    }

    pub fn from_parts(low: u32, high: u32) -> Self {
        Capabilities(u64::from(low) | (u64::from(high) << 32))
    }
}

/// Server status flags carried by OK and EOF packets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerStatus(pub u16);

impl ServerStatus {
    pub const IN_TRANS: u16 = 0x0001;
    pub const AUTOCOMMIT: u16 = 0x0002;
    pub const MORE_RESULTS_EXISTS: u16 = 0x0008;
    pub const CURSOR_EXISTS: u16 = 0x0040;
    pub const LAST_ROW_SENT: u16 = 0x0080;
    pub const NO_BACKSLASH_ESCAPES: u16 = 0x0200;

    pub fn has(self, flag: u16) -> bool {
        self.0 & flag != 0
    }
}

/// Command bytes (the first payload byte of a client command packet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Command;

impl Command {
    pub const QUIT: u8 = 0x01;
    pub const INIT_DB: u8 = 0x02;
    pub const QUERY: u8 = 0x03;
    pub const FIELD_LIST: u8 = 0x04;
    pub const STATISTICS: u8 = 0x09;
    pub const PING: u8 = 0x0e;
    pub const CHANGE_USER: u8 = 0x11;
    pub const BINLOG_DUMP: u8 = 0x12;
    pub const STMT_PREPARE: u8 = 0x16;
    pub const STMT_EXECUTE: u8 = 0x17;
    pub const STMT_SEND_LONG_DATA: u8 = 0x18;
    pub const STMT_CLOSE: u8 = 0x19;
    pub const STMT_RESET: u8 = 0x1a;
    pub const SET_OPTION: u8 = 0x1b;
    pub const STMT_FETCH: u8 = 0x1c;
    /// MariaDB's COM_STMT_BULK_EXECUTE: one prepared statement, many parameter rows.
    pub const STMT_BULK_EXECUTE: u8 = 0xfa;
    pub const BINLOG_DUMP_GTID: u8 = 0x1e;
    pub const RESET_CONNECTION: u8 = 0x1f;

    /// A short stable name for metrics labels and logs.
    pub fn name(byte: u8) -> &'static str {
        match byte {
            0x00 => "sleep",
            Self::QUIT => "quit",
            Self::INIT_DB => "init_db",
            Self::QUERY => "query",
            Self::FIELD_LIST => "field_list",
            0x05 => "create_db",
            0x06 => "drop_db",
            0x07 => "refresh",
            0x08 => "shutdown",
            Self::STATISTICS => "statistics",
            0x0a => "process_info",
            0x0c => "process_kill",
            0x0d => "debug",
            0x0e => "ping",
            Self::CHANGE_USER => "change_user",
            Self::BINLOG_DUMP => "binlog_dump",
            0x15 => "register_slave",
            Self::STMT_PREPARE => "stmt_prepare",
            Self::STMT_EXECUTE => "stmt_execute",
            Self::STMT_SEND_LONG_DATA => "stmt_send_long_data",
            Self::STMT_CLOSE => "stmt_close",
            Self::STMT_RESET => "stmt_reset",
            Self::SET_OPTION => "set_option",
            Self::STMT_FETCH => "stmt_fetch",
            Self::BINLOG_DUMP_GTID => "binlog_dump_gtid",
            Self::RESET_CONNECTION => "reset_connection",
            0xfa => "stmt_bulk_execute",
            _ => "other",
        }
    }

    /// Every name [`Command::name`] can return, so metrics can be registered up front.
    pub const NAMES: [&'static str; 28] = [
        "sleep",
        "quit",
        "init_db",
        "query",
        "field_list",
        "create_db",
        "drop_db",
        "refresh",
        "shutdown",
        "statistics",
        "process_info",
        "process_kill",
        "debug",
        "ping",
        "change_user",
        "binlog_dump",
        "register_slave",
        "stmt_prepare",
        "stmt_execute",
        "stmt_send_long_data",
        "stmt_close",
        "stmt_reset",
        "set_option",
        "stmt_fetch",
        "binlog_dump_gtid",
        "reset_connection",
        "stmt_bulk_execute",
        "other",
    ];
}

/// COM_SET_OPTION's argument, as sent (a little-endian u16).
pub struct SetOption;

impl SetOption {
    pub const MULTI_STATEMENTS_ON: [u8; 2] = [0, 0];
    pub const MULTI_STATEMENTS_OFF: [u8; 2] = [1, 0];
}
