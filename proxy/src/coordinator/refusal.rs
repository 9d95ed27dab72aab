//! What may not run in a session bound to a global transaction, and the errors that say so:
//! every mode refuses a statement it cannot protect before it runs, never runs it
//! unprotected.

use crate::classify::{Classification, Dml, Other, StatementClass, TxControl};
use crate::protocol::err::ErrPacket;

/// ER_NOT_SUPPORTED_YET, for what the proxy cannot protect.
pub fn not_protected(what: &str, xid: &str) -> ErrPacket {
    ErrPacket::new(
        1235,
        "42000",
        format!(
            "ferrata-proxy cannot protect {what} inside global transaction {xid}, so it was not run; \
             run it outside the global transaction (LEAVE GLOBAL TRANSACTION) or rewrite it"
        ),
    )
}

/// The refusal for a statement of `class` in a session bound to `xid`, if it cannot run.
/// `multi_statements`: the client enabled CLIENT_MULTI_STATEMENTS. Without it the server takes
/// the whole string as one statement: a `;` either belongs to it (a compound statement, a
/// procedure body) or makes the server refuse it with a syntax error before anything runs,
/// so the statement's own class decides.
pub fn refusal(class: &Classification, multi_statements: bool, xid: &str) -> Option<ErrPacket> {
    let what = match class.class {
        _ if class.multi_statement && multi_statements => "a multi-statement string",
        StatementClass::Dml(_) | StatementClass::LockingRead if class.set_statement.is_some() => {
            "SET STATEMENT ... FOR a write or a locking read (its variables would not apply to the proxy's own reads \
             of the rows); set them with SET SESSION before the statement instead"
        }
        StatementClass::Dml(Dml::LoadData) => "LOAD DATA",
        StatementClass::Other(Other::Ddl) => "DDL",
        StatementClass::Other(Other::Procedural) => {
            "CALL, PREPARE/EXECUTE or a compound statement (the proxy cannot see what they run)"
        }
        StatementClass::Other(Other::Unknown) => "a statement it does not recognise",
        StatementClass::TransactionControl(TxControl::Xa) => "XA statements",
        StatementClass::TransactionControl(TxControl::LockTables) => "LOCK TABLES",
        _ => return None,
    };
    Some(not_protected(what, xid))
}

/// The refusal for BEGIN or SET autocommit while a local transaction with protected writes
/// is open: both would commit it behind the proxy's back.
pub fn implicit_commit(xid: &str) -> ErrPacket {
    not_protected(
        "a statement that commits the open local transaction implicitly (BEGIN, SET autocommit); send COMMIT first",
        xid,
    )
}

/// The refusal for an execute with more COM_STMT_SEND_LONG_DATA than the proxy keeps.
pub fn long_data(xid: &str) -> ErrPacket {
    not_protected(
        "a prepared statement with more long data (COM_STMT_SEND_LONG_DATA) than max_packet_size",
        xid,
    )
}

/// The refusal for a bulk execute (COM_STMT_BULK_EXECUTE): its rows are not imaged.
pub fn bulk_execute(xid: &str) -> ErrPacket {
    not_protected(
        "a bulk execute (COM_STMT_BULK_EXECUTE, array binding): send one execute per row (MariaDB Connector/J: \
         useBulkStmts=false)",
        xid,
    )
}

/// The refusal for an execute whose parameters the proxy cannot read.
pub fn unreadable_params(xid: &str) -> ErrPacket {
    not_protected(
        "this execute: its parameters could not be read (types never sent, or a malformed packet)",
        xid,
    )
}

/// The XID a statement's `/*+ XID('...') */` hint names, if any.
pub fn hinted_xid(sql: &[u8], class: &Classification) -> Option<String> {
    class
        .xid_hint
        .clone()
        .map(|r| String::from_utf8_lossy(&sql[r]).into_owned())
}
