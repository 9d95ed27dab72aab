//! The registration: which modes a proxy's sessions offer their commands to, in order, and
//! what each needs running in the background. Adding a transaction mode is a folder of its
//! own plus a line here.
//!
//! Order matters: a command goes to the first mode that claims it. The outbox comes first
//! (it takes writes to `ferrata_outbox`, gates the COMMIT of a transaction that wrote some,
//! and refuses what would commit them without it); then XA mode (it
//! takes the transaction control of sessions bound in MODE XA, and of branches it holds),
//! then AT mode (writes, multi-statement strings and the COMMIT of a pending branch of
//! sessions bound in AT mode), then the isolation checks (locking reads of bound sessions,
//! writes outside global transactions), then the barriers of TCC and saga handlers
//! (`BEGIN BRANCH`, with or without a coordinator), and last the binding (Ferrata's other
//! statements, and what no mode before it could protect).

use std::sync::Arc;

use ferrata_rpc::pb;
use tokio_util::sync::CancellationToken;

use crate::at::{self, At};
use crate::barrier::Barrier;
use crate::config::Config;
use crate::coordinator::Global;
use crate::coordinator::barrier_table::BarrierTable;
use crate::coordinator::binding::Binding;
use crate::coordinator::undo_table::{self, UndoLogs};
use crate::isolation::Isolation;
use crate::outbox::Outbox;
use crate::session::mode::Mode;
use crate::xa::{self, Xa};

/// The modes of a proxy, and the coordinator link they share (none without `[coordinator]`).
pub struct Modes {
    pub modes: Vec<Arc<dyn Mode>>,
    global: Option<Arc<Global>>,
    branch_modes: Option<(Arc<At>, Arc<Xa>, Arc<Outbox>)>,
    barrier: Arc<Barrier>,
    xa_sweep_interval: std::time::Duration,
}

impl Modes {
    pub fn from_config(config: &Config) -> Modes {
        let global = Global::from_config(config);
        let mut modes: Vec<Arc<dyn Mode>> = Vec::new();
        let mut branch_modes = None;
        if let Some(g) = &global {
            let undo_logs = Arc::new(UndoLogs::new(config));
            let xa_mode = Arc::new(Xa {
                global: Arc::clone(g),
                undo_logs: Arc::clone(&undo_logs),
                held: Default::default(),
                kill_idle: std::time::Duration::from_millis(config.service.xa_kill_idle_ms),
            });
            let at_mode = At::new(Arc::clone(g), undo_logs);
            // The outbox first: it refuses what would commit its messages behind its back.
            let outbox = Arc::new(Outbox::new(
                Arc::clone(g),
                BarrierTable::new(&config.barrier),
                config.outbox.clone(),
            ));
            modes.push(outbox.clone());
            modes.push(xa_mode.clone());
            modes.push(at_mode.clone());
            modes.push(Arc::new(Isolation { global: Arc::clone(g) }));
            branch_modes = Some((at_mode, xa_mode, outbox));
        }
        let barrier = Arc::new(Barrier::new(&config.barrier));
        modes.push(barrier.clone());
        modes.push(Arc::new(Binding { global: global.clone() }));
        Modes {
            modes,
            global,
            branch_modes,
            barrier,
            xa_sweep_interval: std::time::Duration::from_millis(config.service.xa_sweep_interval_ms),
        }
    }

    /// Attaches to the coordinator until `stop`: phase-2 commands for this proxy's branches
    /// arrive on that stream; anti-hanging markers (and XA commit evidence) past their
    /// retention are swept meanwhile, and so are prepared XA branches nobody holds.
    pub fn start(&self, rm_id: String, stop: CancellationToken) {
        if let (Some(global), Some((at, xa, outbox))) = (&self.global, &self.branch_modes) {
            let handler = phase2_handler(Arc::clone(at), Arc::clone(xa), Arc::clone(&self.barrier));
            global.start(rm_id, handler, stop.clone());
            tokio::spawn(crate::outbox::purge(Arc::clone(outbox), stop.clone()));
            tokio::spawn(undo_table::sweep_markers(
                Arc::clone(global),
                Arc::clone(&xa.undo_logs),
                stop.clone(),
            ));
            tokio::spawn(xa::sweeper::sweep_orphans(Arc::clone(xa), self.xa_sweep_interval, stop));
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

/// The Attach stream's phase-2 commands, each branch to the mode it was registered in; the
/// check of prepared messages to the barriers.
fn phase2_handler(at: Arc<At>, xa: Arc<Xa>, barrier: Arc<Barrier>) -> ferrata_rpc::client::CommandHandler {
    let at_handler = at::phase2::handler(Arc::clone(&at));
    Arc::new(move |mut command: pb::BranchCommand| {
        let (at_handler, xa, barrier, global) = (
            Arc::clone(&at_handler),
            Arc::clone(&xa),
            Arc::clone(&barrier),
            Arc::clone(&at.global),
        );
        Box::pin(async move {
            let check = pb::Phase2Action::try_from(command.action)
                .is_ok_and(|a| matches!(a, pb::Phase2Action::CheckPrepared | pb::Phase2Action::CheckBarrier));
            if check {
                let mut out = Vec::new();
                for b in &command.branches {
                    let branch = match command.action == pb::Phase2Action::CheckBarrier as i32 {
                        true => String::from_utf8_lossy(&b.application_data).into_owned(),
                        false => "00".to_owned(),
                    };
                    out.push(crate::barrier::check::check_prepared(&global, &barrier.table, b, &branch).await);
                }
                return out;
            }
            if command.action == pb::Phase2Action::MarkDelivered as i32 {
                return crate::outbox::mark(&global, &command.branches, true).await;
            }
            if command.action == pb::Phase2Action::MarkDropped as i32 {
                return crate::outbox::mark(&global, &command.branches, false).await;
            }
            let (xa_branches, at_branches): (Vec<_>, Vec<_>) = std::mem::take(&mut command.branches)
                .into_iter()
                .partition(|b| b.branch_type == pb::BranchType::Xa as i32);
            let mut out = Vec::new();
            if !xa_branches.is_empty() {
                match pb::Phase2Action::try_from(command.action) {
                    Ok(action @ (pb::Phase2Action::Commit | pb::Phase2Action::Rollback)) => {
                        for b in &xa_branches {
                            out.push(xa::phase2::finish(&xa, action == pb::Phase2Action::Commit, b).await);
                        }
                    }
                    // An operator's repair is about undo records: an XA branch has none.
                    _ => out.extend(xa_branches.iter().map(|b| pb::BranchOutcome {
                        branch_id: b.branch_id,
                        error_code: "not_found".into(),
                        reason: "an XA branch has no undo record to inspect or repair".into(),
                        ..Default::default()
                    })),
                }
            }
            if !at_branches.is_empty() {
                command.branches = at_branches;
                out.extend(at_handler(command).await);
            }
            out
        })
    })
}
