//! `TcError`: every refusal the coordinator gives, with its stable code, a message that says
//! what happened and what to do, and the holder XID or current status where they help.
//! `grpc.rs` and `http.rs` turn it into their wire forms.

use ferrata_rpc::ErrorCode;

use crate::model::GlobalStatus;
use crate::store::StoreError;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcError {
    pub code: ErrorCode,
    pub message: String,
    /// For lock errors: the XID holding the rows.
    pub holder: Option<String>,
    /// For status errors: the transaction's current status.
    pub status: Option<GlobalStatus>,
    /// For a refused repair: the rows as they are now.
    pub detail: Option<serde_json::Value>,
}

impl TcError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> TcError {
        TcError {
            code,
            message: message.into(),
            holder: None,
            status: None,
            detail: None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> TcError {
        TcError::new(ErrorCode::InvalidArgument, message)
    }

    pub fn not_found(xid: &str) -> TcError {
        TcError::new(
            ErrorCode::GlobalNotFound,
            format!(
                "global transaction {xid} does not exist: it was never begun here, or it finished and is no longer remembered"
            ),
        )
    }

    /// The transaction is in `status`, which does not allow `what`.
    pub fn status_invalid(xid: &str, status: GlobalStatus, what: &str) -> TcError {
        TcError {
            status: Some(status),
            ..TcError::new(
                ErrorCode::GlobalStatusInvalid,
                format!("cannot {what}: global transaction {xid} is {}", status.as_str()),
            )
        }
    }

    pub fn with_holder(mut self, holder: String) -> TcError {
        self.holder = Some(holder);
        self
    }

    pub fn shutting_down() -> TcError {
        TcError::new(
            ErrorCode::ShuttingDown,
            "the coordinator is shutting down; retry against another node or after it restarts",
        )
    }

    pub fn to_status(&self) -> tonic::Status {
        self.code.status(self.message.clone(), self.holder.as_deref())
    }
}

impl From<StoreError> for TcError {
    fn from(e: StoreError) -> TcError {
        TcError::new(
            ErrorCode::StoreFailed,
            format!(
                "the coordinator could not make the change durable ({e}); it was not applied. The operator must check the data directory and restart the coordinator"
            ),
        )
    }
}

impl std::fmt::Display for TcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for TcError {}
