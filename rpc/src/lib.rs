//! What Ferrata's proxy and coordinator both speak: the generated gRPC protocol
//! (`proto/ferrata.proto`), the stable error codes the coordinator attaches to its errors,
//! the bearer-token plumbing, TLS setup, and the process plumbing both binaries share
//! (`process`: secrets, logging, runtime, signals, the metrics recorder), and the delivery
//! policies of messages (`policy`), which the proxy checks where the coordinator applies them.

pub mod calls;
pub mod client;
pub mod policy;
pub mod process;
pub mod tls;
pub mod url;

pub mod pb {
    tonic::include_proto!("ferrata.v1");

    impl BranchOutcome {
        /// A resource manager's answer for one branch of a phase-2 command.
        pub fn of(branch_id: u64, status: BranchStatus, reason: impl Into<String>) -> BranchOutcome {
            BranchOutcome {
                branch_id,
                status: status as i32,
                reason: reason.into(),
                ..Default::default()
            }
        }
    }

    impl CallError {
        /// A refused call's status, to send as the call's answer on a stream.
        pub fn of(status: &tonic::Status) -> CallError {
            let entry = |key| {
                status
                    .metadata()
                    .get(key)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned()
            };
            CallError {
                code: status.code() as i32,
                message: status.message().to_owned(),
                ferrata_code: entry(super::CODE_KEY),
                holder: entry(super::HOLDER_KEY),
            }
        }

        /// The status the unary call would have returned.
        pub fn into_status(self) -> tonic::Status {
            let mut status = tonic::Status::new(tonic::Code::from(self.code), self.message);
            for (key, value) in [(super::CODE_KEY, self.ferrata_code), (super::HOLDER_KEY, self.holder)] {
                if let Ok(value) = tonic::metadata::MetadataValue::try_from(value)
                    && !value.is_empty()
                {
                    status.metadata_mut().insert(key, value);
                }
            }
            status
        }
    }
}

use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Code, Request, Status};

/// Metadata key of the machine-readable error code on every coordinator error.
pub const CODE_KEY: &str = "ferrata-code";
/// Metadata key of the XID holding the rows, on lock errors.
pub const HOLDER_KEY: &str = "ferrata-holder";

