//! Who may do what. Every request names a caller: a named token with one role, the root token
//! of the configuration (`token` / `FERRATA_TC_TOKEN`: everything, meant to bootstrap named
//! tokens), or, when no token exists at all (only allowed on loopback), anyone on this
//! machine. Roles grant permissions; the APIs check the permission a call needs.
//!
//! Secrets are kept only as SHA-256 digests and found by digest (the root token compared in
//! constant time); they are never stored, logged or shown again after creation.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ferrata_rpc::ErrorCode;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::TcError;

/// A role a named token carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Reads transactions, locks, the audit; values of dirty rows only if the configuration
    /// allows (`[auth] viewers_see_values`).
    Viewer,
    /// A viewer that also acts on transactions: retry, resolve, repair dirty rollbacks.
    Operator,
    /// An operator that also manages tokens.
    Admin,
    /// A service that begins and ends global transactions (HTTP and gRPC).
    Application,
    /// A proxy: a resource manager (the Attach stream, branches, locks) and a transaction
    /// manager for its clients.
    Proxy,
    /// The configuration's root token, or anyone when no token exists. Not given to named
    /// tokens.
    Root,
}

/// What a call needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permission {
    Read,
    /// Read the values of rows (dirty-rollback details, undo images).
    SeeValues,
    Act,
    Administer,
    Transact,
    Resource,
    /// Another coordinator node of the cluster (the lock stream): the root token only.
    Node,
}

impl Role {
    /// The roles a named token may have.
    pub const NAMED: [Role; 5] = [
        Role::Viewer,
        Role::Operator,
        Role::Admin,
        Role::Application,
        Role::Proxy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Application => "application",
            Role::Proxy => "proxy",
            Role::Root => "root",
        }
    }

    /// A named token's role by name.
    pub fn parse(s: &str) -> Result<Role, TcError> {
        Role::NAMED.into_iter().find(|r| r.as_str() == s).ok_or_else(|| {
            let known: Vec<&str> = Role::NAMED.iter().map(|r| r.as_str()).collect();
            TcError::invalid(format!("unknown role {s:?}; use one of {}", known.join(", ")))
        })
    }

    fn grants(self, p: Permission, viewers_see_values: bool) -> bool {
        use Permission::*;
        match self {
            Role::Root => true,
            Role::Admin => matches!(p, Read | SeeValues | Act | Administer),
            Role::Operator => matches!(p, Read | SeeValues | Act),
            Role::Viewer => p == Read || (p == SeeValues && viewers_see_values),
            // An application may follow any XID, so it sees no row values; a proxy reads
            // them anyway (it writes the undo records).
            Role::Application => p == Transact,
            Role::Proxy => matches!(p, Transact | Resource | SeeValues),
        }
    }
}

/// Who made a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub name: Arc<str>,
    pub role: Role,
    viewers_see_values: bool,
    /// The digest of the named token it authenticated with (none for root and anyone).
    token: Option<[u8; 32]>,
}

impl Caller {
    pub fn may(&self, p: Permission) -> bool {
        self.role.grants(p, self.viewers_see_values)
    }

    /// `Ok` if the caller may `p`; otherwise the `forbidden` error, saying what `what` needs.
    pub fn require(&self, p: Permission, what: &str) -> Result<(), TcError> {
        if self.may(p) {
            return Ok(());
        }
        let roles: Vec<&str> = Role::NAMED
            .into_iter()
            .filter(|r| r.grants(p, false))
            .map(Role::as_str)
            .collect();
        let needs = match roles.is_empty() {
            true => "the root token (the one in the configuration)".to_owned(),
            false => format!("a token with the role {}", roles.join(" or ")),
        };
        Err(TcError::new(
            ErrorCode::Forbidden,
            format!(
                "token {:?} has the role {}, which may not {what}; that needs {needs}",
                self.name,
                self.role.as_str(),
            ),
        ))
    }
}

/// A named token as stored: its secret only as a digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub name: String,
    pub role: Role,
    pub digest: [u8; 32],
    pub created_ms: u64,
    pub created_by: String,
    /// Unix milliseconds after which it is refused.
    pub expires_ms: Option<u64>,
}

struct Entry {
    record: TokenRecord,
    last_used_ms: AtomicU64,
}

/// A token as listed: never its secret or digest.
#[derive(Clone, Debug)]
pub struct TokenInfo {
    pub record: TokenRecord,
    pub last_used_ms: Option<u64>,
}

/// The tokens the coordinator knows.
pub struct Tokens {
    root: Option<[u8; 32]>,
    named: RwLock<HashMap<[u8; 32], Arc<Entry>>>,
    viewers_see_values: bool,
    /// Whether having no token at all lets everyone in: only for a coordinator listening on
    /// loopback alone (decided at start, so revoking the last token never opens it).
    open_allowed: std::sync::atomic::AtomicBool,
}

