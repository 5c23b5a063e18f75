//! Budgets, rate-limit windows, loop histories and anomaly baselines.
//!
//! Every counter lives behind its own small lock, found through a sharded map, so calls for
//! different sessions or actions never wait on each other. Memory and per-call cost are bounded
//! by configuration (window capacity), never by traffic.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hashbrown::{Equivalent, HashMap};
use parking_lot::{Mutex, RwLock};

use crate::money::Usd;

const SHARDS: usize = 16;

/// A concurrent map from keys to shared cells, created on first use.
pub(crate) struct Registry<K, V> {
    shards: [RwLock<HashMap<K, Arc<V>>>; SHARDS],
    hasher: hashbrown::DefaultHashBuilder,
}

impl<K: Hash + Eq, V> Registry<K, V> {
    pub(crate) fn new() -> Self {
        Registry { shards: std::array::from_fn(|_| RwLock::new(HashMap::new())), hasher: Default::default() }
    }

    fn shard<Q: Hash + ?Sized>(&self, key: &Q) -> &RwLock<HashMap<K, Arc<V>>> {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        // `i < SHARDS` always holds; the fallback only satisfies the no-indexing lint.
        self.shards.get(i).unwrap_or(&self.shards[0])
    }

    /// Finds the cell for `key`, creating it with `make` when absent.
    pub(crate) fn get_or_insert<Q>(&self, key: &Q, to_owned: impl FnOnce() -> K, make: impl FnOnce() -> V) -> Arc<V>
    where
        Q: Hash + Equivalent<K> + ?Sized,
    {
        let shard = self.shard(key);
        if let Some(v) = shard.read().get(key) {
            return Arc::clone(v);
        }
        let mut w = shard.write();
        Arc::clone(w.entry(to_owned()).or_insert_with(|| Arc::new(make())))
    }

    pub(crate) fn get<Q>(&self, key: &Q) -> Option<Arc<V>>
    where
        Q: Hash + Equivalent<K> + ?Sized,
    {
        self.shard(key).read().get(key).map(Arc::clone)
    }

    pub(crate) fn retain(&self, mut keep: impl FnMut(&V) -> bool) {
        for s in &self.shards {
            s.write().retain(|_, v| keep(v));
        }
    }

    pub(crate) fn clear(&self) {
        for s in &self.shards {
            s.write().clear();
        }
    }
}

/// Borrowed form of a `(u64, Box<str>)` key; hashes identically.
#[derive(Hash)]
pub(crate) struct KeyRef<'a>(pub u64, pub &'a str);

impl Equivalent<(u64, Box<str>)> for KeyRef<'_> {
    fn equivalent(&self, key: &(u64, Box<str>)) -> bool {
        self.0 == key.0 && self.1 == &*key.1
    }
}

/// Spend within one session.
#[derive(Default)]
pub(crate) struct SessionState {
    pub spent: Usd,
    pub runs: Vec<(Box<str>, Usd)>,
    run_index: HashMap<Box<str>, u32>,
    pub actions: Vec<(Box<str>, ActionSpend)>,
    action_index: HashMap<Box<str>, u32>,
}

#[derive(Default, Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct ActionSpend {
    pub count: u64,
    pub spent: Usd,
}

impl SessionState {
    pub(crate) fn run_idx(&mut self, run: &str) -> u32 {
        if let Some(i) = self.run_index.get(run) {
            return *i;
        }
        let i = u32::try_from(self.runs.len()).unwrap_or(u32::MAX);
        self.runs.push((run.into(), Usd::ZERO));
        self.run_index.insert(run.into(), i);
        i
    }

    pub(crate) fn action_idx(&mut self, action: &str) -> u32 {
        if let Some(i) = self.action_index.get(action) {
            return *i;
        }
        let i = u32::try_from(self.actions.len()).unwrap_or(u32::MAX);
        self.actions.push((action.into(), ActionSpend::default()));
        self.action_index.insert(action.into(), i);
        i
    }

    pub(crate) fn run_spent(&self, idx: u32) -> Usd {
        self.runs.get(idx as usize).map_or(Usd::ZERO, |r| r.1)
    }

    pub(crate) fn action_spent(&self, idx: u32) -> Usd {
        self.actions.get(idx as usize).map_or(Usd::ZERO, |a| a.1.spent)
    }

