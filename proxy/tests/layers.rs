//! The proxy's layers (ARCHITECTURE.md, "Layers"): every module names only modules below it,
//! and the two modes never name each other.

use ferrata_testkit::layers::{Layer, check};

#[test]
fn dependencies_run_downwards() {
    let layers = [
        Layer {
            name: "foundation",
            modules: &["protocol", "classify", "config", "metrics", "stream"],
            peers_may_meet: true,
        },
        Layer {
            name: "session core",
            modules: &["session"],
            peers_may_meet: false,
        },
        Layer {
            name: "sql",
            modules: &["sql"],
            peers_may_meet: false,
        },
        Layer {
            name: "coordinator",
            modules: &["coordinator"],
            peers_may_meet: false,
        },
        Layer {
            name: "modes",
            modules: &["at", "barrier", "isolation", "outbox", "xa"],
            peers_may_meet: false,
        },
        Layer {
            name: "assembly",
            modules: &["modes", "server", "threads", "admin", "cli", "lib", "main"],
            peers_may_meet: true,
        },
    ];
    let offences = check(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &layers);
    assert!(offences.is_empty(), "layering broken:\n{}", offences.join("\n"));
}
