//! The registration: which modes a proxy's sessions offer their commands to, in order, and
//! what each needs running in the background. Adding a transaction mode is a folder of its
//! own plus a line here.
//!
//! Order matters: a command goes to the first mode that claims it. AT mode comes first (it
//! takes writes, multi-statement strings and the COMMIT of a pending branch), then the
//! isolation checks (locking reads of bound sessions, writes outside global transactions),
//! and last the binding (Ferrata's statements, and what no mode before it could protect).

use std::sync::Arc;

use ferrata_rpc::pb;
use tokio_util::sync::CancellationToken;

use crate::at::{self, At};
use crate::config::Config;
use crate::coordinator::Global;
use crate::coordinator::binding::Binding;
use crate::isolation::Isolation;
use crate::session::mode::Mode;

/// The modes of a proxy, and the coordinator link they share (none without `[coordinator]`).
pub struct Modes {
    pub modes: Vec<Arc<dyn Mode>>,
    global: Option<Arc<Global>>,
    at: Option<Arc<At>>,
}

impl Modes {
    pub fn from_config(config: &Config) -> Modes {
        let global = Global::from_config(config);
        let mut modes: Vec<Arc<dyn Mode>> = Vec::new();
        let mut at = None;
        if let Some(g) = &global {
            let at_mode = At::new(Arc::clone(g), config);
            modes.push(at_mode.clone());
            modes.push(Arc::new(Isolation { global: Arc::clone(g) }));
            at = Some(at_mode);
        }
        modes.push(Arc::new(Binding { global: global.clone() }));
        Modes { modes, global, at }
    }

    /// Attaches to the coordinator until `stop`: phase-2 commands for this proxy's branches
    /// arrive on that stream; AT mode's anti-hanging markers are swept meanwhile.
    pub fn start(&self, rm_id: String, stop: CancellationToken) {
        if let (Some(global), Some(at)) = (&self.global, &self.at) {
            global.start(rm_id, phase2_handler(Arc::clone(at)), stop.clone());
            tokio::spawn(at::undo_log::sweep_markers(Arc::clone(at), stop));
        }
    }

    /// The guarded-table view, with a coordinator (the admin listener reports it).
    pub fn guards(&self) -> Option<Arc<crate::coordinator::guards::TableGuards>> {
        self.global.as_ref().map(|g| Arc::clone(&g.guards))
    }

    pub fn coordinated(&self) -> bool {
        self.global.is_some()
    }
}

/// The Attach stream's phase-2 commands, each branch to the mode it was registered in. This
/// proxy runs AT branches; a branch of another mode (registered by a newer proxy in front of
/// the same database) is answered with a retryable failure, never as done.
fn phase2_handler(at: Arc<At>) -> ferrata_rpc::client::CommandHandler {
    let at_handler = at::phase2::handler(at);
    Arc::new(move |mut command: pb::BranchCommand| {
        let at_handler = Arc::clone(&at_handler);
        Box::pin(async move {
            let (at_branches, others): (Vec<_>, Vec<_>) = std::mem::take(&mut command.branches)
                .into_iter()
                .partition(|b| b.branch_type == pb::BranchType::At as i32);
            let mut out: Vec<pb::BranchOutcome> = others
                .iter()
                .map(|b| pb::BranchOutcome {
                    branch_id: b.branch_id,
                    status: pb::BranchStatus::RollbackFailedRetryable as i32,
                    reason: format!(
                        "ferrata-proxy {} cannot finish this branch (branch type {}): another proxy in front of {} must",
                        env!("CARGO_PKG_VERSION"),
                        b.branch_type,
                        b.resource_id
                    ),
                    ..Default::default()
                })
                .collect();
            if !at_branches.is_empty() {
                command.branches = at_branches;
                out.extend(at_handler(command).await);
            }
            out
        })
    })
}
