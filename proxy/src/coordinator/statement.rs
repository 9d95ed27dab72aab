//! Ferrata's own SQL statements, which the proxy answers itself:
//!
//! ```sql
//! START GLOBAL TRANSACTION [TIMEOUT <ms>] [NAME '<name>'] [MODE {AT | XA}]
//! JOIN GLOBAL TRANSACTION '<xid>' [MODE {AT | XA}]
//! COMMIT GLOBAL ['<xid>']
//! ROLLBACK GLOBAL ['<xid>']
//! LEAVE GLOBAL TRANSACTION
//! SHOW GLOBAL TRANSACTION
//! BEGIN BRANCH '<gid>' '<branch_id>' '<op>' [TYPE '<trans_type>']   -- a barrier (`barrier/`)
//! ```
//!
//! Keywords are case-insensitive; comments, whitespace and one trailing `;` are allowed.
//! `MODE` says how the session's local transactions become branches (AT by default); each
//! session of a global transaction picks its own.

use crate::session::state::BranchMode;

/// One parsed statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GlobalStatement {
    Start {
        timeout_ms: Option<u64>,
        name: Option<String>,
        mode: BranchMode,
    },
    Join {
        xid: String,
        mode: BranchMode,
    },
    Commit {
        xid: Option<String>,
    },
    Rollback {
        xid: Option<String>,
    },
    Leave,
    Show,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Word(String),
    Number(u64),
    Str(String),
    Semicolon,
}

/// The tokens of `sql`; in strings a backslash escapes the next character unless the
/// session's sql_mode has NO_BACKSLASH_ESCAPES (`no_backslash_escapes`).
fn tokens(sql: &str, no_backslash_escapes: bool) -> Result<Vec<Token>, String> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'#' || (c == b'-' && b.get(i + 1) == Some(&b'-')) {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let end = sql[i + 2..].find("*/").ok_or("an unterminated comment")?;
            i += end + 4;
        } else if c == b';' {
            out.push(Token::Semicolon);
            i += 1;
        } else if c == b'\'' || c == b'"' {
            let mut value = Vec::new();
            i += 1;
            loop {
                match b.get(i) {
                    None => return Err("an unterminated string".into()),
                    Some(&q) if q == c && b.get(i + 1) == Some(&c) => {
                        value.push(c);
                        i += 2;
                    }
                    Some(&q) if q == c => {
                        i += 1;
                        break;
                    }
                    Some(&b'\\') if i + 1 < b.len() && !no_backslash_escapes => {
                        value.push(b[i + 1]);
                        i += 2;
                    }
                    Some(&other) => {
                        value.push(other);
                        i += 1;
                    }
                }
            }
            out.push(Token::Str(
                String::from_utf8(value).map_err(|_| "a string that is not UTF-8")?,
            ));
        } else if c.is_ascii_digit() {
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            out.push(Token::Number(
                sql[start..i].parse().map_err(|_| "a number out of range")?,
            ));
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push(Token::Word(sql[start..i].to_ascii_uppercase()));
        } else {
            return Err(format!("an unexpected character {:?}", c as char));
        }
    }
    if out.last() == Some(&Token::Semicolon) {
        out.pop();
    }
    Ok(out)
}

const SYNTAX: &str = "START GLOBAL TRANSACTION [TIMEOUT <ms>] [NAME '<name>'] [MODE {AT | XA}], \
                      JOIN GLOBAL TRANSACTION '<xid>' [MODE {AT | XA}], \
                      COMMIT GLOBAL ['<xid>'], ROLLBACK GLOBAL ['<xid>'], LEAVE GLOBAL TRANSACTION or SHOW GLOBAL TRANSACTION";

const MODES: &str = "MODE is AT (undo records, the default) or XA (two-phase commit by the database)";

fn branch_mode(word: &str) -> Option<BranchMode> {
    match word {
        "AT" => Some(BranchMode::At),
        "XA" => Some(BranchMode::Xa),
        _ => None,
    }
}

/// A TCC or saga handler's `BEGIN BRANCH`: the barrier of one call of its branch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BranchStatement {
    pub gid: String,
    pub branch_id: String,
    pub op: String,
    /// DTM's `trans_type`, when given (else told by the op).
    pub trans_type: Option<String>,
}