/// The coordinator's error codes: stable strings for programs, each with the gRPC code and
/// HTTP status it travels with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// A field is missing, malformed or out of range.
    InvalidArgument,
    /// No token, or the wrong one.
    Unauthenticated,
    /// The XID is unknown: never issued, or finished and forgotten.
    GlobalNotFound,
    /// The global transaction is not in a status that allows the request.
    GlobalStatusInvalid,
    /// The branch id is unknown within its global transaction.
    BranchNotFound,
    /// Rows stayed held by another global transaction past the caller's wait.
    LockWaitTimeout,
    /// Rows are held by a global transaction that is rolling back: the caller should roll
    /// back its local transaction so the rollback can take the database row locks.
    LockHolderRollingBack,
    /// Waiting would close a cycle of global transactions waiting for each other; the
    /// youngest is refused.
    Deadlock,
    /// The durable store failed; the request was not acknowledged.
    StoreFailed,
    /// The coordinator is shutting down.
    ShuttingDown,
    /// This coordinator node stands by while another one is active (several nodes on etcd).
    Standby,
    /// The cluster's lock authority could not be reached, or changed while the call
    /// waited; nothing was taken.
    LockAuthorityUnavailable,
    /// Several serving nodes: the XID belongs to a namespace this node does not serve; its
    /// calls go to the node that does (the XID's node id names its home node).
    WrongNode,
    /// A resource manager's stream broke the protocol.
    RmProtocol,
    /// The HTTP route does not exist.
    NotFound,
    /// The HTTP route exists, but not for this method.
    MethodNotAllowed,
    /// The caller's role does not allow the request.
    Forbidden,
    /// What the caller saw changed since (the transaction's version, a row's digest): look
    /// again before acting.
    PreconditionFailed,
    /// An operator action without a reason.
    ReasonRequired,
    /// Something of that name exists already (a token).
    AlreadyExists,
    /// The proxy could not carry out an operator's repair (it is not attached, the database
    /// refused, the rows did not read back as restored); nothing was changed.
    RepairFailed,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 21] = [
        ErrorCode::InvalidArgument,
        ErrorCode::Unauthenticated,
        ErrorCode::GlobalNotFound,
        ErrorCode::GlobalStatusInvalid,
        ErrorCode::BranchNotFound,
        ErrorCode::LockWaitTimeout,
        ErrorCode::LockHolderRollingBack,
        ErrorCode::Deadlock,
        ErrorCode::StoreFailed,
        ErrorCode::ShuttingDown,
        ErrorCode::Standby,
        ErrorCode::LockAuthorityUnavailable,
        ErrorCode::WrongNode,
        ErrorCode::RmProtocol,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::Forbidden,
        ErrorCode::PreconditionFailed,
        ErrorCode::ReasonRequired,
        ErrorCode::AlreadyExists,
        ErrorCode::RepairFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::GlobalNotFound => "global_not_found",
            ErrorCode::GlobalStatusInvalid => "global_status_invalid",
            ErrorCode::BranchNotFound => "branch_not_found",
            ErrorCode::LockWaitTimeout => "lock_wait_timeout",
            ErrorCode::LockHolderRollingBack => "lock_holder_rolling_back",
            ErrorCode::Deadlock => "deadlock",
            ErrorCode::StoreFailed => "store_failed",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Standby => "standby",
            ErrorCode::LockAuthorityUnavailable => "lock_authority_unavailable",
            ErrorCode::WrongNode => "wrong_node",
            ErrorCode::RmProtocol => "rm_protocol",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::PreconditionFailed => "precondition_failed",
            ErrorCode::ReasonRequired => "reason_required",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::RepairFailed => "repair_failed",
        }
    }

    pub fn parse(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == s)
    }

    pub fn grpc_code(self) -> Code {
        match self {
            ErrorCode::InvalidArgument | ErrorCode::RmProtocol | ErrorCode::ReasonRequired => Code::InvalidArgument,
            ErrorCode::Unauthenticated => Code::Unauthenticated,
            ErrorCode::Forbidden => Code::PermissionDenied,
            ErrorCode::PreconditionFailed => Code::FailedPrecondition,
            ErrorCode::AlreadyExists => Code::AlreadyExists,
            ErrorCode::GlobalNotFound | ErrorCode::BranchNotFound | ErrorCode::NotFound => Code::NotFound,
            ErrorCode::GlobalStatusInvalid | ErrorCode::WrongNode => Code::FailedPrecondition,
            ErrorCode::LockWaitTimeout | ErrorCode::LockHolderRollingBack | ErrorCode::Deadlock => Code::Aborted,
            ErrorCode::StoreFailed => Code::Internal,
            ErrorCode::RepairFailed => Code::Aborted,
            ErrorCode::ShuttingDown | ErrorCode::Standby | ErrorCode::LockAuthorityUnavailable => Code::Unavailable,
            ErrorCode::MethodNotAllowed => Code::Unimplemented,
        }
    }

    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidArgument | ErrorCode::RmProtocol | ErrorCode::ReasonRequired => 400,
            ErrorCode::Unauthenticated => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::PreconditionFailed | ErrorCode::AlreadyExists => 409,
            ErrorCode::GlobalNotFound | ErrorCode::BranchNotFound | ErrorCode::NotFound => 404,
            ErrorCode::GlobalStatusInvalid | ErrorCode::LockWaitTimeout | ErrorCode::LockHolderRollingBack => 409,
            ErrorCode::Deadlock => 409,
            ErrorCode::StoreFailed => 500,
            ErrorCode::RepairFailed => 502,
            ErrorCode::ShuttingDown | ErrorCode::Standby | ErrorCode::LockAuthorityUnavailable => 503,
            ErrorCode::MethodNotAllowed => 405,
            // Misdirected Request: the same request succeeds at the node serving the XID.
            ErrorCode::WrongNode => 421,
        }
    }

    /// A gRPC status carrying this code (and the holder XID, for lock errors).
    pub fn status(self, message: impl Into<String>, holder: Option<&str>) -> Status {
        let mut status = Status::new(self.grpc_code(), message);
        status
            .metadata_mut()
            .insert(CODE_KEY, MetadataValue::from_static(self.as_str()));
        if let Some(value) = holder.and_then(|h| MetadataValue::try_from(h).ok()) {
            status.metadata_mut().insert(HOLDER_KEY, value);
        }
        status
    }

    /// The coordinator's code on a status, if it carries one.
    pub fn of(status: &Status) -> Option<ErrorCode> {
        status
            .metadata()
            .get(CODE_KEY)?
            .to_str()
            .ok()
            .and_then(ErrorCode::parse)
    }
}

/// The holder XID on a lock error, if any.
pub fn holder_of(status: &Status) -> Option<String> {
    Some(status.metadata().get(HOLDER_KEY)?.to_str().ok()?.to_owned())
}

/// Client-side interceptor that adds `authorization: Bearer <token>` to every call when a
/// token is configured.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    pub fn new(token: Option<&str>) -> Result<BearerToken, String> {
        match token {
            None => Ok(BearerToken(None)),
            Some(t) => MetadataValue::try_from(format!("Bearer {t}"))
                .map(|v| BearerToken(Some(v)))
                .map_err(|_| "the token must be printable ASCII".to_owned()),
        }
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A protocol enum name as the coordinator's HTTP API and logs write it: `ASYNC_COMMITTING`
/// becomes `AsyncCommitting`.
pub fn camel_case(screaming: &str) -> String {
    screaming
        .split('_')
        .map(|w| {
            let mut chars = w.chars();
            chars
                .next()
                .map_or_else(String::new, |c| c.to_string() + &chars.as_str().to_ascii_lowercase())
        })
        .collect()
}

/// The name of a global status number, as the HTTP API writes it.
pub fn global_status_name(status: i32) -> String {
    pb::GlobalStatus::try_from(status).map_or_else(|_| "Unknown".into(), |s| camel_case(s.as_str_name()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_match_the_http_api() {
        assert_eq!(
            super::global_status_name(super::pb::GlobalStatus::AsyncCommitting as i32),
            "AsyncCommitting"
        );
        assert_eq!(
            super::global_status_name(super::pb::GlobalStatus::Begin as i32),
            "Begin"
        );
        assert_eq!(super::global_status_name(99), "Unknown");
    }
}
