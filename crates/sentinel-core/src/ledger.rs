//! Append-only JSONL files with a SHA-256 hash chain: the ledger and the interventions log.
//!
//! Each line is a JSON object that ends with `"seq":N,"prev_hash":"<64 hex>","hash":"<64 hex>"}`.
//! `hash` is the SHA-256 of the line's own bytes up to (not including) `,"hash":`, so it covers
//! every field and `prev_hash`; `prev_hash` is the previous line's `hash` (64 zeros for the first).
//! Any edit, deletion or reordering breaks the chain. A `<file>.head` anchor holds the newest
//! `seq` and `hash`, so cutting lines off the end is detected too.
//!
//! When an entry reaches the OS is [`Handoff`]: by default entries are chained (seq and hash fixed)
//! when `append` returns and written in groups, one `write(2)` per group, at most about a
//! millisecond later, by a writer thread ("group commit"); [`ChainWriter::flush`] and dropping the
//! writer write whatever is left. [`Handoff::EveryEntry`] writes each entry before `append` returns.
//! A group is whole lines, so a reader never sees half an entry unless the process died mid-write,
//! which the next open detects and sets aside. Files rotate by size to `<stem>.<NNNNNN>.jsonl`; the
//! chain continues across them.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use serde::Serialize;

use crate::records::CallLine;
use sha2::{Digest, Sha256};

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

const HASH_TAIL: &[u8] = b",\"hash\":\"";
const PREV_KEY: &[u8] = b",\"prev_hash\":\"";
const SEQ_KEY: &[u8] = b",\"seq\":";
const HEAD_LEN: usize = 20 + 1 + 64 + 1;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("cannot {what} `{path}`: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{path}` is in use by another process; give each process its own directory (AGENT_SENTINEL_HOME)")]
    Locked { path: PathBuf },
    #[error("`{path}` line {line}: {problem}; run `sentinel ledger verify {path}` before writing to it again")]
    Corrupt { path: PathBuf, line: u64, problem: String },
    #[error("cannot serialize a record: {0}")]
    Serialize(String),
    #[error(
        "{problem}; the entries not yet written are kept in memory and retried, and calls are refused until `{}` can be written again",
        path.display()
    )]
    Stalled { path: PathBuf, problem: String },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LedgerError + 'a {
    move |source| LedgerError::Io { what, path: path.to_path_buf(), source }
}

/// When an appended entry is handed to the OS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handoff {
    /// Group commit: a writer thread writes what was appended within `window` in one `write(2)`.
    /// A process killed without exiting loses the entries not yet written (normally the last
    /// window's; more if the writer thread was held up); the chain stays intact.
    Group { window: Duration },
    /// Each entry is written before `append` returns.
    EveryEntry,
}

impl Handoff {
    /// The default group-commit window.
    pub const WINDOW: Duration = Duration::from_millis(1);
}

/// Options for a chained log.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// Rotate when the active file reaches this many bytes.
    pub rotate_bytes: u64,
    /// `fsync` after every write (survives power loss, at a large cost in throughput).
    pub fsync: bool,
    pub handoff: Handoff,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions { rotate_bytes: 64 * 1024 * 1024, fsync: false, handoff: Handoff::Group { window: Handoff::WINDOW } }
    }
}

impl LogOptions {
    /// The values `AGENT_SENTINEL_LEDGER_SYNC` accepts.
    pub const SYNC_VALUES: &'static [&'static str] = &["group", "entry", "fsync"];

    /// Options from the value of `AGENT_SENTINEL_LEDGER_SYNC`: `group` (the default: written
    /// within about a millisecond, and at exit), `entry` (each entry written before the call
    /// returns) or `fsync` (each entry on disk before the call returns).
    pub fn from_sync_setting(value: &str) -> Result<Self, String> {
        let d = LogOptions::default();
        match value.trim().to_ascii_lowercase().as_str() {
            "" | "group" => Ok(d),
            "entry" => Ok(LogOptions { handoff: Handoff::EveryEntry, ..d }),
            "fsync" => Ok(LogOptions { handoff: Handoff::EveryEntry, fsync: true, ..d }),
            other => Err(format!(
                "AGENT_SENTINEL_LEDGER_SYNC is `{other}`; expected one of {}",
                Self::SYNC_VALUES.iter().map(|v| format!("`{v}`")).collect::<Vec<_>>().join(", ")
            )),
        }
    }
}

/// Groups larger than this are written by the appending thread itself (back-pressure).
const MAX_PENDING: usize = 4 << 20;
/// A queue this long is written at once, without waiting for the group-commit window.
const GROUP_NOW: usize = 64;
/// Buffer capacity kept between groups: enough for a busy millisecond, so a steady stream of
/// entries reuses the same memory instead of growing a buffer (and faulting in fresh pages) for
/// every group; what a burst grew beyond it is given back.
const KEEP_CAPACITY: usize = 4 << 20;

/// One entry waiting to be chained, in sequence order.
#[expect(clippy::large_enum_variant, reason = "kept inline: a box would be freed on the writer's thread")]
enum Pending {
    /// A whole record: the next `n` bytes of the queue buffer.
    Record(usize),
    /// A finished call: its payload is the next `n` bytes; the writer formats the rest.
    Call(usize, CallLine),
}

