//! The coordinator's layers (ARCHITECTURE.md, "Layers"): the base knows no transaction mode,
//! a mode's part (`at`) uses only the base, and the core drives the modes.

use ferrata_testkit::layers::{Layer, check};

#[test]
fn dependencies_run_downwards() {
    let layers = [
        Layer {
            name: "base",
            modules: &[
                "audit", "auth", "calls", "config", "error", "history", "lock_key", "metrics", "model", "rm", "store",
                "timeline", "xid",
            ],
            peers_may_meet: true,
        },
        Layer {
            name: "modes",
            modules: &["at", "msg", "saga", "tcc"],
            peers_may_meet: false,
        },
        Layer {
            name: "coordinator core",
            modules: &[
                "coordinator",
                "phase2",
                "sagas",
                "messages",
                "operator",
                "repair",
                "grpc",
                "grpc_calls",
                "namespaces",
                "lock_leader",
                "http",
                "dtm",
                "console",
            ],
            peers_may_meet: true,
        },
        Layer {
            name: "assembly",
            modules: &["server", "serving", "standby", "adoption", "cli", "lib", "main"],
            peers_may_meet: true,
        },
    ];
    let offences = check(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &layers);
    assert!(offences.is_empty(), "layering broken:\n{}", offences.join("\n"));
}