/// The token an `Authorization` value carries: `Bearer <token>`, or `Basic` with the token as
/// the password (the user name is not checked), for clients that can only put credentials in
/// a URL (`http://shop:<token>@host/api/dtmsvr`, as DTM's Python SDK is configured). The
/// coordinator never answers `WWW-Authenticate: Basic`, so no browser keeps such credentials
/// to send them on its own (a change from another origin is refused anyway, `http.rs`).
fn secret_of(header: &str) -> Option<String> {
    use base64::Engine;
    let (scheme, value) = header.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(value.trim().to_owned());
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(value.trim()).ok()?;
    let (_user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some(password.to_owned())
}

pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// A new random secret: `ftc_` and 64 hex digits (256 bits).
pub fn new_secret() -> Result<String, TcError> {
    Ok(format!("ftc_{}", random_hex::<32>()?))
}

/// `N` random bytes in hex (secrets, ids nobody may guess or reuse).
pub fn random_hex<const N: usize>() -> Result<String, TcError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes)
        .map_err(|e| TcError::new(ErrorCode::StoreFailed, format!("the system gave no randomness: {e}")))?;
    Ok(hex(&bytes))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A name a token may have: 1 to 64 letters, digits and `._@-`.
pub fn check_name(name: &str) -> Result<(), TcError> {
    if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b)) {
        return Err(TcError::invalid(format!(
            "token name {name:?}: use 1 to 64 letters, digits and . _ @ -"
        )));
    }
    if name == Role::Root.as_str() || name == ANYONE {
        return Err(TcError::invalid(format!("token name {name:?} is reserved")));
    }
    Ok(())
}

/// The caller's name when no token exists.
const ANYONE: &str = "local";

impl Tokens {
    pub fn new(root: Option<&str>, stored: Vec<TokenRecord>, viewers_see_values: bool) -> Tokens {
        let tokens = Tokens {
            root: root.map(digest),
            named: RwLock::new(HashMap::new()),
            viewers_see_values,
            open_allowed: std::sync::atomic::AtomicBool::new(true),
        };
        for record in stored {
            tokens.insert(record);
        }
        tokens
    }

    /// No token at all: every request is let in, as `local` (only allowed on loopback).
    pub fn open(&self) -> bool {
        self.none_exists() && self.open_allowed.load(Ordering::Relaxed)
    }

    /// No token exists at all (whether or not that lets anyone in).
    pub fn none_exists(&self) -> bool {
        self.root.is_none() && self.named.read().is_empty()
    }

    /// For a coordinator listening beyond loopback: having no token never lets anyone in
    /// (every request then needs a token, and there is none until an operator restarts it
    /// with a root token).
    pub fn forbid_open(&self) {
        self.open_allowed.store(false, Ordering::Relaxed);
    }

    fn caller(&self, name: &str, role: Role) -> Caller {
        Caller {
            name: Arc::from(name),
            role,
            viewers_see_values: self.viewers_see_values,
            token: None,
        }
    }

    /// The caller an `authorization` header value names, at `now_ms`.
    pub fn authenticate(&self, header: Option<&str>, now_ms: u64) -> Result<Caller, TcError> {
        if self.open() {
            return Ok(self.caller(ANYONE, Role::Root));
        }
        let unauthenticated = |why: &str| {
            TcError::new(
                ErrorCode::Unauthenticated,
                format!("{why}: send `Authorization: Bearer <token>` with a token of this coordinator"),
            )
        };
        let Some(secret) = header.and_then(secret_of) else {
            return Err(unauthenticated("missing token"));
        };
        let given = digest(&secret);
        if self.root.is_some_and(|root| constant_time_eq(&root, &given)) {
            return Ok(self.caller(Role::Root.as_str(), Role::Root));
        }
        let entry = self.named.read().get(&given).cloned();
        let Some(entry) = entry else {
            return Err(unauthenticated("wrong or revoked token"));
        };
        if entry.record.expires_ms.is_some_and(|at| at <= now_ms) {
            return Err(unauthenticated(&format!("token {:?} has expired", entry.record.name)));
        }
        entry.last_used_ms.store(now_ms, Ordering::Relaxed);
        Ok(Caller {
            token: Some(entry.record.digest),
            ..self.caller(&entry.record.name, entry.record.role)
        })
    }

    pub fn insert(&self, record: TokenRecord) {
        let entry = Arc::new(Entry {
            record,
            last_used_ms: AtomicU64::new(0),
        });
        self.named.write().insert(entry.record.digest, entry);
    }

    pub fn get(&self, name: &str) -> Option<TokenRecord> {
        self.named
            .read()
            .values()
            .find(|e| e.record.name == name)
            .map(|e| e.record.clone())
    }