/// While a group is chained, its lines are written whenever this many bytes are waiting.
const WRITE_CHUNK: usize = 1 << 20;

/// Entries queued past this many are written by the appending thread itself (back-pressure).
const MAX_PENDING_ENTRIES: usize = 16 << 10;

/// What appends change: the last sequence number given out and the entries not yet chained.
struct WriterState {
    seq: u64,
    /// Serialized records (or call payloads) not yet chained, back to back; `pending` says where
    /// each ends.
    raw: Vec<u8>,
    pending: Vec<Pending>,
    closed: bool,
}

/// What writes change: the chain's end, the files and the bytes being written.
struct IoState {
    /// The chain's end: the last entry serialized into `out` (written or not).
    seq: u64,
    prev: [u8; 64],
    /// Reused buffer for one line.
    line: Vec<u8>,
    /// The queue buffers last taken from the appenders, emptied: swapped back in at the next
    /// group, so neither side allocates a queue per group.
    spare_raw: Vec<u8>,
    spare_pending: Vec<Pending>,
    file: File,
    head: File,
    size: u64,
    out: Vec<u8>,
    /// Part of a line was written and the rest is still in `out`: no rotation until it is done.
    mid_line: bool,
}

struct Shared {
    path: PathBuf,
    opts: LogOptions,
    state: Mutex<WriterState>,
    io: Mutex<IoState>,
    wake: Condvar,
    /// The last write failed and the next has not succeeded yet (checked before every call).
    failing: AtomicBool,
}

/// What happened when a log was opened.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recovery {
    /// Bytes of an incomplete last line that were moved to the quarantine file.
    pub torn_bytes: u64,
    pub quarantine: Option<PathBuf>,
}

/// A hash-chained JSONL file that one process appends to.
pub struct ChainWriter {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
    _lock: File,
    recovery: Recovery,
    recovery_noted: AtomicBool,
}

impl std::fmt::Debug for ChainWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainWriter").field("path", &self.shared.path).finish_non_exhaustive()
    }
}

/// Where one appended entry goes: its place in the chain.
#[derive(Debug, Clone, PartialEq)]
pub struct Appended {
    pub seq: u64,
}

