//! The reservation journal of the SQLite authority.
//!
//! Every reservation change must survive the process before `/decide` answers, but a SQLite commit
//! per decision rewrites whole pages and makes the checkpointer copy them again: at tens of
//! thousands of decisions a second that write volume, not the decision, set the latency. So each
//! change is appended to a plain file first (one `write(2)` of one line, handed to the OS like the
//! ledger) and kept in memory; ten times a second a background task writes what was kept into
//! SQLite in a few large transactions. The file is only read after a crash: files are rotated every
//! couple of seconds and deleted once everything in them is in the database; a clean stop folds the
//! rest and removes the open file too. At start, files left
//! by an earlier process are folded before the counters are rebuilt, so SQLite is always the whole
//! truth when the engine restores from it.
//!
//! Files are `<database>.journal.<NNNNNN>`, one JSON object per line. A last line without its
//! newline (a crash while writing) was never acknowledged and is ignored. Folding is idempotent
//! (inserts ignore ids already stored; finishing sets a state), so a crash between folding a file
//! and deleting it is harmless.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use sentinel_store::{CounterOp, ReservationRow, Store};
use serde::{Deserialize, Serialize};

/// A file is closed (and can be deleted once folded) when it is this old or this big.
const ROTATE_AFTER: Duration = Duration::from_secs(2);
const ROTATE_BYTES: u64 = 64 << 20;
/// Changes per database transaction when folding.
const FOLD_CHUNK: usize = 2_000;

/// A journal line as read back.
#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Line {
    Reserve(ReservationRow),
    Finish { id: String, state: String, actual_micros: Option<i64>, at: i64 },
}

/// The same line as written: borrowed, so appending copies nothing but the bytes.
#[derive(Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum LineRef<'a> {
    Reserve(&'a ReservationRow),
    Finish { id: &'a str, state: &'a str, actual_micros: Option<i64>, at: i64 },
}

fn to_line(op: &CounterOp) -> LineRef<'_> {
    match op {
        CounterOp::Reserve(r) => LineRef::Reserve(r),
        CounterOp::Finish { id, state, actual_micros, at } => {
            LineRef::Finish { id, state, actual_micros: *actual_micros, at: *at }
        }
    }
}

fn from_line(l: Line) -> Option<CounterOp> {
    Some(match l {
        Line::Reserve(r) => CounterOp::Reserve(r),
        Line::Finish { id, state, actual_micros, at } => {
            let state = match state.as_str() {
                "settled" => "settled",
                "released" => "released",
                "expired" => "expired",
                _ => return None,
            };
            CounterOp::Finish { id, state, actual_micros, at }
        }
    })
}

/// The file being appended to. Appends share it (each line is one `write(2)` to a file opened
/// with `O_APPEND`, so concurrent lines never interleave); a rotation swaps it exclusively.
struct Open {
    number: u64,
    file: File,
    opened: Instant,
}

thread_local! {
    /// Each thread serializes its lines here, outside every lock.
    static LINE: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(512));
}

/// What folding carries between rounds: changes a failed round could not write (retried first,
/// so order is kept) and closed files that may be deleted once everything taken so far is folded.
#[derive(Default)]
pub(crate) struct FoldState {
    retry: Vec<CounterOp>,
    closed: Vec<PathBuf>,
}

/// The open journal.
pub struct Journal {
    db: PathBuf,
    /// Read-locked by appends for their write and their push to `unfolded` (so a rotation never
    /// falls between the two: a change is always taken with the file that holds it), write-locked
    /// by a rotation.
    open: RwLock<Open>,
    size: AtomicU64,
    /// A write failed part-way: the next lines start on a fresh line, so the torn bytes spoil
    /// only the line that was refused (the reader also finds a line glued to a torn one).
    torn: AtomicBool,
    /// The changes not yet in the database, in the order their appends returned.
    unfolded: Mutex<Vec<CounterOp>>,
    /// Set at shutdown once the open file was removed: later appends are refused, not lost.
    closed: AtomicBool,
    /// One fold at a time, in order: a change must never reach the database before the
    /// reservation it finishes.
    pub(crate) folding: tokio::sync::Mutex<FoldState>,
}

fn numbered(db: &Path, n: u64) -> PathBuf {
    let mut name = db.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".journal.{n:06}"));
    db.with_file_name(name)
}

fn create(db: &Path, n: u64) -> io::Result<File> {
    OpenOptions::new().create_new(true).append(true).open(numbered(db, n))
}