/// Parses `BEGIN BRANCH '<gid>' '<branch_id>' '<op>' [TYPE '<trans_type>']`.
pub fn parse_branch(sql: &str, no_backslash_escapes: bool) -> Result<BranchStatement, String> {
    const FORM: &str = "BEGIN BRANCH '<gid>' '<branch_id>' '<op>' [TYPE '<trans_type>'], with the values the coordinator \
                        sent in the call's query string (gid, branch_id, op, trans_type)";
    let toks = tokens(sql, no_backslash_escapes).map_err(|e| format!("the statement has {e}; the form is {FORM}"))?;
    let statement = |gid: &String, branch_id: &String, op: &String, trans_type: Option<&String>| BranchStatement {
        gid: gid.clone(),
        branch_id: branch_id.clone(),
        op: op.clone(),
        trans_type: trans_type.cloned(),
    };
    match toks.as_slice() {
        [
            Token::Word(b),
            Token::Word(w),
            Token::Str(gid),
            Token::Str(branch),
            Token::Str(op),
        ] if b == "BEGIN" && w == "BRANCH" => Ok(statement(gid, branch, op, None)),
        [
            Token::Word(b),
            Token::Word(w),
            Token::Str(gid),
            Token::Str(branch),
            Token::Str(op),
            Token::Word(t),
            Token::Str(trans_type),
        ] if b == "BEGIN" && w == "BRANCH" && t == "TYPE" => Ok(statement(gid, branch, op, Some(trans_type))),
        _ => Err(format!("the form is {FORM}")),
    }
}

/// `SEND MESSAGE`: a message for the outbox (`outbox/`), written as its row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendStatement {
    pub target: String,
    pub payload: String,
    pub delay_s: u64,
    pub key: String,
    pub policy: String,
}

/// Parses `SEND MESSAGE TO '<url>' PAYLOAD '<text>' [DELAY <seconds>] [KEY '<key>']
/// [POLICY '<policy>']` (the options in any order, each at most once).
pub fn parse_send(sql: &str, no_backslash_escapes: bool) -> Result<SendStatement, String> {
    const FORM: &str = "SEND MESSAGE TO '<url>' PAYLOAD '<text>' [DELAY <seconds>] [KEY '<key>'] [POLICY '<policy>']";
    let toks = tokens(sql, no_backslash_escapes).map_err(|e| format!("the statement has {e}; the form is {FORM}"))?;
    let (target, payload, rest) = match toks.as_slice() {
        [
            Token::Word(s),
            Token::Word(m),
            Token::Word(to),
            Token::Str(target),
            Token::Word(p),
            Token::Str(payload),
            rest @ ..,
        ] if s == "SEND" && m == "MESSAGE" && to == "TO" && p == "PAYLOAD" => (target, payload, rest),
        _ => return Err(format!("the form is {FORM}")),
    };
    let mut send = SendStatement {
        target: target.clone(),
        payload: payload.clone(),
        delay_s: 0,
        key: String::new(),
        policy: String::new(),
    };
    let (mut delay, mut key, mut policy) = (false, false, false);
    let mut rest = rest;
    loop {
        rest = match rest {
            [] | [Token::Semicolon] => return Ok(send),
            [Token::Word(w), Token::Number(n), more @ ..] if w == "DELAY" && !delay => {
                (delay, send.delay_s) = (true, *n);
                more
            }
            [Token::Word(w), Token::Str(k), more @ ..] if w == "KEY" && !key => {
                (key, send.key) = (true, k.clone());
                more
            }
            [Token::Word(w), Token::Str(p), more @ ..] if w == "POLICY" && !policy => {
                (policy, send.policy) = (true, p.clone());
                more
            }
            _ => return Err(format!("the form is {FORM}, each option at most once")),
        };
    }
}