impl ChainWriter {
    /// Opens (or creates) the log at `path`, recovering from a torn last line if needed.
    pub fn open(path: &Path, opts: LogOptions) -> Result<Self, LedgerError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        }
        let lock_path = sidecar(path, "lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(LedgerError::Locked { path: path.to_path_buf() });
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(LedgerError::Io { what: "lock", path: lock_path, source: e });
            }
        }
        let mut file =
            OpenOptions::new().create(true).read(true).append(true).open(path).map_err(io_err("open", path))?;
        let recovery = recover_tail(path, &mut file)?;
        let (seq, prev) = match last_line(path, &mut file)? {
            Some((offset, line)) => {
                let Some(parsed) = parse_tail(&line) else {
                    return Err(LedgerError::Corrupt {
                        path: path.to_path_buf(),
                        line: line_number(&mut file, offset),
                        problem: "the last line does not end with `seq`, `prev_hash` and `hash`".into(),
                    });
                };
                let computed = sha_hex(parsed.hashed);
                if computed.as_bytes() != parsed.hash {
                    return Err(LedgerError::Corrupt {
                        path: path.to_path_buf(),
                        line: line_number(&mut file, offset),
                        problem: "the last line's hash does not match its contents".into(),
                    });
                }
                let mut prev = [0u8; 64];
                prev.copy_from_slice(parsed.hash);
                (parsed.seq, prev)
            }
            None => previous_segment_head(path)?,
        };
        let size = file.metadata().map_err(io_err("stat", path))?.len();
        let head_path = sidecar(path, "head");
        let head = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&head_path)
            .map_err(io_err("open", &head_path))?;
        if seq > 0 {
            write_head(&head, seq, &prev).map_err(io_err("write", &head_path))?;
        }
        let handoff = opts.handoff;
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            opts,
            state: Mutex::new(WriterState {
                seq,
                raw: Vec::with_capacity(64 * 1024),
                pending: Vec::with_capacity(1024),
                closed: false,
            }),
            io: Mutex::new(IoState {
                seq,
                prev,
                line: Vec::with_capacity(1024),
                spare_raw: Vec::with_capacity(64 * 1024),
                spare_pending: Vec::with_capacity(1024),
                file,
                head,
                size,
                out: Vec::with_capacity(64 * 1024),
                mid_line: false,
            }),
            wake: Condvar::new(),
            failing: AtomicBool::new(false),
        });
        let writer = match handoff {
            Handoff::Group { window } => {
                let s = Arc::clone(&shared);
                let name = format!("sentinel-log-{}", path.file_stem().and_then(|n| n.to_str()).unwrap_or("log"));
                let thread = std::thread::Builder::new().name(name).spawn(move || s.run_writer(window));
                Some(thread.map_err(io_err("start the writer thread for", path))?)
            }
            Handoff::EveryEntry => None,
        };
        Ok(ChainWriter { shared, writer, _lock: lock, recovery, recovery_noted: AtomicBool::new(false) })
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// True exactly once: whoever gets it records the recovery in the ledger.
    pub fn take_recovery_note(&self) -> bool {
        !self.recovery_noted.swap(true, Ordering::SeqCst)
    }

    /// The sequence number of the newest entry (0 when empty).
    pub fn seq(&self) -> u64 {
        self.shared.state.lock().seq
    }

    /// Appends one record (it must serialize to a JSON object), serialized now. When this returns
    /// the entry has its sequence number; it is chained and handed to the OS with its group (see
    /// [`LogOptions::handoff`]).
    pub fn append<T: Serialize + ?Sized>(&self, record: &T) -> Result<Appended, LedgerError> {
        self.append_record(|out| serde_json::to_writer(out, record))
    }

    /// [`ChainWriter::append`] for a ledger line, with its own serializer.
    pub fn append_line<P: crate::records::LinePayload>(
        &self,
        line: &crate::records::LedgerLine<'_, P>,
    ) -> Result<Appended, LedgerError> {
        self.append_record(|out| line.write_json(out))
    }

    /// Appends a finished call's line: `payload` writes its payload object now (on the caller's
    /// thread, where the call's values are); the writer thread formats the rest from `line`.
    pub fn append_call(
        &self,
        line: CallLine,
        payload: impl FnOnce(&mut Vec<u8>) -> serde_json::Result<()>,
    ) -> Result<Appended, LedgerError> {
        self.append_with(payload, |len| Pending::Call(len, line))
    }

    fn append_record(
        &self,
        write: impl FnOnce(&mut Vec<u8>) -> serde_json::Result<()>,
    ) -> Result<Appended, LedgerError> {
        self.append_with(write, Pending::Record)
    }

    fn append_with(
        &self,
        write: impl FnOnce(&mut Vec<u8>) -> serde_json::Result<()>,
        entry: impl FnOnce(usize) -> Pending,
    ) -> Result<Appended, LedgerError> {
        self.check()?;
        let mut guard = self.shared.state.lock();
        let st = &mut *guard;
        let before = st.raw.len();
        if let Err(e) = write(&mut st.raw) {
            st.raw.truncate(before);
            return Err(LedgerError::Serialize(e.to_string()));
        }
        let len = st.raw.len() - before;
        if st.raw.get(before) != Some(&b'{') || st.raw.last() != Some(&b'}') {
            st.raw.truncate(before);
            return Err(LedgerError::Serialize("a ledger record must be a JSON object".into()));
        }
        st.pending.push(entry(len));
        st.seq += 1;
        let seq = st.seq;
        let first = st.pending.len() == 1;
        let full = st.raw.len() >= MAX_PENDING || st.pending.len() >= MAX_PENDING_ENTRIES;
        drop(guard);
        let sh = &*self.shared;
        match sh.opts.handoff {
            Handoff::EveryEntry => sh.flush()?,
            Handoff::Group { .. } if full => sh.flush()?,
            Handoff::Group { .. } => {
                if first {
                    sh.wake.notify_one();
                }
            }
        }
        Ok(Appended { seq })
    }

    /// Hands every appended entry to the OS (and to the disk with `fsync`) before returning.
    pub fn flush(&self) -> Result<(), LedgerError> {
        self.shared.flush()
    }

    /// Ok while the log can be written; otherwise retries the write and returns its error. Costs
    /// one atomic load when all is well.
    pub fn check(&self) -> Result<(), LedgerError> {
        if self.shared.failing.load(Ordering::Acquire) { self.shared.flush() } else { Ok(()) }
    }
}

impl Drop for ChainWriter {
    fn drop(&mut self) {
        self.shared.state.lock().closed = true;
        self.shared.wake.notify_all();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        // Whatever is left; an error here has nobody to go to but the next open's recovery.
        let _ = self.shared.flush();
    }
}

impl Shared {
    /// The group-commit thread: waits for a first entry, gathers for `window`, writes the group.
    fn run_writer(&self, window: Duration) {
        loop {
            let backlog = {
                let mut st = self.state.lock();
                while st.pending.is_empty() && !self.failing.load(Ordering::Acquire) && !st.closed {
                    self.wake.wait(&mut st);
                }
                if st.closed {
                    return;
                }
                if self.failing.load(Ordering::Acquire) {
                    // Retry a failing write ten times a second.
                    self.wake.wait_for(&mut st, Duration::from_millis(100));
                    if st.closed {
                        return;
                    }
                }
                st.pending.len() >= GROUP_NOW
            };
            // The window gathers a group; once entries arrive faster than groups are written,
            // each group is what came in while the last one was written, with no pause between.
            if !backlog {
                std::thread::sleep(window);
            }
            let _ = self.flush();
        }
    }

