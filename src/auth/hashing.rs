//! The password-hashing pool: a few dedicated threads, at a lower CPU priority than the proxy's
//! workers, that run argon2 for logins and password changes. A burst of logins then takes the
//! CPU the proxied traffic leaves over instead of competing with it as equals (on tokio's
//! blocking pool, at the same priority, a burst raised pass-through p99 by ~40 %). The HTTP
//! side and the throttle are the authority's.

use crossbeam_channel::{Sender, TrySendError};

/// How much lower than the proxy the hashing threads run (nice(2) units, relative to the
/// process's own; 10 gives them about a tenth of a contended core, and all of an idle one).
pub const NICE: i32 = 10;

/// Hashing jobs waiting beyond this are refused: each queued login is a client waiting, and a
/// queue that only grows answers nobody in time.
pub const MAX_QUEUED: usize = 256;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashingError {
    /// More logins are waiting than the pool can answer soon.
    Busy,
    /// The pool has stopped (shutdown).
    Gone,
}

pub struct HashingPool {
    jobs: Sender<Job>,
}

impl HashingPool {
    /// Starts `threads` hashing threads at `nice` (0 = the proxy's own priority).
    pub fn start(threads: usize, nice: i32) -> HashingPool {
        let (jobs, queue) = crossbeam_channel::bounded::<Job>(MAX_QUEUED);
        for i in 0..threads.max(1) {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("tollgate-hash-{i}"))
                .spawn(move || {
                    lower_priority(nice);
                    for job in queue {
                        job();
                    }
                })
                .expect("the OS lets Tollgate start a thread");
        }
        HashingPool { jobs }
    }

    /// Runs `work` on the pool and waits for its answer without blocking the caller's thread.
    /// Work whose caller has gone (the client hung up while it waited) is skipped.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HashingError> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            if !answer.is_closed() {
                let _ = answer.send(work());
            }
        });
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(HashingError::Busy),
            Err(TrySendError::Disconnected(_)) => return Err(HashingError::Gone),
        }
        answered.await.map_err(|_| HashingError::Gone)
    }
}

/// The scheduler time slice the hashing threads ask for (Linux 6.12 and later; older kernels
/// ignore it). One argon2 hash is ~20 ms of CPU: run in the default ~3 ms slices, each slice
/// a hashing thread got held a proxy worker off its core that long, which is what a busy
/// proxy's p99 latency showed. With 0.1 ms slices the wait a login imposes is that short.
pub const SLICE_NS: u64 = 100_000;

/// Lowers the calling thread's priority by `nice` below the process's own: a server started at
/// nice -20 hashes at -10, not at +10 (where a busy proxy would starve logins completely), and
/// asks for short time slices ([`SLICE_NS`]). Linux keeps these per thread, so the rest of the
/// process stays as it was. Failure (a sandbox that forbids it) only costs fairness.
fn lower_priority(nice: i32) {
    if nice == 0 {
        return;
    }
    // SAFETY: gettid, getpriority, sched_setattr and setpriority read plain integers and a
    // sched_attr that lives across the call. getpriority's -1 is a valid nice value, so its
    // failure is read from errno, cleared first.
    let rc = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        *libc::__errno_location() = 0;
        let current = libc::getpriority(libc::PRIO_PROCESS, tid);
        let current = if *libc::__errno_location() == 0 {
            current
        } else {
            0
        };
        let target = (current + nice).min(19);
        let attr = libc::sched_attr {
            size: std::mem::size_of::<libc::sched_attr>() as u32,
            sched_policy: libc::SCHED_OTHER as u32,
            sched_flags: 0,
            sched_nice: target,
            sched_priority: 0,
            sched_runtime: SLICE_NS,
            sched_deadline: 0,
            sched_period: 0,
        };
        let attr_ptr: *const libc::sched_attr = &attr;
        if libc::syscall(libc::SYS_sched_setattr, tid, attr_ptr, 0) == 0 {
            0
        } else {
            libc::setpriority(libc::PRIO_PROCESS, tid, target)
        }
    };
    if rc != 0 {
        tracing::warn!(
            nice,
            error = %std::io::Error::last_os_error(),
            "could not lower the hashing threads' priority"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// The calling thread's nice value, as the kernel reports it.
    fn own_nice() -> i32 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        // nice is field 19; fields are counted after the parenthesised command name.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        after.split(' ').nth(16).unwrap().parse().unwrap()
    }

    #[tokio::test]
    async fn runs_work_on_its_own_lower_priority_threads() {
        let pool = HashingPool::start(2, NICE);
        let (thread, nice, answer) = pool
            .run(|| {
                let name = std::thread::current().name().map(str::to_string);
                (name, own_nice(), 6 * 7)
            })
            .await
            .unwrap();
        assert_eq!(answer, 42);
        assert!(thread.unwrap().starts_with("tollgate-hash-"));
        assert!(
            nice >= NICE,
            "the hashing thread runs below the proxy: {nice}"
        );
        assert!(own_nice() < nice, "the caller's priority is untouched");
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_instead_of_growing() {
        let pool = Arc::new(HashingPool::start(1, 0));
        let (started, running) = tokio::sync::oneshot::channel::<()>();
        let (release, gate) = crossbeam_channel::bounded::<()>(0);
        let busy_thread = {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.run(move || {
                    let _ = started.send(());
                    let _ = gate.recv();
                })
                .await
            })
        };
        running.await.unwrap();
        let mut waiting = tokio::task::JoinSet::new();
        for _ in 0..MAX_QUEUED + 8 {
            let pool = pool.clone();
            waiting.spawn(async move { pool.run(|| ()).await });
        }
        // The refusals answer while the one thread is still held.
        let mut busy = 0;
        while busy < 8 {
            match waiting.join_next().await.unwrap().unwrap() {
                Err(HashingError::Busy) => busy += 1,
                other => panic!("answered while the pool was held: {other:?}"),
            }
        }
        drop(release);
        let mut done = 0;
        while let Some(r) = waiting.join_next().await {
            assert_eq!(r.unwrap(), Ok(()));
            done += 1;
        }
        assert_eq!(done, MAX_QUEUED);
        assert_eq!(busy_thread.await.unwrap(), Ok(()));
    }
}
