//! The reservation journal of the SQLite authority.
//!
//! Every reservation change must be durable before `/decide` answers, but a small SQLite commit per
//! group of decisions rewrites whole pages and makes the checkpointer copy them again: at tens of
//! thousands of decisions a second that write volume, not the decision, set the latency. So changes
//! are appended to a plain file first (one `write(2)` per group, handed to the OS like the ledger),
//! and a background task folds each closed file into SQLite in one large transaction, then deletes
//! it. At start, files left by an earlier process are folded before the counters are rebuilt, so
//! SQLite is always the whole truth when the engine restores from it.
//!
//! Files are `<database>.journal.<NNNNNN>`, one JSON object per line. A last line without its
//! newline (a crash while writing) was never acknowledged and is ignored. Folding is idempotent
//! (inserts ignore ids already stored; finishing sets a state), so a crash between folding a file
//! and deleting it is harmless.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use sentinel_store::{CounterOp, ReservationRow, Store};
use serde::{Deserialize, Serialize};

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

/// The open journal: the file being appended to, and its number.
pub struct Journal {
    db: PathBuf,
    current: Mutex<(u64, File)>,
    /// Files are folded one at a time, in order: a change must never reach the database before
    /// the reservation it finishes.
    pub(crate) folding: tokio::sync::Mutex<()>,
}

fn numbered(db: &Path, n: u64) -> PathBuf {
    let mut name = db.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".journal.{n:06}"));
    db.with_file_name(name)
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
    /// oldest first; fold them before deciding anything.
    pub fn open(db: &Path) -> io::Result<(Self, Vec<PathBuf>)> {
        let left = existing(db)?;
        let next = left.last().map_or(1, |(n, _)| n + 1);
        let file = OpenOptions::new().create_new(true).append(true).open(numbered(db, next))?;
        let journal =
            Journal { db: db.to_path_buf(), current: Mutex::new((next, file)), folding: tokio::sync::Mutex::new(()) };
        Ok((journal, left.into_iter().map(|(_, p)| p).collect()))
    }

    /// Appends a group of changes in one write.
    pub fn append(&self, ops: &[CounterOp]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(ops.len() * 320);
        for op in ops {
            serde_json::to_writer(&mut buf, &to_line(op)).map_err(io::Error::other)?;
            buf.push(b'\n');
        }
        self.current.lock().1.write_all(&buf)
    }

    /// Starts a new file; returns the one it replaces when that one holds anything.
    pub fn rotate(&self) -> io::Result<Option<PathBuf>> {
        let mut g = self.current.lock();
        if g.1.metadata()?.len() == 0 {
            return Ok(None);
        }
        let n = g.0 + 1;
        let file = OpenOptions::new().create_new(true).append(true).open(numbered(&self.db, n))?;
        let old = g.0;
        *g = (n, file);
        Ok(Some(numbered(&self.db, old)))
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
        match serde_json::from_slice::<Line>(raw).ok().and_then(from_line) {
            Some(op) => ops.push(op),
            None => tracing::error!(file = %path.display(), line = i + 1, "skipping a damaged journal line"),
        }
    }
    Ok(ops)
}

/// Writes a closed journal file into the database and deletes it.
pub async fn fold(store: &Store, path: &Path) -> Result<usize, String> {
    // File work happens off the request threads: a slow disk must not stall them.
    let p = path.to_path_buf();
    let ops = tokio::task::spawn_blocking(move || read(&p))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    for chunk in ops.chunks(2_000) {
        store.apply_counter_ops(chunk).await.map_err(|e| format!("cannot fold `{}`: {e}", path.display()))?;
        tokio::task::yield_now().await;
    }
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::remove_file(&p))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot remove `{}`: {e}", path.display()))?;
    Ok(ops.len())
}