/// Journal files beside `db`, oldest first.
fn existing(db: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let dir = db.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let prefix = format!("{}.journal.", db.file_name().and_then(|n| n.to_str()).unwrap_or("sentinel.db"));
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name();
        if let Some(n) = name.to_str().and_then(|s| s.strip_prefix(&prefix)).and_then(|s| s.parse::<u64>().ok()) {
            out.push((n, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

impl Journal {
    /// Opens a new journal file beside the database and returns the files an earlier process left,
    /// oldest first; fold them (with [`fold_file`]) before deciding anything.
    pub fn open(db: &Path) -> io::Result<(Self, Vec<PathBuf>)> {
        let left = existing(db)?;
        let number = left.last().map_or(1, |(n, _)| n + 1);
        let open = Open { number, file: create(db, number)?, opened: Instant::now() };
        let journal = Journal {
            db: db.to_path_buf(),
            open: RwLock::new(open),
            size: AtomicU64::new(0),
            torn: AtomicBool::new(false),
            unfolded: Mutex::new(Vec::with_capacity(4096)),
            closed: AtomicBool::new(false),
            folding: tokio::sync::Mutex::new(FoldState::default()),
        };
        Ok((journal, left.into_iter().map(|(_, p)| p).collect()))
    }

    /// Appends one change; when this returns `Ok` the line is with the OS (it survives the process)
    /// and the change will be folded into the database. On an error nothing was recorded.
    ///
    /// No lock is held for the system call but a shared one: the two request threads write their
    /// lines side by side instead of one waiting (asleep) for the other's write.
    pub fn append(&self, op: CounterOp) -> io::Result<()> {
        LINE.with(|cell| {
            let mut line = cell.borrow_mut();
            line.clear();
            if self.torn.load(Ordering::Acquire) {
                line.push(b'\n');
            }
            serde_json::to_writer(&mut *line, &to_line(&op)).map_err(io::Error::other)?;
            line.push(b'\n');
            let started = Instant::now();
            let written = {
                let open = self.open.read();
                if self.closed.load(Ordering::Acquire) {
                    return Err(io::Error::other("the reservation journal is closed (the server is stopping)"));
                }
                // One write: with `O_APPEND` the line lands whole after every line before it. A
                // short write (a full disk) is not continued, since another thread's line may
                // already follow its part; the line is refused instead.
                let r = loop {
                    match (&open.file).write(&line) {
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        r => break r,
                    }
                };
                match r {
                    Ok(n) if n == line.len() => {
                        self.unfolded.lock().push(op);
                        Ok(n)
                    }
                    Ok(n) => {
                        self.torn.store(n > 0, Ordering::Release);
                        Err(io::Error::new(io::ErrorKind::WriteZero, "the file system took only part of the line"))
                    }
                    Err(e) => Err(e),
                }
            };
            let took = started.elapsed();
            if took > Duration::from_millis(2) {
                tracing::warn!(ms = took.as_secs_f64() * 1000.0, "slow reservation journal write");
            }
            let n = written?;
            self.size.fetch_add(n as u64, Ordering::Relaxed);
            if self.torn.load(Ordering::Relaxed) {
                self.torn.store(false, Ordering::Release);
            }
            if line.capacity() > 64 << 10 {
                *line = Vec::with_capacity(512);
            }
            Ok(())
        })
    }

    /// Takes the changes kept since the last call. When the file is old or big enough, the next
    /// changes go to a new file and the closed one is returned: it may be deleted once what was
    /// taken (and everything taken before) is in the database.
    fn take(&self) -> io::Result<(Vec<CounterOp>, Option<PathBuf>)> {
        let (number, due) = {
            let g = self.open.read();
            (g.number, self.rotation_due(&g))
        };
        // The next file is created before the lock is taken: file system work never holds up an append.
        let next = if due { Some(create(&self.db, number + 1)?) } else { None };
        let Some(file) = next else {
            // No rotation: whatever is pushed later stays in this file, taken next time.
            return Ok((std::mem::replace(&mut *self.unfolded.lock(), Vec::with_capacity(4096)), None));
        };
        // Exclusive: no append is between its write (to the closed file) and its push.
        let mut g = self.open.write();
        let ops = std::mem::replace(&mut *self.unfolded.lock(), Vec::with_capacity(4096));
        g.number = number + 1;
        g.file = file;
        g.opened = Instant::now();
        self.size.store(0, Ordering::Relaxed);
        self.torn.store(false, Ordering::Release);
        Ok((ops, Some(numbered(&self.db, number))))
    }

    fn rotation_due(&self, open: &Open) -> bool {
        let size = self.size.load(Ordering::Relaxed);
        size > 0 && (open.opened.elapsed() >= ROTATE_AFTER || size >= ROTATE_BYTES)
    }

    /// Whether the journal was closed at shutdown (later appends are refused, and nothing is left to fold).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Writes every change kept so far into the database, then deletes the files that held only
    /// folded changes. A failed round keeps its changes (and the files) for the next one. Returns
    /// how many changes wait for the next round: what a failed round kept, and what was appended
    /// while this one ran (so a fold that falls behind shows).
    pub async fn fold(self: &Arc<Self>, store: &Store) -> usize {
        let mut st = self.folding.lock().await;
        let st = &mut *st;
        if self.is_closed() {
            return 0;
        }
        let taken = match self.take_blocking().await {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot rotate the reservation journal");
                return self.waiting(st);
            }
        };
        let (ops, closed) = taken;
        if st.retry.is_empty() {
            st.retry = ops;
        } else {
            st.retry.extend(ops);
        }
        st.closed.extend(closed);
        let mut done = 0;
        for chunk in st.retry.chunks(FOLD_CHUNK) {
            if let Err(e) = store.apply_counter_ops(chunk).await {
                // Kept in memory and on disk: the next round (or the next start) writes them.
                tracing::error!(error = %e, pending = st.retry.len() - done, "cannot fold the reservation journal");
                st.retry.drain(..done);
                return self.waiting(st);
            }
            done += chunk.len();
            tokio::task::yield_now().await;
        }
        st.retry.clear();
        if st.retry.capacity() > 64 << 10 {
            st.retry = Vec::new();
        }
        if !st.closed.is_empty() {
            let files = std::mem::take(&mut st.closed);
            let removed = tokio::task::spawn_blocking(move || {
                for f in &files {
                    if let Err(e) = std::fs::remove_file(f) {
                        tracing::warn!(file = %f.display(), error = %e, "cannot remove a folded reservation journal");
                    }
                }
            })
            .await;
            if let Err(e) = removed {
                tracing::warn!(error = %e, "cannot remove folded reservation journals");
            }
        }
        self.waiting(st)
    }

    /// Changes not in the database yet: kept by a failed round, or appended since the last take.
    fn waiting(&self, st: &FoldState) -> usize {
        st.retry.len() + self.unfolded.lock().len()
    }

    /// At shutdown, after the last fold: removes the open file when everything in it is in the
    /// database, so a clean stop leaves no journal behind. Later appends are refused. Returns
    /// whether the file was removed (when a fold failed, it stays for the next start to fold).
    pub async fn close_if_folded(&self) -> bool {
        let st = self.folding.lock().await;
        if !st.retry.is_empty() || !st.closed.is_empty() {
            return false;
        }
        let g = self.open.write();
        if !self.unfolded.lock().is_empty() {
            return false;
        }
        self.closed.store(true, Ordering::Release);
        let path = numbered(&self.db, g.number);
        match std::fs::remove_file(&path) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot remove the folded reservation journal");
                false
            }
        }
    }

    /// [`Journal::take`], off the request threads when it creates a file.
    async fn take_blocking(self: &Arc<Self>) -> io::Result<(Vec<CounterOp>, Option<PathBuf>)> {
        let due = self.rotation_due(&self.open.read());
        if !due {
            return self.take();
        }
        let j = Arc::clone(self);
        tokio::task::spawn_blocking(move || j.take()).await.map_err(io::Error::other)?
    }
}

/// The changes in a journal file, in order. A torn last line is ignored; a damaged line elsewhere
/// is reported and skipped (the rest of the file is still folded).
pub fn read(path: &Path) -> io::Result<Vec<CounterOp>> {
    let bytes = std::fs::read(path)?;
    let mut ops = Vec::new();
    for (i, raw) in bytes.split_inclusive(|b| *b == b'\n').enumerate() {
        if !raw.ends_with(b"\n") {
            tracing::warn!(file = %path.display(), line = i + 1, "ignoring a torn last journal line (never acknowledged)");
            break;
        }
        match parse_line(raw) {
            Some(op) => ops.push(op),
            None => tracing::error!(file = %path.display(), line = i + 1, "skipping a damaged journal line"),
        }
    }
    Ok(ops)
}

/// One line's change. A line glued to the part of a refused one (written while another thread's
/// write was failing) still starts where its own object does: `{"op":` occurs nowhere else, since
/// a quote inside a JSON string is always escaped.
fn parse_line(raw: &[u8]) -> Option<CounterOp> {
    const START: &[u8] = br#"{"op":"#;
    if let Some(op) = serde_json::from_slice::<Line>(raw).ok().and_then(from_line) {
        return Some(op);
    }
    let at = raw.windows(START.len()).rposition(|w| w == START).filter(|&at| at > 0)?;
    serde_json::from_slice::<Line>(raw.get(at..)?).ok().and_then(from_line)
}

/// Writes a journal file an earlier process left into the database, then deletes it.
pub async fn fold_file(store: &Store, path: &Path) -> Result<usize, String> {
    let p = path.to_path_buf();
    let ops = tokio::task::spawn_blocking(move || read(&p))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    for chunk in ops.chunks(FOLD_CHUNK) {
        store.apply_counter_ops(chunk).await.map_err(|e| format!("cannot fold `{}`: {e}", path.display()))?;
    }
    std::fs::remove_file(path).map_err(|e| format!("cannot remove `{}`: {e}", path.display()))?;
    Ok(ops.len())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn finish(id: &str) -> CounterOp {
        CounterOp::Finish { id: id.into(), state: "settled", actual_micros: Some(1), at: 2 }
    }

    fn ids(ops: &[CounterOp]) -> Vec<String> {
        ops.iter()
            .map(|o| match o {
                CounterOp::Finish { id, .. } => id.clone(),
                CounterOp::Reserve(r) => r.id.clone(),
            })
            .collect()
    }

    /// A write that failed part-way leaves bytes in the file; the next change must still be read
    /// back whole after a crash, and the refused one not at all.
    #[test]
    fn a_torn_write_spoils_only_its_own_line() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("s.db");
        let (j, left) = Journal::open(&db).unwrap();
        assert!(left.is_empty());
        j.append(finish("a")).unwrap();
        {
            // What a short write leaves: part of a line, and the flag `append` sets.
            let g = j.open.read();
            (&g.file).write_all(br#"{"op":"finish","id":"refu"#).unwrap();
            j.torn.store(true, Ordering::Release);
        }
        j.append(finish("b")).unwrap();
        // Another thread's line written after a torn one before the flag was seen.
        (&j.open.read().file).write_all(br#"{"op":"finish","id":"torn"#).unwrap();
        j.append(finish("c")).unwrap();
        assert_eq!(ids(&read(&numbered(&db, 1)).unwrap()), ["a", "b", "c"]);
        // What a fold would write: every acknowledged change, in order.
        let (ops, closed) = j.take().unwrap();
        assert_eq!(ids(&ops), ["a", "b", "c"]);
        assert!(closed.is_none(), "a young, small file is not rotated");
    }

    /// A rotation hands back the closed file; later changes go to the next one.
    #[test]
    fn rotation_closes_the_file_and_keeps_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("s.db");
        let (j, _) = Journal::open(&db).unwrap();
        j.append(finish("a")).unwrap();
        j.open.write().opened -= ROTATE_AFTER;
        let (ops, closed) = j.take().unwrap();
        assert_eq!(ids(&ops), ["a"]);
        assert_eq!(closed, Some(numbered(&db, 1)));
        j.append(finish("b")).unwrap();
        assert_eq!(ids(&read(&numbered(&db, 2)).unwrap()), ["b"]);
        // A new process finds both files, oldest first.
        drop(j);
        let (_, left) = Journal::open(&db).unwrap();
        assert_eq!(left, [numbered(&db, 1), numbered(&db, 2)]);
    }

    /// Appends from several threads while files rotate: every change is taken exactly once, and a
    /// closed file only holds changes taken by then (so deleting it once they are folded loses nothing).
    #[test]
    fn concurrent_appends_and_rotations_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("s.db");
        let (j, _) = Journal::open(&db).unwrap();
        let j = Arc::new(j);
        let writers: Vec<_> = (0..4)
            .map(|t| {
                let j = Arc::clone(&j);
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        j.append(finish(&format!("{t}-{i}"))).unwrap();
                    }
                })
            })
            .collect();
        let mut taken = std::collections::HashSet::new();
        let mut rounds = 0;
        while rounds < 20 || writers.iter().any(|w| !w.is_finished()) {
            j.open.write().opened -= ROTATE_AFTER;
            let (ops, closed) = j.take().unwrap();
            for id in ids(&ops) {
                assert!(taken.insert(id), "a change was taken twice");
            }
            if let Some(f) = closed {
                for id in ids(&read(&f).unwrap()) {
                    assert!(taken.contains(&id), "{id} is in a closed file but was not taken with it");
                }
            }
            rounds += 1;
        }
        for w in writers {
            w.join().unwrap();
        }
        let (ops, _) = j.take().unwrap();
        taken.extend(ids(&ops));
        assert_eq!(taken.len(), 8000);
    }

    /// A clean stop removes the journal only once nothing in it is left unfolded, then refuses appends.
    #[tokio::test]
    async fn closing_removes_only_a_folded_journal() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("s.db");
        let (j, _) = Journal::open(&db).unwrap();
        j.append(finish("a")).unwrap();
        assert!(!j.close_if_folded().await, "a change is not in the database yet");
        assert!(numbered(&db, 1).exists());
        let (ops, _) = j.take().unwrap();
        assert_eq!(ids(&ops), ["a"]);
        assert!(j.close_if_folded().await);
        assert!(!numbered(&db, 1).exists());
        let err = j.append(finish("b")).unwrap_err();
        assert!(err.to_string().contains("closed"), "{err}");
    }
}