    pub(crate) fn run_by_name(&self, run: &str) -> Usd {
        self.run_index.get(run).map_or(Usd::ZERO, |i| self.run_spent(*i))
    }

    pub(crate) fn add(&mut self, run: u32, action: u32, cost: Usd, calls: i64) {
        self.spent = self.spent.saturating_add(cost);
        if let Some(r) = self.runs.get_mut(run as usize) {
            r.1 = r.1.saturating_add(cost);
        }
        if let Some(a) = self.actions.get_mut(action as usize) {
            a.1.spent = a.1.spent.saturating_add(cost);
            a.1.count = a.1.count.saturating_add_signed(calls);
        }
    }

    pub(crate) fn sub(&mut self, run: u32, action: u32, cost: Usd, calls: i64) {
        self.spent = self.spent.saturating_sub(cost);
        if let Some(r) = self.runs.get_mut(run as usize) {
            r.1 = r.1.saturating_sub(cost);
        }
        if let Some(a) = self.actions.get_mut(action as usize) {
            a.1.spent = a.1.spent.saturating_sub(cost);
            a.1.count = a.1.count.saturating_add_signed(-calls);
        }
    }

    pub(crate) fn reset_run(&mut self, run: &str) {
        if let Some(i) = self.run_index.get(run).copied()
            && let Some(r) = self.runs.get_mut(i as usize)
        {
            r.1 = Usd::ZERO;
        }
    }
}

/// The most recent allowed calls of one counter, newest at the back; holds at most `capacity`.
///
/// A window of `max_count` over `w` seconds is full at time `t` exactly when the `max_count`-th
/// most recent allowed call happened after `t - w`: one comparison, whatever the traffic.
pub(crate) struct Ring {
    entries: VecDeque<(u64, u64)>,
    capacity: usize,
}

impl Ring {
    pub(crate) fn new(capacity: usize) -> Self {
        Ring { entries: VecDeque::with_capacity(capacity.min(1024)), capacity: capacity.max(1) }
    }

    /// Nanosecond time of the `n`-th most recent entry (1 = newest).
    pub(crate) fn nth_newest(&self, n: usize) -> Option<u64> {
        let len = self.entries.len();
        if n == 0 || n > len {
            return None;
        }
        self.entries.get(len - n).map(|e| e.0)
    }

    /// When the window is full at `now`, the nanoseconds until a slot frees up.
    pub(crate) fn full_for(&self, max_count: usize, window_ns: u64, now: u64) -> Option<u64> {
        let t = self.nth_newest(max_count)?;
        let frees_at = t.saturating_add(window_ns);
        (frees_at > now).then(|| frees_at - now)
    }

    /// How many entries fall in `(now - window, now]`, counting at most `limit`.
    pub(crate) fn count_within(&self, window_ns: u64, now: u64, limit: usize) -> usize {
        self.entries.iter().rev().take(limit).take_while(|e| e.0.saturating_add(window_ns) > now).count()
    }

    /// Records an allowed call. Entries older than `window_ns` can never count again and are dropped,
    /// so memory is bounded by the calls in one window as well as by the capacity.
    pub(crate) fn push(&mut self, now: u64, id: u64, window_ns: u64) {
        while self.entries.front().is_some_and(|e| e.0.saturating_add(window_ns) <= now) {
            self.entries.pop_front();
        }
        if self.entries.len() >= self.capacity {
            self.entries.pop_front();
        }
        // Clocks may be adjusted; keep the ring ordered so `nth_newest` stays exact.
        let t = self.entries.back().map_or(now, |b| b.0.max(now));
        self.entries.push_back((t, id));
    }

    pub(crate) fn remove(&mut self, id: u64) {
        if let Some(pos) = self.entries.iter().rposition(|e| e.1 == id) {
            self.entries.remove(pos);
        }
    }

    pub(crate) fn newest(&self) -> Option<u64> {
        self.entries.back().map(|e| e.0)
    }

    pub(crate) fn grow_to(&mut self, capacity: usize) {
        self.capacity = self.capacity.max(capacity);
    }
}

/// Running mean and variance (Welford), so a baseline never re-reads history.
#[derive(Default, Clone, Copy, Debug)]
pub(crate) struct Welford {
    pub n: u64,
    pub mean: f64,
    m2: f64,
}