    /// Removes the token named `name`, returning it.
    pub fn remove(&self, name: &str) -> Option<TokenRecord> {
        let mut named = self.named.write();
        let digest = named.values().find(|e| e.record.name == name)?.record.digest;
        named.remove(&digest).map(|e| e.record.clone())
    }

    /// Every named token, by name.
    pub fn list(&self) -> Vec<TokenInfo> {
        let mut out: Vec<TokenInfo> = self
            .named
            .read()
            .values()
            .map(|e| TokenInfo {
                record: e.record.clone(),
                last_used_ms: Some(e.last_used_ms.load(Ordering::Relaxed)).filter(|&t| t > 0),
            })
            .collect();
        out.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        out
    }
}

impl Tokens {
    /// Whether the token a caller authenticated with still lets it in (a console session
    /// ends when its token is revoked or expires).
    pub fn still_valid(&self, caller: &Caller, now_ms: u64) -> bool {
        match caller.token {
            // The very token, not another one given the same name since.
            Some(token) => self
                .named
                .read()
                .get(&token)
                .is_some_and(|e| e.record.expires_ms.is_none_or(|at| at > now_ms)),
            None => self.root.is_some() || self.open(),
        }
    }
}

/// Console sessions: the browser holds only a random id (an HttpOnly cookie); each session
/// knows its caller and the CSRF token mutations must carry. They end after
/// [`SESSION_IDLE_MS`] without use, [`SESSION_MAX_MS`] after login, at logout, or when the
/// token they came from is revoked; a coordinator restart ends them all.
#[derive(Default)]
pub struct Sessions {
    map: parking_lot::Mutex<HashMap<String, ConsoleSession>>,
}

pub const SESSION_IDLE_MS: u64 = 30 * 60 * 1000;
pub const SESSION_MAX_MS: u64 = 12 * 60 * 60 * 1000;

struct ConsoleSession {
    caller: Caller,
    csrf: String,
    created_ms: u64,
    used_ms: u64,
}

impl Sessions {
    /// A new session for `caller`: its id (for the cookie) and CSRF token.
    pub fn create(&self, caller: Caller, now_ms: u64) -> Result<(String, String), TcError> {
        let (id, csrf) = (random_hex::<32>()?, random_hex::<32>()?);
        let mut map = self.map.lock();
        map.retain(|_, s| live(s, now_ms));
        map.insert(
            id.clone(),
            ConsoleSession {
                caller,
                csrf: csrf.clone(),
                created_ms: now_ms,
                used_ms: now_ms,
            },
        );
        Ok((id, csrf))
    }

    /// The caller and CSRF token of a live session, marking it used.
    pub fn get(&self, id: &str, now_ms: u64) -> Option<(Caller, String)> {
        let mut map = self.map.lock();
        let s = map.get_mut(id)?;
        if !live(s, now_ms) {
            map.remove(id);
            return None;
        }
        s.used_ms = now_ms;
        Some((s.caller.clone(), s.csrf.clone()))
    }

    pub fn remove(&self, id: &str) {
        self.map.lock().remove(id);
    }
}

fn live(s: &ConsoleSession, now_ms: u64) -> bool {
    now_ms < s.used_ms.saturating_add(SESSION_IDLE_MS) && now_ms < s.created_ms.saturating_add(SESSION_MAX_MS)
}

