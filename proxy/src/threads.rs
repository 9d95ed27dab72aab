//! The threads that run client sessions: one per CPU by default, each with a single-threaded
//! Tokio runtime of its own. A session is given to one thread when it is accepted and stays
//! there: its two sockets are registered with that thread's poller, and every wake-up of the
//! session (a client packet, a backend answer) is handled on the thread that saw it, with no
//! hand-over between threads and no work stealing (what HAProxy's threads do). The accept
//! loop, the admin listener and the coordinator link stay on the main runtime.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

pub struct SessionThreads {
    runtimes: Vec<Handle>,
    next: AtomicUsize,
    /// Dropping a sender ends its thread (the runtime and whatever still runs on it).
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

impl SessionThreads {
    /// Starts `count` threads (0: one per CPU).
    pub fn start(count: usize) -> std::io::Result<SessionThreads> {
        let count = match count {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let mut threads = SessionThreads {
            runtimes: Vec::with_capacity(count),
            next: AtomicUsize::new(0),
            stops: Vec::with_capacity(count),
            threads: Vec::with_capacity(count),
        };
        for i in 0..count {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            let (stop, stopped) = oneshot::channel::<()>();
            threads.runtimes.push(runtime.handle().clone());
            threads.stops.push(stop);
            threads
                .threads
                .push(
                    std::thread::Builder::new()
                        .name(format!("ferrata-session-{i}"))
                        .spawn(move || {
                            runtime.block_on(async {
                                let _ = stopped.await;
                            })
                        })?,
                );
        }
        Ok(threads)
    }

    /// Runs `session` on the next thread, round robin. Sockets the session registers when
    /// it is first polled (`TcpStream::from_std`) belong to that thread's poller.
    pub fn spawn(&self, session: impl Future<Output = ()> + Send + 'static) {
        let at = self.next.fetch_add(1, Ordering::Relaxed) % self.runtimes.len();
        self.runtimes[at].spawn(session);
    }
}

impl Drop for SessionThreads {
    fn drop(&mut self) {
        self.stops.clear();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sessions go round robin over the threads, and each stays on its thread when it is
    /// woken from another one.
    #[test]
    fn sessions_are_spread_over_the_threads_and_stay_on_theirs() {
        const SESSIONS: usize = 4;
        let threads = SessionThreads::start(2).unwrap();
        let (seen_tx, seen) = std::sync::mpsc::channel();
        let mut wakers = Vec::new();
        for session in 0..SESSIONS {
            let (wake, mut woken) = tokio::sync::mpsc::unbounded_channel::<()>();
            wakers.push(wake);
            let seen = seen_tx.clone();
            threads.spawn(async move {
                loop {
                    let name = std::thread::current().name().unwrap_or_default().to_owned();
                    seen.send((session, name)).unwrap();
                    if woken.recv().await.is_none() {
                        return;
                    }
                }
            });
        }
        let mut names = vec![Vec::new(); SESSIONS];
        for round in 0..3 {
            // Every session reported and waits; then this thread wakes each.
            for _ in 0..SESSIONS {
                let (session, name) = seen.recv_timeout(std::time::Duration::from_secs(30)).unwrap();
                names[session].push(name);
            }
            if round < 2 {
                wakers.iter().for_each(|w| w.send(()).unwrap());
            }
        }
        for (session, seen) in names.iter().enumerate() {
            assert_eq!(seen.len(), 3);
            assert!(seen.iter().all(|n| *n == seen[0]), "session {session} moved: {seen:?}");
        }
        let mut first: Vec<&str> = names.iter().map(|n| n[0].as_str()).collect();
        first.sort();
        assert_eq!(
            first,
            [
                "ferrata-session-0",
                "ferrata-session-0",
                "ferrata-session-1",
                "ferrata-session-1"
            ]
        );
    }
}
