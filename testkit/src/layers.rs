//! The layering check: a crate's top-level modules are put in layers, lowest first, and a
//! module may name (`crate::x`, in `use` lines and in paths anywhere in the code) only
//! modules of a lower layer, or of its own layer when that layer says its modules may use
//! each other. Run from a test of each crate, so a dependency that points upwards (or
//! between two modes) fails the build's tests with the file and line that made it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One layer: its top-level modules (a file `x.rs` or a folder `x/`), and whether they may
/// name each other (peers that must stay apart, like two transaction modes, may not).
pub struct Layer {
    pub name: &'static str,
    pub modules: &'static [&'static str],
    pub peers_may_meet: bool,
}

/// Checks every `.rs` file under `src` against `layers` (lowest first). Returns one line per
/// offending reference: file, line, and which layer it reached. A top-level module that is
/// in no layer is an offence too, so a new module has to be placed.
pub fn check(src: &Path, layers: &[Layer]) -> Vec<String> {
    let mut place: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, layer) in layers.iter().enumerate() {
        for m in layer.modules {
            place.insert(m, i);
        }
    }
    let mut offences = Vec::new();
    for file in rust_files(src) {
        let relative = file.strip_prefix(src).expect("under src");
        let module = top_module(relative);
        let Some(&own) = place.get(module.as_str()) else {
            offences.push(format!("{}: module `{module}` is in no layer", relative.display()));
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            for target in named_modules(code) {
                if target == module {
                    continue;
                }
                let Some(&theirs) = place.get(target.as_str()) else {
                    continue;
                };
                let allowed = theirs < own || (theirs == own && layers[own].peers_may_meet);
                if !allowed {
                    offences.push(format!(
                        "{}:{}: `{module}` ({}) names `crate::{target}` ({}): dependencies run downwards only",
                        relative.display(),
                        n + 1,
                        layers[own].name,
                        layers[theirs].name
                    ));
                }
            }
        }
    }
    offences
}

/// The top-level module a file belongs to: `session/mod.rs` and `session/peer.rs` are in
/// `session`, `server.rs` in `server`, `lib.rs` in `lib`.
fn top_module(relative: &Path) -> String {
    let first = relative
        .components()
        .next()
        .expect("a file")
        .as_os_str()
        .to_string_lossy();
    first.strip_suffix(".rs").unwrap_or(&first).to_owned()
}

/// The modules a line names as `crate::<module>`, including each one inside a grouped
/// `use crate::{a, b::c}`.
fn named_modules(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let inner = group.split('}').next().unwrap_or_default();
            out.extend(inner.split(',').map(|p| ident(p.trim())).filter(|m| !m.is_empty()));
        } else {
            out.push(ident(after));
        }
        rest = after;
    }
    out
}

fn ident(s: &str) -> String {
    s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_plain_and_grouped_references() {
        assert_eq!(named_modules("use crate::session::peer::Peer;"), ["session"]);
        assert_eq!(named_modules("use crate::{at, sql::dml};"), ["at", "sql"]);
        assert_eq!(
            named_modules("let x = crate::sql::execute(b); crate::at::go()"),
            ["sql", "at"]
        );
        assert!(named_modules("use super::peer;").is_empty());
    }

    #[test]
    fn an_upward_reference_is_reported_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("core")).unwrap();
        std::fs::write(dir.path().join("core/mod.rs"), "//! core\nuse crate::mode::X;\n").unwrap();
        std::fs::write(dir.path().join("mode.rs"), "use crate::core::Y;\n").unwrap();
        std::fs::write(dir.path().join("stray.rs"), "").unwrap();
        let layers = [
            Layer {
                name: "core",
                modules: &["core"],
                peers_may_meet: false,
            },
            Layer {
                name: "modes",
                modules: &["mode"],
                peers_may_meet: false,
            },
        ];
        let found = check(dir.path(), &layers);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0].starts_with("core/mod.rs:2: `core` (core) names `crate::mode` (modes)"),
            "{found:?}"
        );
        assert!(found[1].contains("`stray` is in no layer"), "{found:?}");
    }
}