impl Welford {
    pub(crate) fn push(&mut self, x: f64) {
        self.n += 1;
        #[expect(clippy::cast_precision_loss, reason = "sample counts stay far below 2^53")]
        let n = self.n as f64;
        let delta = x - self.mean;
        self.mean += delta / n;
        self.m2 += delta * (x - self.mean);
    }

    pub(crate) fn std_dev(&self) -> f64 {
        if self.n < 2 {
            return 0.0;
        }
        #[expect(clippy::cast_precision_loss, reason = "sample counts stay far below 2^53")]
        let n = (self.n - 1) as f64;
        (self.m2 / n).max(0.0).sqrt()
    }
}

/// All mutable state of an engine.
pub(crate) struct State {
    pub sessions: Registry<Box<str>, Mutex<SessionState>>,
    pub rates: Registry<(u64, Box<str>), Mutex<Ring>>,
    pub loops: Registry<(u64, Box<str>), Mutex<Ring>>,
    pub baselines: Registry<(u64, Box<str>), Mutex<Welford>>,
    pub next_id: AtomicU64,
    loop_inserts: AtomicU64,
}

impl State {
    pub(crate) fn new() -> Self {
        State {
            sessions: Registry::new(),
            rates: Registry::new(),
            loops: Registry::new(),
            baselines: Registry::new(),
            next_id: AtomicU64::new(1),
            loop_inserts: AtomicU64::new(0),
        }
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Loop histories are keyed by argument digest, so they are pruned as they age out.
    pub(crate) fn note_loop_insert(&self, now: u64, max_window_ns: u64) {
        let n = self.loop_inserts.fetch_add(1, Ordering::Relaxed);
        if n % 4096 == 4095 {
            self.loops.retain(|ring| ring.lock().newest().is_some_and(|t| t.saturating_add(max_window_ns) > now));
        }
    }
}

/// An allowed decision's hold on budget and rate-limit slots, until it is settled or released.
///
/// Dropping a reservation without settling it keeps the estimated cost: the action may have run.
#[derive(Debug)]
#[must_use = "settle the reservation with the actual cost, or release it if the action did not run"]
pub struct Reservation {
    pub(crate) id: u64,
    pub(crate) cost: Usd,
    pub(crate) session: Arc<Mutex<SessionState>>,
    pub(crate) run_idx: u32,
    pub(crate) action_idx: u32,
    pub(crate) rates: smallvec::SmallVec<[Arc<Mutex<Ring>>; 2]>,
    pub(crate) loop_ring: Option<Arc<Mutex<Ring>>>,
}

impl Reservation {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The reserved (estimated) cost.
    pub fn cost(&self) -> Usd {
        self.cost
    }

    /// The action ran and cost `actual` (which may differ from the estimate).
    pub fn settle(self, actual: Usd) {
        if actual != self.cost {
            let mut s = self.session.lock();
            if actual > self.cost {
                s.add(self.run_idx, self.action_idx, actual.saturating_sub(self.cost), 0);
            } else {
                s.sub(self.run_idx, self.action_idx, self.cost.saturating_sub(actual), 0);
            }
        }
    }

    /// The action never ran: give back the cost and the rate-limit and loop slots.
    pub fn release(self) {
        self.session.lock().sub(self.run_idx, self.action_idx, self.cost, 1);
        for r in &self.rates {
            r.lock().remove(self.id);
        }
        if let Some(l) = &self.loop_ring {
            l.lock().remove(self.id);
        }
    }
}

impl std::fmt::Debug for SessionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionState").field("spent", &self.spent).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").field("len", &self.entries.len()).field("capacity", &self.capacity).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_is_full_only_when_the_nth_newest_is_inside_the_window() {
        let mut r = Ring::new(3);
        for (i, t) in [10, 20, 30].into_iter().enumerate() {
            r.push(t, i as u64, 1000);
        }
        assert_eq!(r.full_for(3, 100, 50), Some(60));
        assert_eq!(r.full_for(3, 100, 110), None);
        r.remove(1);
        assert_eq!(r.full_for(3, 100, 50), None);
    }

    #[test]
    fn welford_matches_two_pass() {
        let xs = [50.0, 60.0, 70.0, 80.0, 90.0];
        let mut w = Welford::default();
        xs.iter().for_each(|x| w.push(*x));
        assert!((w.mean - 70.0).abs() < 1e-9);
        assert!((w.std_dev() - 15.811_388_300_841_896).abs() < 1e-9);
    }
}