    fn flush(&self) -> Result<(), LedgerError> {
        let mut io = self.io.lock();
        let io = &mut *io;
        // Take the queue (appenders go on in the spare buffers), then chain it here: hashing is
        // the writer's work, not the caller's.
        let mut raw = std::mem::take(&mut io.spare_raw);
        let mut pending = std::mem::take(&mut io.spare_pending);
        {
            let mut st = self.state.lock();
            std::mem::swap(&mut st.raw, &mut raw);
            std::mem::swap(&mut st.pending, &mut pending);
        }
        let mut at = 0;
        let mut failed = None;
        for p in &pending {
            if failed.is_none() && io.out.len() >= WRITE_CHUNK {
                // A big group goes out in pieces, so its lines are not all held in memory twice.
                failed = self.write_out(io).err();
            }
            let IoState { line, seq, prev, out, .. } = &mut *io;
            line.clear();
            let (n, call) = match p {
                Pending::Record(n) => (*n, None),
                Pending::Call(n, c) => (*n, Some(c)),
            };
            let bytes = raw.get(at..at + n).unwrap_or_default();
            at += n;
            match call {
                None => line.extend_from_slice(bytes),
                Some(c) => {
                    if let Err(e) = c.write_json(bytes, line) {
                        // Cannot happen for these fields; the entry keeps its place in the chain.
                        line.clear();
                        let _ = serde_json::to_writer(&mut *line, &serde_json::json!({"ledger_error": e.to_string()}));
                    }
                }
            }
            chain(line, seq, prev);
            out.extend_from_slice(line);
        }
        if io.line.capacity() > 64 << 10 {
            io.line = Vec::with_capacity(1024);
        }
        // The emptied buffers are the next spares (smaller again after a burst).
        raw.clear();
        pending.clear();
        raw.shrink_to(KEEP_CAPACITY);
        pending.shrink_to(MAX_PENDING_ENTRIES / 4);
        io.spare_raw = raw;
        io.spare_pending = pending;
        if let Some(e) = failed {
            // The rest is chained and kept in `out`, like the unwritten part; the retry writes it.
            self.failing.store(true, Ordering::Release);
            return Err(LedgerError::Stalled { path: self.path.clone(), problem: e.to_string() });
        }
        if io.out.is_empty() {
            return Ok(());
        }
        let result = self.write_out(io);
        self.failing.store(result.is_err(), Ordering::Release);
        result.map_err(|e| LedgerError::Stalled { path: self.path.clone(), problem: e.to_string() })
    }

    fn write_out(&self, io: &mut IoState) -> Result<(), LedgerError> {
        if io.size >= self.opts.rotate_bytes && io.size > 0 && !io.mid_line {
            self.rotate(io)?;
        }
        // `write_all` would not say how much was written before an error; the rest is kept.
        let mut done = 0;
        let mut error = None;
        while done < io.out.len() && error.is_none() {
            match io.file.write(io.out.get(done..).unwrap_or_default()) {
                Ok(0) => error = Some(io::Error::new(io::ErrorKind::WriteZero, "the file system took no more bytes")),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => error = Some(e),
            }
        }
        io.size += done as u64;
        if let Some(source) = error {
            io.out.drain(..done);
            io.mid_line |= done > 0;
            return Err(LedgerError::Io { what: "append to", path: self.path.clone(), source });
        }
        io.out.clear();
        if io.out.capacity() > KEEP_CAPACITY {
            // A burst grew the buffer; do not keep its memory for good.
            io.out.shrink_to(KEEP_CAPACITY);
        }
        io.mid_line = false;
        if self.opts.fsync {
            io.file.sync_data().map_err(io_err("sync", &self.path))?;
        }
        write_head(&io.head, io.seq, &io.prev).map_err(io_err("write", &sidecar(&self.path, "head")))
    }

    fn rotate(&self, io: &mut IoState) -> Result<(), LedgerError> {
        io.file.sync_all().map_err(io_err("sync", &self.path))?;
        let next = segments(&self.path)?.iter().filter_map(|(n, _)| *n).max().unwrap_or(0) + 1;
        let target = segment_path(&self.path, next);
        fs::rename(&self.path, &target).map_err(io_err("rotate", &self.path))?;
        io.file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&self.path)
            .map_err(io_err("open", &self.path))?;
        io.size = 0;
        Ok(())
    }
}

/// Turns one serialized record (`{...}`) into its chained line: the next sequence number, the
/// previous hash, and the hash of everything before `,"hash":`, then a newline. Advances the chain.
fn chain(line: &mut Vec<u8>, seq: &mut u64, prev: &mut [u8; 64]) {
    line.pop();
    *seq += 1;
    if line.len() > 1 {
        line.extend_from_slice(SEQ_KEY);
    } else {
        line.extend_from_slice(SEQ_KEY.get(1..).unwrap_or_default());
    }
    let mut digits = [0u8; 20];
    line.extend_from_slice(format_u64(*seq, &mut digits));
    line.extend_from_slice(PREV_KEY);
    line.extend_from_slice(prev);
    line.push(b'"');
    let mut hash = [0u8; 64];
    let _ = hex::encode_to_slice(Sha256::digest(&line[..]), &mut hash);
    line.extend_from_slice(HASH_TAIL);
    line.extend_from_slice(&hash);
    line.extend_from_slice(b"\"}\n");
    *prev = hash;
}

