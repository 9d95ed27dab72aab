//! Child processes that cannot outlive the test process, and free loopback ports.

use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::sync::mpsc::{self, Sender};

struct SpawnRequest {
    cmd: Command,
    reply: Sender<io::Result<Child>>,
}

/// Spawns `cmd` so that the kernel SIGKILLs it as soon as this process dies, however it
/// dies (panic=abort, SIGKILL from nextest's timeout, a crashed runner): no orphaned
/// servers or proxies are left behind.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the
/// process. Forking from whatever thread calls us (a `#[tokio::test]` runtime, a
/// tokio worker) would kill the child when that thread ends, e.g. a server shared
/// between tests would die with the first test's runtime. So every fork happens on one
/// dedicated thread that lives as long as the process.
pub fn spawn_tied(mut cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Sender<SpawnRequest>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("testkit-spawner".into())
            .spawn(move || {
                // The sender lives in a static, so this loop (and the thread) never ends.
                for SpawnRequest { mut cmd, reply } in rx {
                    // The requester may have given up; nothing to do about it here.
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("cannot start the testkit spawner thread");
        tx
    });

    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // calls (prctl, getppid) without allocating.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl; then nobody would kill us.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }

    let (reply, response) = mpsc::channel();
    spawner
        .send(SpawnRequest { cmd, reply })
        .map_err(|_| io::Error::other("testkit spawner thread is gone"))?;
    response
        .recv()
        .map_err(|_| io::Error::other("testkit spawner thread dropped the request"))?
}

/// A loopback TCP port that was free a moment ago. Another process can take it before
/// the caller binds it, so callers must be ready to retry with a new one.
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}