/// Equal without telling, by its time, how much of it matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str, role: Role, secret: &str, expires_ms: Option<u64>) -> TokenRecord {
        TokenRecord {
            name: name.into(),
            role,
            digest: digest(secret),
            created_ms: 1,
            created_by: "root".into(),
            expires_ms,
        }
    }

    fn who(t: &Tokens, header: Option<&str>) -> Result<(String, Role), ErrorCode> {
        t.authenticate(header, 1000)
            .map(|c| (c.name.to_string(), c.role))
            .map_err(|e| e.code)
    }

    #[test]
    fn a_coordinator_beyond_loopback_never_opens() {
        let t = Tokens::new(None, vec![named("ops", Role::Admin, "s", None)], false);
        t.forbid_open();
        t.remove("ops");
        assert!(!t.open());
        assert_eq!(
            who(&t, None),
            Err(ErrorCode::Unauthenticated),
            "revoking the last token opens nothing"
        );
    }

    #[test]
    fn without_any_token_everyone_is_local_root() {
        let t = Tokens::new(None, vec![], false);
        assert!(t.open());
        assert_eq!(who(&t, None), Ok(("local".into(), Role::Root)));
        // The first named token closes it.
        t.insert(named("alice", Role::Admin, "a", None));
        assert!(!t.open());
        assert_eq!(who(&t, None), Err(ErrorCode::Unauthenticated));
        assert_eq!(who(&t, Some("Bearer a")), Ok(("alice".into(), Role::Admin)));
    }

    #[test]
    fn root_and_named_tokens_and_their_refusals() {
        let t = Tokens::new(
            Some("s3cret"),
            vec![
                named("ops", Role::Operator, "op-secret", None),
                named("old", Role::Viewer, "old-secret", Some(1000)),
            ],
            false,
        );
        assert_eq!(who(&t, Some("Bearer s3cret")), Ok(("root".into(), Role::Root)));
        assert_eq!(who(&t, Some("Bearer op-secret")), Ok(("ops".into(), Role::Operator)));
        // The scheme is case-insensitive (RFC 9110); Basic carries the token as its password.
        assert_eq!(who(&t, Some("bearer s3cret")), Ok(("root".into(), Role::Root)));
        assert_eq!(
            who(&t, Some("Basic b3BzOm9wLXNlY3JldA==")),
            Ok(("ops".into(), Role::Operator))
        ); // "ops:op-secret"
        assert_eq!(
            who(&t, Some("basic YW55Om9wLXNlY3JldA==")),
            Ok(("ops".into(), Role::Operator))
        ); // "any:op-secret"
        for bad in [
            None,
            Some("s3cret"),
            Some("Bearer s3cre"),
            Some("Bearer old-secret"),
            Some("Token s3cret"),
            Some("Basic czNjcmV0"),         // "s3cret": no user part
            Some("Basic cm9vdDpzM2NyZQ=="), // "root:s3cre"
            Some("Basic not base64!"),
        ] {
            assert_eq!(who(&t, bad), Err(ErrorCode::Unauthenticated), "{bad:?}");
        }
        assert!(
            t.list()
                .iter()
                .any(|i| i.record.name == "ops" && i.last_used_ms == Some(1000))
        );
        assert_eq!(t.remove("ops").map(|r| r.role), Some(Role::Operator));
        assert_eq!(who(&t, Some("Bearer op-secret")), Err(ErrorCode::Unauthenticated));
    }

    #[test]
    fn roles_grant_what_they_say() {
        use Permission::*;
        let t = Tokens::new(None, vec![], false);
        let c = |role| t.caller("x", role);
        assert!(c(Role::Viewer).may(Read) && !c(Role::Viewer).may(SeeValues) && !c(Role::Viewer).may(Act));
        assert!(c(Role::Operator).may(Act) && !c(Role::Operator).may(Administer));
        assert!(c(Role::Admin).may(Administer));
        assert!(
            c(Role::Application).may(Transact) && !c(Role::Application).may(Act) && !c(Role::Application).may(Read)
        );
        assert!(!c(Role::Application).may(SeeValues), "an application may name any XID");
        assert!(c(Role::Proxy).may(Resource) && !c(Role::Proxy).may(Act));
        let e = c(Role::Application).require(Act, "resolve transactions").unwrap_err();
        assert_eq!(e.code, ErrorCode::Forbidden);
        assert!(e.message.contains("operator or admin"), "{}", e.message);
        assert!(c(Role::Root).may(Node) && Role::NAMED.iter().all(|r| !c(*r).may(Node)));
        let e = c(Role::Admin).require(Node, "act as a node").unwrap_err();
        assert!(e.message.contains("needs the root token"), "{}", e.message);
        let t = Tokens::new(None, vec![], true);
        assert!(t.caller("v", Role::Viewer).may(SeeValues));
    }

    #[test]
    fn sessions_end_when_idle_too_long_or_too_old() {
        let t = Tokens::new(None, vec![named("ops", Role::Operator, "s", None)], false);
        let caller = t.authenticate(Some("Bearer s"), 0).unwrap();
        let sessions = Sessions::default();
        let (id, csrf) = sessions.create(caller.clone(), 0).unwrap();
        assert_eq!(sessions.get(&id, 1000), Some((caller.clone(), csrf)));
        assert!(t.still_valid(&caller, 1000));
        assert_eq!(sessions.get(&id, 1000 + SESSION_IDLE_MS), None, "idle too long");
        let (id, _) = sessions.create(caller.clone(), 0).unwrap();
        for n in 1..=24 {
            assert_eq!(
                sessions.get(&id, n * SESSION_IDLE_MS / 2).is_some(),
                n * SESSION_IDLE_MS / 2 < SESSION_MAX_MS
            );
        }
        t.remove("ops");
        assert!(!t.still_valid(&caller, 1000), "its token was revoked");
        t.insert(named("ops", Role::Admin, "another", None));
        assert!(
            !t.still_valid(&caller, 1000),
            "a new token of the same name is another token"
        );
    }

    #[test]
    fn names_and_secrets() {
        assert!(check_name("alice@ops-1.x").is_ok());
        for bad in ["", "root", "local", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        let (a, b) = (new_secret().unwrap(), new_secret().unwrap());
        assert!(a.starts_with("ftc_") && a.len() == 68 && a != b);
    }
}