/// Decimal digits of `n`, written into `buf`.
fn format_u64(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        if let Some(b) = buf.get_mut(i) {
            *b = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    buf.get(i..).unwrap_or_default()
}

fn sha_hex(bytes: &[u8]) -> String {
    let mut out = [0u8; 64];
    // 32 bytes always fit 64 hex digits.
    let _ = hex::encode_to_slice(Sha256::digest(bytes), &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn write_head(head: &File, seq: u64, hash: &[u8; 64]) -> io::Result<()> {
    let mut buf = [b'0'; HEAD_LEN];
    let mut digits = [0u8; 20];
    let d = format_u64(seq, &mut digits);
    let (num, rest) = buf.split_at_mut(20);
    if let Some(tail) = num.get_mut(20 - d.len()..) {
        tail.copy_from_slice(d);
    }
    let (space, rest) = rest.split_at_mut(1);
    space.fill(b' ');
    let (h, nl) = rest.split_at_mut(64);
    h.copy_from_slice(hash);
    nl.fill(b'\n');
    head.write_all_at(&buf, 0)
}

/// Reads a `.head` anchor: the newest `seq` and `hash` the writer recorded.
pub fn read_head(log: &Path) -> Option<(u64, String)> {
    let text = fs::read_to_string(sidecar(log, "head")).ok()?;
    let (seq, hash) = text.trim().split_once(' ')?;
    Some((seq.parse().ok()?, hash.to_string()))
}

/// `ledger.jsonl` → `ledger.jsonl.<ext>`.
pub fn sidecar(path: &Path, ext: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// `ledger.jsonl` → `ledger.000003.jsonl`.
pub fn segment_path(path: &Path, n: u64) -> PathBuf {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("ledger");
    let ext = path.extension().and_then(|s| s.to_str()).unwrap_or("jsonl");
    path.with_file_name(format!("{stem}.{n:06}.{ext}"))
}

/// Every file of a log, oldest first: rotated segments by number, then the active file.
pub fn segments(path: &Path) -> Result<Vec<(Option<u64>, PathBuf)>, LedgerError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("ledger");
    let ext = path.extension().and_then(|s| s.to_str()).unwrap_or("jsonl");
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => {
            return Err(LedgerError::Io { what: "list", path: dir.to_path_buf(), source: e });
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(mid) = name.strip_prefix(stem).and_then(|r| r.strip_prefix('.')).and_then(|r| r.strip_suffix(ext))
        else {
            continue;
        };
        let Some(num) = mid.strip_suffix('.') else {
            continue;
        };
        if num.len() == 6
            && let Ok(n) = num.parse::<u64>()
        {
            out.push((Some(n), entry.path()));
        }
    }
    out.sort();
    if path.exists() {
        out.push((None, path.to_path_buf()));
    }
    Ok(out)
}

fn previous_segment_head(path: &Path) -> Result<(u64, [u8; 64]), LedgerError> {
    let mut prev = [0u8; 64];
    prev.copy_from_slice(GENESIS.as_bytes());
    let segs = segments(path)?;
    let Some((_, last)) = segs.iter().rev().find(|(n, _)| n.is_some()) else {
        return Ok((0, prev));
    };
    let mut f = File::open(last).map_err(io_err("open", last))?;
    match last_line(last, &mut f)? {
        Some((offset, line)) => {
            let Some(t) = parse_tail(&line) else {
                return Err(LedgerError::Corrupt {
                    path: last.clone(),
                    line: line_number(&mut f, offset),
                    problem: "the last line has no hash chain fields".into(),
                });
            };
            prev.copy_from_slice(t.hash);
            Ok((t.seq, prev))
        }
        None => Ok((0, prev)),
    }
}

/// Moves an incomplete last line (no trailing newline) to `<file>.torn`, so nothing is lost
/// and the chain continues from the last complete entry.
fn recover_tail(path: &Path, file: &mut File) -> Result<Recovery, LedgerError> {
    let len = file.metadata().map_err(io_err("stat", path))?.len();
    if len == 0 {
        return Ok(Recovery::default());
    }
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, len - 1).map_err(io_err("read", path))?;
    if last[0] == b'\n' {
        return Ok(Recovery::default());
    }
    // Find the start of the torn tail: the byte after the last newline.
    let mut pos = len;
    let mut buf = vec![0u8; 64 * 1024];
    let cut = loop {
        let start = pos.saturating_sub(buf.len() as u64);
        let n = usize::try_from(pos - start).unwrap_or(0);
        let chunk = buf.get_mut(..n).unwrap_or_default();
        file.read_exact_at(chunk, start).map_err(io_err("read", path))?;
        if let Some(i) = chunk.iter().rposition(|b| *b == b'\n') {
            break start + i as u64 + 1;
        }
        if start == 0 {
            break 0;
        }
        pos = start;
    };
    let mut torn = vec![0u8; usize::try_from(len - cut).unwrap_or(0)];
    file.read_exact_at(&mut torn, cut).map_err(io_err("read", path))?;
    let q = sidecar(path, "torn");
    let mut qf = OpenOptions::new().create(true).append(true).open(&q).map_err(io_err("open", &q))?;
    let header = format!(
        "# torn tail of {} at byte {cut}, {} bytes, set aside {}\n",
        path.display(),
        torn.len(),
        crate::ledger::now_rfc3339()
    );
    qf.write_all(header.as_bytes()).map_err(io_err("write", &q))?;
    qf.write_all(&torn).map_err(io_err("write", &q))?;
    qf.write_all(b"\n").map_err(io_err("write", &q))?;
    qf.sync_all().map_err(io_err("sync", &q))?;
    file.set_len(cut).map_err(io_err("truncate", path))?;
    file.sync_all().map_err(io_err("sync", path))?;
    Ok(Recovery { torn_bytes: torn.len() as u64, quarantine: Some(q) })
}

/// The last complete line of a file, with the byte offset where it starts. Only the tail is read.
fn last_line(path: &Path, file: &mut File) -> Result<Option<(u64, Vec<u8>)>, LedgerError> {
    let len = file.metadata().map_err(io_err("stat", path))?.len();
    if len == 0 {
        return Ok(None);
    }
    let mut pos = len - 1; // skip the final newline
    let mut collected: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let start = pos.saturating_sub(buf.len() as u64);
        let n = usize::try_from(pos - start).unwrap_or(0);
        let chunk = buf.get_mut(..n).unwrap_or_default();
        file.read_exact_at(chunk, start).map_err(io_err("read", path))?;
        if let Some(i) = chunk.iter().rposition(|b| *b == b'\n') {
            let mut line = chunk.get(i + 1..).unwrap_or_default().to_vec();
            line.extend_from_slice(&collected);
            return Ok(Some((start + i as u64 + 1, line)));
        }
        let mut c = chunk.to_vec();
        c.extend_from_slice(&collected);
        collected = c;
        if start == 0 {
            return Ok(Some((0, collected)));
        }
        pos = start;
    }
}

/// The 1-based number of the line starting at byte `offset`: reads the file up to there, so it is
/// only called to name a line in an error.
fn line_number(file: &mut File, offset: u64) -> u64 {
    count_lines(file, offset).unwrap_or(0) + 1
}

fn count_lines(file: &mut File, upto: u64) -> io::Result<u64> {
    file.seek(SeekFrom::Start(0))?;
    let mut r = io::BufReader::new(file.take(upto));
    let mut buf = [0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf)?;
        if k == 0 {
            return Ok(n);
        }
        n += buf.iter().take(k).filter(|b| **b == b'\n').count() as u64;
    }
}