/// Parses one statement; the error says what is wrong and shows the accepted forms.
pub fn parse(sql: &str) -> Result<GlobalStatement, String> {
    let bad = |what: &str| format!("{what}; Ferrata's statements are {SYNTAX}");
    let toks = tokens(sql, false).map_err(|e| bad(&format!("the statement has {e}")))?;
    let word = |i: usize| match toks.get(i) {
        Some(Token::Word(w)) => Some(w.as_str()),
        _ => None,
    };
    let optional_xid = |i: usize| match &toks[i..] {
        [] => Ok(None),
        [Token::Str(x)] => Ok(Some(x.clone())),
        _ => Err(bad("COMMIT GLOBAL and ROLLBACK GLOBAL take at most one quoted XID")),
    };
    match (word(0), word(1), word(2)) {
        (Some("START"), Some("GLOBAL"), Some("TRANSACTION")) => {
            let (mut timeout_ms, mut name, mut mode) = (None, None, None);
            let mut i = 3;
            while i < toks.len() {
                match (&toks[i], toks.get(i + 1)) {
                    (Token::Word(w), Some(Token::Number(n))) if w == "TIMEOUT" && timeout_ms.is_none() => {
                        timeout_ms = Some(*n)
                    }
                    (Token::Word(w), Some(Token::Str(s))) if w == "NAME" && name.is_none() => name = Some(s.clone()),
                    (Token::Word(w), Some(Token::Word(m))) if w == "MODE" && mode.is_none() => {
                        mode = Some(branch_mode(m).ok_or_else(|| bad(MODES))?)
                    }
                    _ => {
                        return Err(bad(
                            "START GLOBAL TRANSACTION takes TIMEOUT <milliseconds>, NAME '<name>' and MODE AT or XA, each at most once",
                        ));
                    }
                }
                i += 2;
            }
            Ok(GlobalStatement::Start {
                timeout_ms,
                name,
                mode: mode.unwrap_or_default(),
            })
        }
        (Some("JOIN"), Some("GLOBAL"), Some("TRANSACTION")) => match &toks[3..] {
            [Token::Str(xid)] => Ok(GlobalStatement::Join {
                xid: xid.clone(),
                mode: BranchMode::At,
            }),
            [Token::Str(xid), Token::Word(w), Token::Word(m)] if w == "MODE" => Ok(GlobalStatement::Join {
                xid: xid.clone(),
                mode: branch_mode(m).ok_or_else(|| bad(MODES))?,
            }),
            _ => Err(bad(
                "JOIN GLOBAL TRANSACTION takes the XID, quoted, and optionally MODE AT or XA",
            )),
        },
        (Some("COMMIT"), Some("GLOBAL"), _) => Ok(GlobalStatement::Commit { xid: optional_xid(2)? }),
        (Some("ROLLBACK"), Some("GLOBAL"), _) => Ok(GlobalStatement::Rollback { xid: optional_xid(2)? }),
        (Some("LEAVE"), Some("GLOBAL"), Some("TRANSACTION")) if toks.len() == 3 => Ok(GlobalStatement::Leave),
        (Some("SHOW"), Some("GLOBAL"), Some("TRANSACTION")) if toks.len() == 3 => Ok(GlobalStatement::Show),
        _ => Err(bad("this is not one of Ferrata's statements")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_message_takes_its_options_in_any_order() {
        let s = parse_send(
            "send message to 'https://b/x' payload '{\"a\": 1}' policy 'wechat' delay 5 key 'k-1'",
            false,
        )
        .unwrap();
        assert_eq!(
            (
                s.target.as_str(),
                s.payload.as_str(),
                s.delay_s,
                s.key.as_str(),
                s.policy.as_str()
            ),
            ("https://b/x", "{\"a\": 1}", 5, "k-1", "wechat")
        );
        assert!(parse_send("SEND MESSAGE TO 'u' PAYLOAD 'p' DELAY 1 DELAY 2", false).is_err());
        assert!(
            parse_send("SEND MESSAGE 'u'", false)
                .unwrap_err()
                .contains("SEND MESSAGE TO")
        );
    }

    #[test]
    fn accepted_forms() {
        use GlobalStatement::*;
        assert_eq!(
            parse("start global transaction").unwrap(),
            Start {
                timeout_ms: None,
                name: None,
                mode: BranchMode::At,
            }
        );
        assert_eq!(
            parse("START GLOBAL TRANSACTION NAME 'it''s' TIMEOUT 5000;").unwrap(),
            Start {
                timeout_ms: Some(5000),
                name: Some("it's".into()),
                mode: BranchMode::At,
            }
        );
        assert_eq!(
            parse("START GLOBAL TRANSACTION mode xa TIMEOUT 5").unwrap(),
            Start {
                timeout_ms: Some(5),
                name: None,
                mode: BranchMode::Xa,
            }
        );
        assert_eq!(
            parse("/* app */ JOIN GLOBAL TRANSACTION '1-42'").unwrap(),
            Join {
                xid: "1-42".into(),
                mode: BranchMode::At
            }
        );
        assert_eq!(
            parse("JOIN GLOBAL TRANSACTION '1-42' MODE XA").unwrap(),
            Join {
                xid: "1-42".into(),
                mode: BranchMode::Xa
            }
        );
        assert_eq!(parse("commit global").unwrap(), Commit { xid: None });
        assert_eq!(
            parse("COMMIT GLOBAL '1-7'").unwrap(),
            Commit {
                xid: Some("1-7".into())
            }
        );
        assert_eq!(
            parse("Rollback Global \"1-7\" ; ").unwrap(),
            Rollback {
                xid: Some("1-7".into())
            }
        );
        assert_eq!(parse("LEAVE GLOBAL TRANSACTION").unwrap(), Leave);
        assert_eq!(parse("show global transaction -- which one?").unwrap(), Show);
    }

    #[test]
    fn errors_say_what_is_accepted() {
        for bad in [
            "START GLOBAL TRANSACTION TIMEOUT",
            "START GLOBAL TRANSACTION TIMEOUT 5 TIMEOUT 6",
            "JOIN GLOBAL TRANSACTION 1-42",
            "COMMIT GLOBAL '1' '2'",
            "SHOW GLOBAL TRANSACTION X",
            "START GLOBAL TRANSACTION NAME 'open",
            "START GLOBAL TRANSACTION MODE TCC",
            "START GLOBAL TRANSACTION MODE XA MODE AT",
            "JOIN GLOBAL TRANSACTION '1-1' MODE",
            "JOIN GLOBAL TRANSACTION '1-1' MODE 2PC",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains("START GLOBAL TRANSACTION [TIMEOUT"), "{bad}: {e}");
        }
    }
}
