//! Background work at a lower CPU priority than the request threads.
//!
//! Folding the reservation journal into SQLite is a burst of CPU every 100 ms (about 2,000 rows at
//! 20,000 decisions/s). On a machine with few cores, a burst that competes with the request threads
//! as an equal makes every decision queued behind it wait. So the fold runs on a thread of its own
//! (not a request thread), and that thread and SQLite's connection threads (which run the fold's
//! statements) are `nice`d: the kernel gives them the CPU the requests leave. Measured on the 2-core
//! machine at 20,000/s (`bench/server.py --variant`, A/Bs of 4 rounds): `/decide`'s p99 median
//! was 8.59 and 8.89 ms before (two A/Bs) and 3.64, 3.52 and 6.41 ms after (three), together with
//! two more request threads than cores.
//! The threads are the robust part; this module's share is smaller and less certain (against the
//! fold at normal priority it won two direct A/Bs of three: 3.64 against 6.40 ms, 1.91 against
//! 2.48, and lost 3.96 against 3.21).
//!
//! Lowering a priority needs no privilege (raising it back does). Where it fails (or off Linux)
//! the work simply runs at the normal priority. SQLite's threads also run the API's other database
//! work (ingest, approvals, policies), so under a saturated CPU that work waits for decisions too:
//! that is the intended order. They are found by the name sqlx gives them, so a program that
//! embeds this crate has its own sqlx SQLite pools lowered as well. A thread id is looked up
//! between reading `/proc` and `setpriority`; a connection thread that ended in between could in
//! principle have its id reused by a new thread of this user. At saturation the fold can fall
//! behind: `sentinel_journal_unfolded_changes` on `/metrics` shows what waits after each round. At
//! 35,000 decisions/s (wrk's closed loop) the database was 4,753 rows (about 135 ms) behind when
//! the load stopped, and had caught up 0.25 s later.

/// How much lower than the request threads background threads run by default (`nice` steps).
pub const NICE_STEPS: i32 = 10;

static STEPS: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(NICE_STEPS);

/// Sets how many `nice` steps background threads run below the request threads, for threads
/// lowered from now on (0 to 19; 0 runs background work at the request threads' priority).
/// `sentinel serve --background-nice` (or `SENTINEL_BACKGROUND_NICE`) sets it at start.
pub fn set_nice_steps(steps: i32) {
    STEPS.store(steps.clamp(0, 19), std::sync::atomic::Ordering::Relaxed);
}

/// The steps set by [`set_nice_steps`]; [`NICE_STEPS`] by default.
pub fn nice_steps() -> i32 {
    STEPS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Lowers the calling thread's priority by [`nice_steps`]; returns its new `nice` value (`None`
/// when nothing was lowered).
pub fn lower_this_thread() -> Option<i32> {
    #[cfg(target_os = "linux")]
    {
        let steps = nice_steps();
        if steps == 0 {
            return None;
        }
        let now = rustix::process::getpriority_process(None).ok()?;
        let to = now.saturating_add(steps).min(19);
        if to <= now {
            return None;
        }
        rustix::process::setpriority_process(None, to).ok()?;
        Some(to)
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// Sets every SQLite connection thread of this process (sqlx names them `sqlx-sqlite-worker-N`) that
/// runs at a higher priority than `nice` to `nice`. Connections may be opened at any time, so the
/// folder calls this now and then.
pub fn lower_sqlite_threads(nice: i32) {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{Pid, getpriority_process, setpriority_process};
        let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return };
        for task in dir.flatten() {
            let Some(tid) = task.file_name().to_str().and_then(|n| n.parse::<i32>().ok()).and_then(Pid::from_raw)
            else {
                continue;
            };
            // The kernel keeps 15 bytes of a thread's name.
            let is_sqlite = std::fs::read(task.path().join("comm")).is_ok_and(|c| c.starts_with(b"sqlx-sqlite"));
            if is_sqlite && getpriority_process(Some(tid)).is_ok_and(|p| p < nice) {
                let _ = setpriority_process(Some(tid), nice);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The kernel's `nice` value of one thread of this process.
    fn nice_of(tid: i32) -> i32 {
        rustix::process::Pid::from_raw(tid)
            .and_then(|p| rustix::process::getpriority_process(Some(p)).ok())
            .unwrap_or(i32::MIN)
    }

    #[test]
    fn a_lowered_thread_and_sqlite_threads_run_at_the_lower_priority() {
        assert!(
            rustix::process::getpriority_process(None).is_ok_and(|n| n < 19),
            "run this test above the lowest priority (not under `nice -n 19`)"
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("sqlx-sqlite-worker-test".into())
            .spawn(move || {
                let _ = tx.send(rustix::thread::gettid().as_raw_nonzero().get());
                std::thread::park();
            })
            .expect("a thread");
        let sqlite_tid = rx.recv().expect("its id");
        let base = nice_of(sqlite_tid);
        let lowered = std::thread::spawn(move || {
            let to = lower_this_thread().expect("lowering a priority needs no privilege");
            (to, nice_of(rustix::thread::gettid().as_raw_nonzero().get()))
        })
        .join()
        .expect("joined");
        assert_eq!(lowered.0, (base + nice_steps()).min(19));
        assert_eq!(lowered.1, lowered.0, "the kernel reports the new nice value");
        assert_eq!(nice_of(sqlite_tid), base, "another thread's priority is untouched");
        lower_sqlite_threads(lowered.0);
        assert_eq!(nice_of(sqlite_tid), lowered.0);
        spawned.thread().unpark();
        let _ = spawned.join();
    }
}