/// The chain fields at the end of one line.
pub struct Tail<'a> {
    /// The bytes the hash covers.
    pub hashed: &'a [u8],
    pub seq: u64,
    pub prev: &'a [u8],
    pub hash: &'a [u8],
}

impl Tail<'_> {
    /// Whether `hash` is the SHA-256 of the hashed bytes, in lowercase hex (computed on the stack).
    pub fn hash_matches(&self) -> bool {
        let mut computed = [0u8; 64];
        hex::encode_to_slice(Sha256::digest(self.hashed), &mut computed).is_ok() && self.hash == computed
    }
}

/// Splits a line (without its newline) into the hashed part and the chain fields.
pub fn parse_tail(line: &[u8]) -> Option<Tail<'_>> {
    // ...,"seq":N,"prev_hash":"<64>","hash":"<64>"}
    let n = line.len();
    let end = n.checked_sub(2)?;
    if line.get(end..)? != b"\"}" {
        return None;
    }
    let hash_start = end.checked_sub(64)?;
    let hash = line.get(hash_start..end)?;
    let tail_start = hash_start.checked_sub(HASH_TAIL.len())?;
    if line.get(tail_start..hash_start)? != HASH_TAIL {
        return None;
    }
    let hashed = line.get(..tail_start)?;
    // hashed ends with ,"prev_hash":"<64>"
    let prev_end = tail_start.checked_sub(1)?;
    if hashed.last()? != &b'"' {
        return None;
    }
    let prev_start = prev_end.checked_sub(64)?;
    let prev = line.get(prev_start..prev_end)?;
    let key_start = prev_start.checked_sub(PREV_KEY.len())?;
    if line.get(key_start..prev_start)? != PREV_KEY {
        return None;
    }
    // seq digits end at key_start
    let digits_start = line.get(..key_start)?.iter().rposition(|b| !b.is_ascii_digit())? + 1;
    let digits = line.get(digits_start..key_start)?;
    if digits.is_empty() || digits.len() > 20 {
        return None;
    }
    let before = line.get(..digits_start)?;
    if !(before.ends_with(SEQ_KEY) || before == b"{\"seq\":") {
        return None;
    }
    let seq = std::str::from_utf8(digits).ok()?.parse().ok()?;
    if !hash.iter().chain(prev.iter()).all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)) {
        return None;
    }
    Some(Tail { hashed, seq, prev, hash })
}

/// The first problem `verify` found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerifyFailure {
    pub file: PathBuf,
    /// 1-based line number in `file` (0 for problems with the anchor).
    pub line: u64,
    pub seq: Option<u64>,
    pub problem: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerifyReport {
    pub files: Vec<PathBuf>,
    pub entries: u64,
    pub last_seq: u64,
    pub last_hash: String,
    /// Whether the `.head` anchor was present and matched.
    pub anchored: bool,
    /// The entry the `.head` anchor records, when it was present and consistent.
    pub anchor_seq: Option<u64>,
    pub failure: Option<VerifyFailure>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.failure.is_none()
    }
}

