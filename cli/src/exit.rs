//! Failures and exit codes. Errors go to stderr (with `-o json`, the API's error body), so
//! stdout is empty or valid output.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success (an empty list too) |
//! | 1 | an error: the server, the network, the database |
//! | 2 | usage: bad flags, a missing reason, no terminal to confirm on without `--yes` |
//! | 3 | precondition failed: what you saw changed, or is still dirty |
//! | 4 | not found |
//! | 5 | unauthenticated or forbidden |
//! | 6 | attention needed: something matched, with `--fail-if-any` |

use serde_json::Value;

use crate::args::Output;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    Ok = 0,
    Error = 1,
    Usage = 2,
    Precondition = 3,
    NotFound = 4,
    Denied = 5,
    Attention = 6,
}

/// Why a command failed, and how to say it.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
    /// The API's error body, when the server refused.
    pub body: Option<Value>,
}

impl Failure {
    pub fn new(exit: Exit, message: impl Into<String>) -> Failure {
        Failure {
            exit,
            message: message.into(),
            body: None,
        }
    }

    pub fn usage(message: impl Into<String>) -> Failure {
        Failure::new(Exit::Usage, message)
    }

    pub fn error(message: impl Into<String>) -> Failure {
        Failure::new(Exit::Error, message)
    }

    /// A refusal of the API: the exit code its stable error code stands for.
    pub fn from_api(status: u16, body: Value) -> Failure {
        let code = body["code"].as_str().unwrap_or("");
        let exit = match code {
            "precondition_failed" => Exit::Precondition,
            "global_not_found" | "branch_not_found" | "not_found" => Exit::NotFound,
            "unauthenticated" | "forbidden" => Exit::Denied,
            "invalid_argument" | "reason_required" => Exit::Usage,
            _ => Exit::Error,
        };
        let message = match body["message"].as_str() {
            Some(m) => format!("{code}: {m}"),
            None => format!("the server answered {status}: {body}"),
        };
        Failure {
            exit,
            message,
            body: Some(body),
        }
    }

    pub fn report(&self, output: Output) {
        match (&self.body, output) {
            (Some(body), Output::Json) => eprintln!("{body}"),
            (None, Output::Json) => eprintln!("{}", serde_json::json!({ "code": "cli", "message": self.message })),
            _ => eprintln!("ferrata: {}", self.message),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Failure {
        Failure::error(format!("{e:#}"))
    }
}

pub type Result<T = Exit> = std::result::Result<T, Failure>;