/// What one chunk of a file holds, verified on its own; chunks are linked afterwards.
struct Chunk {
    lines: u64,
    first: Option<(u64, [u8; 64])>,
    last: Option<(u64, [u8; 64])>,
    /// Line within the chunk (1-based), seq, problem.
    failure: Option<(u64, Option<u64>, String)>,
}

fn to64(b: &[u8]) -> [u8; 64] {
    let mut out = [0u8; 64];
    if b.len() == 64 {
        out.copy_from_slice(b);
    }
    out
}

fn verify_chunk(data: &[u8], is_file_end: bool) -> Chunk {
    let mut c = Chunk { lines: 0, first: None, last: None, failure: None };
    let mut rest = data;
    while !rest.is_empty() {
        c.lines += 1;
        let (line, next) = match memchr::memchr(b'\n', rest) {
            Some(i) => (rest.get(..i).unwrap_or_default(), rest.get(i + 1..).unwrap_or_default()),
            None => {
                let problem = if is_file_end {
                    format!(
                        "the last line is incomplete ({} bytes, no newline): a torn write; opening the ledger for writing sets it aside",
                        rest.len()
                    )
                } else {
                    "line is not terminated".to_string()
                };
                c.failure = Some((c.lines, None, problem));
                return c;
            }
        };
        rest = next;
        let Some(t) = parse_tail(line) else {
            c.failure = Some((c.lines, None, "line does not end with the `seq`, `prev_hash` and `hash` fields".into()));
            return c;
        };
        match c.last {
            None => c.first = Some((t.seq, to64(t.prev))),
            Some((seq, hash)) => {
                if t.seq != seq + 1 {
                    c.failure = Some((
                        c.lines,
                        Some(t.seq),
                        format!(
                            "sequence number is {} but {} was expected: a line was deleted, duplicated or moved",
                            t.seq,
                            seq + 1
                        ),
                    ));
                    return c;
                }
                if t.prev != hash {
                    c.failure = Some((
                        c.lines,
                        Some(t.seq),
                        "`prev_hash` does not match the previous line's `hash`: lines were removed, reordered or edited".into(),
                    ));
                    return c;
                }
            }
        }
        if !t.hash_matches() {
            c.failure =
                Some((c.lines, Some(t.seq), "`hash` does not match the line's contents: the line was edited".into()));
            return c;
        }
        c.last = Some((t.seq, to64(t.hash)));
    }
    c
}

/// Splits `data` into about `n` pieces, each ending just after a newline.
fn split_lines(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut out = Vec::with_capacity(n);
    let mut rest = data;
    let target = data.len() / n.max(1) + 1;
    while !rest.is_empty() {
        if out.len() + 1 >= n || rest.len() <= target {
            out.push(rest);
            break;
        }
        let cut = match memchr::memchr(b'\n', rest.get(target..).unwrap_or_default()) {
            Some(i) => target + i + 1,
            None => rest.len(),
        };
        let (head, tail) = rest.split_at(cut.min(rest.len()));
        out.push(head);
        rest = tail;
    }
    out
}

/// Checks every line of a log and its rotated segments. Stops at the first problem and names it.
/// Lines are hashed on all cores; the chain is then linked across the pieces in order.
pub fn verify(path: &Path) -> Result<VerifyReport, LedgerError> {
    let segs = segments(path)?;
    let mut report = VerifyReport {
        files: segs.iter().map(|(_, p)| p.clone()).collect(),
        entries: 0,
        last_seq: 0,
        last_hash: GENESIS.to_string(),
        anchored: false,
        anchor_seq: None,
        failure: None,
    };
    let mut prev = to64(GENESIS.as_bytes());
    let mut expect_seq = 1u64;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    for (_, file) in &segs {
        let data = fs::read(file).map_err(io_err("read", file))?;
        let pieces = if data.len() > (1 << 20) { split_lines(&data, threads) } else { vec![data.as_slice()] };
        let count = pieces.len();
        let chunks: Vec<Chunk> = if count > 1 {
            std::thread::scope(|s| {
                let handles: Vec<_> =
                    pieces.iter().enumerate().map(|(i, p)| s.spawn(move || verify_chunk(p, i + 1 == count))).collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or(Chunk {
                            lines: 0,
                            first: None,
                            last: None,
                            failure: Some((1, None, "verification thread failed".into())),
                        })
                    })
                    .collect()
            })
        } else {
            pieces.iter().map(|p| verify_chunk(p, true)).collect()
        };
        let mut line_base = 0u64;
        for c in chunks {
            let fail =
                |line: u64, seq: Option<u64>, problem: String| VerifyFailure { file: file.clone(), line, seq, problem };
            if let Some((seq, p)) = c.first {
                if seq != expect_seq {
                    report.failure = Some(fail(
                        line_base + 1,
                        Some(seq),
                        format!(
                            "sequence number is {seq} but {expect_seq} was expected: a line was deleted, duplicated or moved"
                        ),
                    ));
                    return Ok(report);
                }
                if p != prev {
                    report.failure = Some(fail(
                        line_base + 1,
                        Some(seq),
                        "`prev_hash` does not match the previous line's `hash`: lines were removed, reordered or edited".into(),
                    ));
                    return Ok(report);
                }
            }
            if let Some((seq, hash)) = c.last {
                report.entries += seq + 1 - expect_seq;
                report.last_seq = seq;
                expect_seq = seq + 1;
                prev = hash;
            }
            if let Some((line, seq, problem)) = c.failure {
                report.failure = Some(fail(line_base + line, seq, problem));
                return Ok(report);
            }
            line_base += c.lines;
        }
    }
    report.last_hash = String::from_utf8_lossy(&prev).into_owned();
    if let Some((seq, hash)) = read_head(path) {
        if seq > report.last_seq {
            report.failure = Some(VerifyFailure {
                file: sidecar(path, "head"),
                line: 0,
                seq: Some(seq),
                problem: format!(
                    "the anchor records entry {seq} but the ledger ends at entry {}: lines were cut off the end",
                    report.last_seq
                ),
            });
        } else if seq == report.last_seq && hash != report.last_hash {
            report.failure = Some(VerifyFailure {
                file: sidecar(path, "head"),
                line: 0,
                seq: Some(seq),
                problem: "the anchor's hash does not match the last entry: the end of the ledger was rewritten".into(),
            });
        } else {
            // The anchor trails the end when the writer was stopped between writing a group and
            // recording it (a crash): entries after it are chained but not anchored.
            report.anchored = seq == report.last_seq;
            report.anchor_seq = Some(seq);
        }
    }
    Ok(report)
}

/// Reads every complete line of a log (all segments) as JSON values, oldest first.
pub fn read_all(path: &Path) -> Result<Vec<serde_json::Value>, LedgerError> {
    let mut out = Vec::new();
    for (_, file) in segments(path)? {
        let data = fs::read(&file).map_err(io_err("read", &file))?;
        for (i, line) in data.split(|b| *b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let v = serde_json::from_slice(line).map_err(|e| LedgerError::Corrupt {
                path: file.clone(),
                line: i as u64 + 1,
                problem: format!("not valid JSON: {e}"),
            })?;
            out.push(v);
        }
    }
    Ok(out)
}

/// The current time as RFC 3339 with microseconds, in UTC (`2026-11-21T14:30:00.123456Z`).
pub fn now_rfc3339() -> String {
    let b = Rfc3339::now();
    b.as_str().to_string()
}

/// An RFC 3339 UTC timestamp with microseconds, formatted on the stack (no allocation; it is
/// taken for every ledger line).
pub struct Rfc3339([u8; 27]);

impl Rfc3339 {
    pub fn now() -> Self {
        Self::at(std::time::SystemTime::now())
    }

    /// The timestamp of `at`. The date and time of day are formatted once per second per thread
    /// (chrono does the calendar); within that second only the microseconds are written.
    pub fn at(at: std::time::SystemTime) -> Self {
        use std::cell::Cell;
        thread_local! {
            static SECOND: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
        }
        let d = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let secs = d.as_secs();
        let prefix = SECOND.with(|c| {
            let (cached, p) = c.get();
            if cached == secs {
                return p;
            }
            let p = Self::second(at);
            c.set((secs, p));
            p
        });
        let mut b = *b"0000-00-00T00:00:00.000000Z";
        if let Some(head) = b.get_mut(..19) {
            head.copy_from_slice(&prefix);
        }
        let mut v = d.subsec_micros();
        for i in (20..26).rev() {
            if let Some(x) = b.get_mut(i) {
                *x = b'0' + (v % 10) as u8;
            }
            v /= 10;
        }
        Rfc3339(b)
    }

    /// `YYYY-MM-DDTHH:MM:SS` of `at`.
    fn second(at: std::time::SystemTime) -> [u8; 19] {
        use chrono::{Datelike, Timelike};
        let t = chrono::DateTime::<chrono::Utc>::from(at);
        let mut b = *b"0000-00-00T00:00:00";
        let mut put = |at: usize, width: usize, mut v: u32| {
            for i in (at..at + width).rev() {
                if let Some(d) = b.get_mut(i) {
                    *d = b'0' + (v % 10) as u8;
                }
                v /= 10;
            }
        };
        put(0, 4, t.year().clamp(0, 9999) as u32);
        put(5, 2, t.month());
        put(8, 2, t.day());
        put(11, 2, t.hour());
        put(14, 2, t.minute());
        put(17, 2, t.second().min(59));
        b
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_match_chrono_rfc3339() {
        let ours = super::now_rfc3339();
        let parsed = chrono::DateTime::parse_from_rfc3339(&ours).expect("valid RFC 3339");
        let back = parsed.with_timezone(&chrono::Utc).to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        assert_eq!(ours, back);
        assert_eq!(ours.len(), 27);
        // Within one second (the cached date) and across seconds, days and years.
        let base = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_767_225_599); // 2025-12-31T23:59:59Z
        for step_us in [0u64, 1, 999_999, 1_000_000, 1_000_001, 86_400_000_000, 3_000_000_123] {
            let t = base + std::time::Duration::from_micros(step_us);
            let want = chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            assert_eq!(super::Rfc3339::at(t).as_str(), want);
        }
    }
}
