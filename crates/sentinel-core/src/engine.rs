//! `decide()`: the order of checks of DESIGN §2, with reservation of cost and rate-limit slots.

use std::borrow::Cow;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use arc_swap::ArcSwap;
use hashbrown::HashMap;
use parking_lot::{Mutex, MutexGuard};
use serde_json::Value;
use smallvec::SmallVec;

use crate::clock::{Clock, SystemClock, nanos_to_secs};
use crate::compile::{CompiledCondition, CompiledPolicy, CompiledRateLimit, PolicySet, stable_hash};
use crate::counters::{ActionSpend, KeyRef, Reservation, Ring, SessionState, State};
use crate::decision::{
    ActionRequest, ApprovalSpec, Decision, InterventionType, Limit, LimitKind, ReasonCode, ShadowFinding, Verdict,
};
use crate::model::{AnomalyAction, CounterScope, FailMode, Mode, Operator, PolicyDoc, RuleAction};
use crate::money::Usd;

/// What a halt applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "snake_case")]
pub enum HaltTarget {
    Agent(String),
    Run(String),
}

#[derive(Default)]
struct Halts {
    agents: HashMap<Box<str>, Arc<str>>,
    runs: HashMap<Box<str>, Arc<str>>,
}

/// Spend totals, as the SDK's cost tracker reports them.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct SpendSnapshot {
    pub session_total: Usd,
    pub run_total: Usd,
    pub actions: Vec<(String, ActionSpend)>,
}

/// The decision engine. Cheap to share (`Arc<Engine>`) across threads; holds no global state.
pub struct Engine {
    policies: ArcSwap<PolicySet>,
    halts: ArcSwap<Halts>,
    state: State,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("policies", &*self.policies.load()).finish_non_exhaustive()
    }
}

/// Tri-state outcome of a condition: a missing or mistyped argument is `Unknown`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tri {
    True,
    False,
    Unknown,
}

/// A denial or other early answer found while walking the checks.
struct Outcome {
    verdict: Verdict,
    intervention: Option<InterventionType>,
    reason: ReasonCode,
    message: Cow<'static, str>,
    policy: Option<Arc<str>>,
    rule: Option<Arc<str>>,
    limit: Option<Limit>,
    retry_after: Option<f64>,
}

impl Outcome {
    fn deny(
        intervention: InterventionType,
        reason: ReasonCode,
        message: String,
        policy: &Arc<str>,
        rule: Option<&Arc<str>>,
    ) -> Self {
        Outcome {
            verdict: Verdict::Deny,
            intervention: Some(intervention),
            reason,
            message: Cow::Owned(message),
            policy: Some(Arc::clone(policy)),
            rule: rule.map(Arc::clone),
            limit: None,
            retry_after: None,
        }
    }

    fn with_limit(mut self, limit: Limit) -> Self {
        self.limit = Some(limit);
        self
    }
}

/// Deferred findings from the rules step.
/// A rule finding: the policy, the rule (none for a default action) and its message.
type RuleHit<'p> = (&'p CompiledPolicy, Option<&'p Arc<str>>, Option<&'p Arc<str>>);

#[derive(Default)]
struct Pending<'p> {
    approval_rule: Option<RuleHit<'p>>,
    warn_rule: Option<RuleHit<'p>>,
}

impl Engine {
    pub fn new(policies: PolicySet) -> Self {
        Self::with_clock(policies, Arc::new(SystemClock))
    }

    pub fn with_clock(policies: PolicySet, clock: Arc<dyn Clock>) -> Self {
        Engine {
            policies: ArcSwap::from_pointee(policies),
            halts: ArcSwap::from_pointee(Halts::default()),
            state: State::new(),
            clock,
        }
    }

    /// Compiles `docs` and builds an engine over them.
    pub fn from_docs(docs: Vec<PolicyDoc>) -> Result<Self, Vec<crate::load::PolicyError>> {
        Ok(Self::new(PolicySet::compile(docs)?))
    }

    /// Swaps in new policies. Counters (spend, windows, baselines) are kept.
    pub fn replace_policies(&self, policies: PolicySet) {
        self.policies.store(Arc::new(policies));
    }

    pub fn policies(&self) -> Arc<PolicySet> {
        self.policies.load_full()
    }

    pub fn policy_version(&self) -> Arc<str> {
        Arc::clone(&self.policies.load().version)
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    pub fn halt(&self, target: HaltTarget, reason: &str) {
        self.halts.rcu(|h| {
            let mut agents = h.agents.clone();
            let mut runs = h.runs.clone();
            match &target {
                HaltTarget::Agent(a) => agents.insert(a.as_str().into(), Arc::from(reason)),
                HaltTarget::Run(r) => runs.insert(r.as_str().into(), Arc::from(reason)),
            };
            Halts { agents, runs }
        });
    }

    pub fn resume(&self, target: &HaltTarget) {
        self.halts.rcu(|h| {
            let mut agents = h.agents.clone();
            let mut runs = h.runs.clone();
            match target {
                HaltTarget::Agent(a) => agents.remove(a.as_str()),
                HaltTarget::Run(r) => runs.remove(r.as_str()),
            };
            Halts { agents, runs }
        });
    }

    /// Spend so far for a session and one of its runs.
    pub fn spend(&self, session_id: &str, run_id: &str) -> SpendSnapshot {
        let Some(cell) = self.state.sessions.get(session_id) else {
            return SpendSnapshot::default();
        };
        let s = cell.lock();
        SpendSnapshot {
            session_total: s.spent,
            run_total: s.run_by_name(run_id),
            actions: s.actions.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    /// Starts a run's budget afresh (session totals and action statistics are kept).
    pub fn reset_run(&self, session_id: &str, run_id: &str) {
        if let Some(cell) = self.state.sessions.get(session_id) {
            cell.lock().reset_run(run_id);
        }
    }

    /// Forgets all spend, windows, loop histories and baselines.
    pub fn reset_counters(&self) {
        self.state.sessions.clear();
        self.state.rates.clear();
        self.state.loops.clear();
        self.state.baselines.clear();
    }

    /// Decides, and on `Allow`/`Warn` reserves the cost and rate-limit slots.
    pub fn decide(&self, req: &ActionRequest<'_>) -> Decision {
        self.run(req, Grant::None, true)
    }

    /// Decides a call a human has approved: every check runs except the approval step.
    pub fn decide_approved(&self, req: &ActionRequest<'_>) -> Decision {
        self.run(req, Grant::Approved, true)
    }

    /// What `decide_approved` would answer now, without reserving or learning anything.
    pub fn evaluate_approved(&self, req: &ActionRequest<'_>) -> Decision {
        self.run(req, Grant::Approved, false)
    }

    /// Decides a call paused over budget that a human resumed: every check runs except the
    /// budgets and the approval step; the cost is still reserved and counted.
    pub fn decide_resumed(&self, req: &ActionRequest<'_>) -> Decision {
        self.run(req, Grant::OverBudget, true)
    }

    /// What `decide_resumed` would answer now, without reserving or learning anything.
    pub fn evaluate_resumed(&self, req: &ActionRequest<'_>) -> Decision {
        self.run(req, Grant::OverBudget, false)
    }

    /// Decides without reserving or learning anything: what `decide` would answer now.
    pub fn evaluate(&self, req: &ActionRequest<'_>) -> Decision {
        self.run(req, Grant::None, false)
    }

    /// The sliding window of one rate limit for this call's scope (agent, run, session or global).
    fn rate_cell(&self, rl: &CompiledRateLimit, req: &ActionRequest<'_>) -> Arc<Mutex<Ring>> {
        let key = scope_key(rl.per, req);
        self.state.rates.get_or_insert(
            &KeyRef(rl.fingerprint, key),
            || (rl.fingerprint, key.into()),
            || Mutex::new(Ring::new(rl.max_count as usize)),
        )
    }

    /// The history of this action with these arguments in this run, for loop detection.
    fn loop_cell(&self, set: &PolicySet, req: &ActionRequest<'_>, digest: u64) -> Arc<Mutex<Ring>> {
        let fp = loop_fingerprint(req.action, digest);
        self.state.loops.get_or_insert(
            &KeyRef(fp, req.run_id),
            || (fp, req.run_id.into()),
            || Mutex::new(Ring::new(set.loop_capacity)),
        )
    }

    fn session_cell(&self, session_id: &str) -> Arc<Mutex<SessionState>> {
        self.state.sessions.get_or_insert(session_id, || session_id.into(), || Mutex::new(SessionState::default()))
    }

    fn run(&self, req: &ActionRequest<'_>, grant: Grant, commit: bool) -> Decision {
        let set = self.policies.load();
        match catch_unwind(AssertUnwindSafe(|| self.decide_inner(&set, req, grant, commit))) {
            Ok(d) => d,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown failure".to_string());
                self.internal_failure(&set, req, &what)
            }
        }
    }

    fn internal_failure(&self, set: &PolicySet, req: &ActionRequest<'_>, what: &str) -> Decision {
        let secure = set.applicable(req.agent_id, req.run_id).any(|p| p.fail_mode == FailMode::Secure)
            || set.applicable(req.agent_id, req.run_id).next().is_none();
        let (verdict, intervention) = if secure {
            (Verdict::Deny, InterventionType::HardBlock)
        } else {
            (Verdict::Warn, InterventionType::Warning)
        };
        Decision {
            verdict,
            intervention: Some(intervention),
            reason: ReasonCode::InternalError,
            message: Cow::Owned(format!(
                "internal error while deciding `{}` ({what}); fail_mode {} {}",
                req.action,
                if secure { "secure" } else { "safe" },
                if secure { "denies" } else { "allows with a warning" }
            )),
            policy: None,
            rule: None,
            limit: None,
            policy_version: Arc::clone(&set.version),
            retry_after_seconds: None,
            approval: None,
            shadow: Vec::new(),
            reservation: None,
        }
    }

    fn finish(set: &PolicySet, o: Outcome) -> Decision {
        Decision {
            verdict: o.verdict,
            intervention: o.intervention,
            reason: o.reason,
            message: o.message,
            policy: o.policy,
            rule: o.rule,
            limit: o.limit,
            policy_version: Arc::clone(&set.version),
            retry_after_seconds: o.retry_after,
            approval: None,
            shadow: Vec::new(),
            reservation: None,
        }
    }

    fn decide_inner(&self, set: &PolicySet, req: &ActionRequest<'_>, grant: Grant, commit: bool) -> Decision {
        let approved = grant != Grant::None;
        #[cfg(test)]
        tests::maybe_fault();
        // 0. The request itself.
        let cost = match validate(req) {
            Ok(c) => c,
            Err(msg) => {
                return Self::finish(
                    set,
                    Outcome {
                        verdict: Verdict::Deny,
                        intervention: Some(InterventionType::HardBlock),
                        reason: ReasonCode::InvalidRequest,
                        message: Cow::Owned(msg),
                        policy: None,
                        rule: None,
                        limit: None,
                        retry_after: None,
                    },
                );
            }
        };

        // 1. Kill switch.
        let halts = self.halts.load();
        if !halts.agents.is_empty() || !halts.runs.is_empty() {
            let hit = halts
                .agents
                .get(req.agent_id)
                .map(|r| ("agent", req.agent_id, r))
                .or_else(|| halts.runs.get(req.run_id).map(|r| ("run", req.run_id, r)));
            if let Some((kind, id, reason)) = hit {
                return Self::finish(
                    set,
                    Outcome {
                        verdict: Verdict::Deny,
                        intervention: Some(InterventionType::Halted),
                        reason: ReasonCode::Halted,
                        message: Cow::Owned(format!("{kind} `{id}` is halted: {reason}")),
                        policy: None,
                        rule: None,
                        limit: None,
                        retry_after: None,
                    },
                );
            }
        }

        let all: SmallVec<[&CompiledPolicy; 4]> = set.applicable(req.agent_id, req.run_id).collect();
        let enforce_list: SmallVec<[&CompiledPolicy; 4]> =
            all.iter().copied().filter(|p| p.mode == Mode::Enforce).collect();
        let applicable = all.iter().copied();
        let enforce = enforce_list.iter().copied();

        // 2-3. Lists, then rules.
        if let Some(o) = static_checks(enforce.clone(), req) {
            return Self::finish(set, o);
        }
        let mut pending = Pending::default();
        for p in enforce.clone() {
            if let Some(o) = rules_step(p, req, &mut pending) {
                return Self::finish(set, o);
            }
        }

        // The anomaly verdict only reads baselines, so it is found before any lock is taken.
        let anomaly = if set.any_anomaly { self.anomaly_check(set, enforce.clone(), req, cost) } else { None };

        // 4-5. Counters, under their locks, so the check and the reservation are one step.
        let now = self.clock.now_nanos();
        let mut rate_cells: SmallVec<[Arc<Mutex<Ring>>; 2]> = SmallVec::new();
        let mut windows: SmallVec<[u64; 2]> = SmallVec::new();
        let mut rate_limits: SmallVec<[(&CompiledRateLimit, &Arc<str>, usize); 2]> = SmallVec::new();
        for p in applicable.clone() {
            if let Some(rl) = p.rate_limits.get(req.action) {
                let cell = self.rate_cell(rl, req);
                let idx = match rate_cells.iter().position(|c| Arc::ptr_eq(c, &cell)) {
                    Some(i) => i,
                    None => {
                        rate_cells.push(cell);
                        windows.push(rl.window_ns);
                        rate_cells.len() - 1
                    }
                };
                if p.mode == Mode::Enforce {
                    rate_limits.push((rl, &p.name, idx));
                }
            }
        }
        let loop_cell = if set.loop_capacity > 0 && applicable.clone().any(|p| p.loops.is_some()) {
            Some(self.loop_cell(set, req, args_digest(req.args)))
        } else {
            None
        };
        let session = self.session_cell(req.session_id);

        // Lock order: rate windows by address, then the loop history, then the session.
        let mut order: SmallVec<[usize; 2]> = (0..rate_cells.len()).collect();
        order.sort_by_key(|i| rate_cells.get(*i).map_or(0, |c| Arc::as_ptr(c) as usize));
        let mut guards: SmallVec<[(usize, MutexGuard<'_, Ring>); 2]> = SmallVec::new();
        for i in order {
            if let Some(c) = rate_cells.get(i) {
                guards.push((i, c.lock()));
            }
        }
        let mut loop_guard = loop_cell.as_ref().map(|c| c.lock());
        if let Some(g) = loop_guard.as_mut() {
            g.grow_to(set.loop_capacity);
        }
        let mut sess = session.lock();
        let run_idx = sess.run_idx(req.run_id);
        let action_idx = sess.action_idx(req.action);

        // 4. Rate limits, then loops.
        let mut denial: Option<Outcome> = None;
        let mut worst_retry: Option<u64> = None;
        for (rl, name, idx) in &rate_limits {
            let Some((_, ring)) = guards.iter().find(|(i, _)| i == idx) else {
                continue;
            };
            if let Some(wait) = ring.full_for(rl.max_count as usize, rl.window_ns, now) {
                worst_retry = Some(worst_retry.map_or(wait, |w| w.max(wait)));
                if denial.is_none() {
                    let used = ring.count_within(rl.window_ns, now, rl.max_count as usize);
                    denial = Some(
                        Outcome::deny(
                            InterventionType::RateLimited,
                            ReasonCode::RateLimited,
                            format!(
                                "rate limit for `{}` reached: {} in any {}s (policy `{name}`)",
                                req.action,
                                calls(rl.max_count),
                                rl.window_seconds
                            ),
                            name,
                            None,
                        )
                        .with_limit(Limit {
                            kind: LimitKind::RateLimit,
                            limit: f64::from(rl.max_count),
                            used: used as f64,
                            requested: 1.0,
                            window_seconds: Some(rl.window_seconds),
                            field: None,
                        }),
                    );
                }
            }
        }
        if let Some(mut d) = denial {
            let secs = nanos_to_secs(worst_retry.unwrap_or(0));
            d.retry_after = Some(secs);
            d.message = Cow::Owned(format!("{}; retry after {:.3}s", d.message, secs));
            return Self::finish(set, d);
        }
        if let Some(ring) = loop_guard.as_ref() {
            for p in enforce.clone() {
                let Some((max, window_ns, window_s)) = p.loops else {
                    continue;
                };
                if ring.full_for(max as usize, window_ns, now).is_some() {
                    let mut o = Outcome::deny(
                        InterventionType::RateLimited,
                        ReasonCode::LoopDetected,
                        format!(
                            "loop detected: `{}` was already called with the same arguments {} within {window_s}s (policy `{}`)",
                            req.action, times(max), p.name
                        ),
                        &p.name,
                        None,
                    )
                    .with_limit(Limit {
                        kind: LimitKind::Loop,
                        limit: f64::from(max),
                        used: ring.count_within(window_ns, now, max as usize) as f64,
                        requested: 1.0,
                        window_seconds: Some(window_s),
                        field: None,
                    });
                    o.retry_after = ring.full_for(max as usize, window_ns, now).map(nanos_to_secs);
                    return Self::finish(set, o);
                }
            }
        }

        // 5. Budgets: action, then run, then session; the smallest limit of each kind applies.
        if grant != Grant::OverBudget
            && let Some(o) = budget_check(enforce.clone(), req, cost, &sess, run_idx, action_idx)
        {
            return Self::finish(set, o);
        }

        // 6. Approval.
        if !approved && let Some(o) = approval_check(enforce.clone(), req, cost, &pending) {
            let mut d = Self::finish(set, o);
            d.approval = Some(approval_spec(enforce.clone()));
            return d;
        }

        // 7. Anomaly.
        if let Some((o, _)) = anomaly.as_ref().filter(|(o, _)| o.verdict == Verdict::Deny) {
            return Self::finish(set, clone_outcome(o));
        }

        // 8. Allow, or warn.
        let mut outcome = if let Some((o, _)) = anomaly.as_ref() {
            clone_outcome(o)
        } else if let Some(hit) = pending.warn_rule {
            warn_outcome(hit, req.action)
        } else {
            Outcome {
                verdict: Verdict::Allow,
                intervention: None,
                reason: ReasonCode::Allowed,
                message: Cow::Borrowed("allowed"),
                policy: None,
                rule: None,
                limit: None,
                retry_after: None,
            }
        };
        if approved && outcome.verdict == Verdict::Allow {
            outcome.message = Cow::Borrowed("allowed after approval");
        }

        // Shadow policies: what they would have done, from the same counters.
        let mut shadow = Vec::new();
        for p in applicable.clone().filter(|p| p.mode == Mode::Shadow) {
            if let Some(f) = self.shadow_eval(
                p,
                req,
                cost,
                now,
                &guards,
                &rate_cells,
                loop_guard.as_deref(),
                &sess,
                run_idx,
                action_idx,
                approved,
            ) {
                shadow.push(f);
            }
        }

        let mut decision = Self::finish(set, outcome);
        decision.shadow = shadow;
        if commit {
            let id = self.state.next_id();
            sess.add(run_idx, action_idx, cost, 1);
            for (i, g) in guards.iter_mut() {
                g.push(now, id, windows.get(*i).copied().unwrap_or(u64::MAX));
            }
            if let Some(g) = loop_guard.as_mut() {
                g.push(now, id, set.max_loop_window_ns);
            }
            drop(sess);
            drop(guards);
            drop(loop_guard);
            if loop_cell.is_some() {
                self.state.note_loop_insert(now, set.max_loop_window_ns);
            }
            if set.any_anomaly {
                self.learn(set, applicable.clone(), req, cost, anomaly.as_ref().and_then(|(_, f)| f.as_deref()));
            }
            decision.reservation =
                Some(Reservation { id, cost, session, run_idx, action_idx, rates: rate_cells, loop_ring: loop_cell });
        }
        decision
    }

    #[expect(clippy::too_many_arguments, reason = "internal helper over one locked snapshot")]
    fn shadow_eval(
        &self,
        p: &CompiledPolicy,
        req: &ActionRequest<'_>,
        cost: Usd,
        now: u64,
        guards: &SmallVec<[(usize, MutexGuard<'_, Ring>); 2]>,
        rate_cells: &SmallVec<[Arc<Mutex<Ring>>; 2]>,
        loop_ring: Option<&Ring>,
        sess: &SessionState,
        run_idx: u32,
        action_idx: u32,
        approved: bool,
    ) -> Option<ShadowFinding> {
        let one = std::iter::once(p);
        let mut pending = Pending::default();
        let o = static_checks(one.clone(), req)
            .or_else(|| rules_step(p, req, &mut pending))
            .or_else(|| {
                let rl = p.rate_limits.get(req.action)?;
                let key = scope_key(rl.per, req);
                let cell = self.state.rates.get(&KeyRef(rl.fingerprint, key))?;
                let idx = rate_cells.iter().position(|c| Arc::ptr_eq(c, &cell))?;
                let (_, ring) = guards.iter().find(|(i, _)| *i == idx)?;
                let wait = ring.full_for(rl.max_count as usize, rl.window_ns, now)?;
                let mut o = Outcome::deny(
                    InterventionType::RateLimited,
                    ReasonCode::RateLimited,
                    format!(
                        "rate limit for `{}` reached: {} in any {}s",
                        req.action,
                        calls(rl.max_count),
                        rl.window_seconds
                    ),
                    &p.name,
                    None,
                );
                o.retry_after = Some(nanos_to_secs(wait));
                Some(o)
            })
            .or_else(|| {
                let (max, window_ns, window_s) = p.loops?;
                loop_ring?.full_for(max as usize, window_ns, now)?;
                Some(Outcome::deny(
                    InterventionType::RateLimited,
                    ReasonCode::LoopDetected,
                    format!("loop detected: `{}` repeated {max} times within {window_s}s", req.action),
                    &p.name,
                    None,
                ))
            })
            .or_else(|| budget_check(one.clone(), req, cost, sess, run_idx, action_idx))
            .or_else(|| if approved { None } else { approval_check(one.clone(), req, cost, &pending) })
            .or_else(|| Some(warn_outcome(pending.warn_rule?, req.action)))?;
        Some(ShadowFinding {
            policy: Arc::clone(&p.name),
            verdict: o.verdict,
            intervention: o.intervention,
            reason: o.reason,
            message: o.message,
            rule: o.rule,
            limit: o.limit,
        })
    }

    /// Finds an outlier among the call's cost and numeric arguments. Returns the outcome and the
    /// anomalous field (which is then kept out of the baseline).
    fn anomaly_check<'p>(
        &self,
        set: &PolicySet,
        enforce: impl Iterator<Item = &'p CompiledPolicy> + Clone,
        req: &ActionRequest<'_>,
        cost: Usd,
    ) -> Option<(Outcome, Option<String>)> {
        let action_hash = set.hash_str(req.action);
        let mut found: Option<(Outcome, Option<String>)> = None;
        for p in enforce {
            let Some(a) = p.anomaly.as_ref() else {
                continue;
            };
            let mut check = |field: &str, x: f64| {
                let Some(cell) = self.state.baselines.get(&KeyRef(action_hash, field)) else {
                    return;
                };
                let w = *cell.lock();
                if w.n < u64::from(a.min_samples) {
                    return;
                }
                let dev = (x - w.mean).abs();
                let sd = w.std_dev();
                if dev <= a.min_deviation {
                    return;
                }
                let z = if sd > 0.0 { dev / sd } else { f64::INFINITY };
                if z <= a.z_threshold {
                    return;
                }
                let block = a.action == AnomalyAction::Block;
                let better = match &found {
                    None => true,
                    Some((o, _)) => block && o.verdict != Verdict::Deny,
                };
                if better {
                    let zs = if z.is_finite() {
                        format!("{z:.1} standard deviations")
                    } else {
                        "infinitely many standard deviations (the baseline never varied)".to_string()
                    };
                    found = Some((
                        Outcome {
                            verdict: if block { Verdict::Deny } else { Verdict::Warn },
                            intervention: Some(if block {
                                InterventionType::HardBlock
                            } else {
                                InterventionType::Warning
                            }),
                            reason: ReasonCode::AnomalyDetected,
                            message: Cow::Owned(format!(
                                "anomaly: `{field}` = {x} on `{}` is {zs} from its mean {:.4} over {} calls (policy `{}`)",
                                req.action, w.mean, w.n, p.name
                            )),
                            policy: Some(Arc::clone(&p.name)),
                            rule: None,
                            limit: Some(Limit {
                                kind: LimitKind::Anomaly,
                                limit: a.z_threshold,
                                used: if z.is_finite() { z } else { f64::MAX },
                                requested: x,
                                window_seconds: None,
                                field: Some(field.to_string()),
                            }),
                            retry_after: None,
                        },
                        Some(field.to_string()),
                    ));
                }
            };
            check("cost_usd", cost.as_f64());
            for_each_numeric(req.args, a.fields.as_deref(), |k, v| check(k, v));
        }
        found
    }

    fn learn<'p>(
        &self,
        set: &PolicySet,
        applicable: impl Iterator<Item = &'p CompiledPolicy> + Clone,
        req: &ActionRequest<'_>,
        cost: Usd,
        skip: Option<&str>,
    ) {
        let Some(a) = applicable.filter_map(|p| p.anomaly.as_ref()).next() else {
            return;
        };
        let action_hash = set.hash_str(req.action);
        let push = |field: &str, x: f64| {
            if skip == Some(field) {
                return;
            }
            let cell = self.state.baselines.get_or_insert(
                &KeyRef(action_hash, field),
                || (action_hash, field.into()),
                Default::default,
            );
            cell.lock().push(x);
        };
        push("cost_usd", cost.as_f64());
        for_each_numeric(req.args, a.fields.as_deref(), push);
    }
}

fn calls(n: u32) -> String {
    if n == 1 { "1 call".to_string() } else { format!("{n} calls") }
}

fn times(n: u32) -> String {
    if n == 1 { "once".to_string() } else { format!("{n} times") }
}

fn clone_outcome(o: &Outcome) -> Outcome {
    Outcome {
        verdict: o.verdict,
        intervention: o.intervention,
        reason: o.reason,
        message: o.message.clone(),
        policy: o.policy.clone(),
        rule: o.rule.clone(),
        limit: o.limit.clone(),
        retry_after: o.retry_after,
    }
}

/// Most numeric fields learned or checked per call, so hostile argument lists stay cheap.
const MAX_NUMERIC_FIELDS: usize = 32;

fn for_each_numeric(args: &Value, only: Option<&[String]>, mut f: impl FnMut(&str, f64)) {
    let Value::Object(map) = args else { return };
    match only {
        Some(fields) => {
            for k in fields.iter().take(MAX_NUMERIC_FIELDS) {
                if let Some(x) = map.get(k).and_then(Value::as_f64).filter(|x| x.is_finite()) {
                    f(k, x);
                }
            }
        }
        None => {
            for (k, v) in map.iter().filter(|(k, _)| k.as_str() != "cost_usd").take(MAX_NUMERIC_FIELDS) {
                if let Some(x) = v.as_f64().filter(|x| x.is_finite()) {
                    f(k, x);
                }
            }
        }
    }
}

fn validate(req: &ActionRequest<'_>) -> Result<Usd, String> {
    if req.action.is_empty() {
        return Err("the action name is empty".into());
    }
    if req.action.len() > 512 {
        return Err(format!("the action name is {} bytes long; at most 512 are allowed", req.action.len()));
    }
    if !matches!(req.args, Value::Object(_) | Value::Null) {
        return Err("the call's arguments must be a JSON object".into());
    }
    Usd::from_f64(req.cost_usd).map_err(|e| format!("invalid cost for `{}`: {e}", req.action))
}

fn scope_key<'a>(per: CounterScope, req: &ActionRequest<'a>) -> &'a str {
    match per {
        CounterScope::Agent => req.agent_id,
        CounterScope::Run => req.run_id,
        CounterScope::Session => req.session_id,
        CounterScope::Global => "",
    }
}

fn static_checks<'p>(
    enforce: impl Iterator<Item = &'p CompiledPolicy> + Clone,
    req: &ActionRequest<'_>,
) -> Option<Outcome> {
    for p in enforce.clone() {
        if p.denied.contains(req.action) {
            return Some(Outcome::deny(
                InterventionType::HardBlock,
                ReasonCode::DeniedAction,
                format!("action `{}` is denied by policy `{}`", req.action, p.name),
                &p.name,
                None,
            ));
        }
    }
    for p in enforce {
        if let Some(allowed) = &p.allowed
            && !allowed.contains(req.action)
        {
            return Some(Outcome::deny(
                InterventionType::HardBlock,
                ReasonCode::NotAllowlisted,
                format!("action `{}` is not in the allowlist of policy `{}`", req.action, p.name),
                &p.name,
                None,
            ));
        }
    }
    None
}

/// A rule (or a default action) said `warn`: the call runs, flagged.
fn warn_outcome((p, rule, msg): RuleHit<'_>, action: &str) -> Outcome {
    Outcome {
        verdict: Verdict::Warn,
        intervention: Some(InterventionType::Warning),
        reason: ReasonCode::RuleWarn,
        message: Cow::Owned(rule_message(msg, rule, action, "warns about")),
        policy: Some(Arc::clone(&p.name)),
        rule: rule.map(Arc::clone),
        limit: None,
        retry_after: None,
    }
}

fn rule_message(msg: Option<&Arc<str>>, rule: Option<&Arc<str>>, action: &str, verb: &str) -> String {
    match (msg, rule) {
        (Some(m), _) => m.to_string(),
        (None, Some(r)) => format!("rule `{r}` {verb} `{action}`"),
        (None, None) => format!("the default action {verb} `{action}`"),
    }
}

/// Step 3 for one policy: returns a denial, or records approval/warn findings in `pending`.
fn rules_step<'p>(p: &'p CompiledPolicy, req: &ActionRequest<'_>, pending: &mut Pending<'p>) -> Option<Outcome> {
    if p.rules.is_empty() && p.default_action == RuleAction::Allow {
        return None;
    }
    let mut fired: Option<(RuleAction, &'p crate::compile::CompiledRule)> = None;
    let mut any_match = false;
    let mut args = Resolved::new(req.args, p.paths);
    for &i in p.matching_rules(req.action).iter() {
        let Some(rule) = p.rules.get(i as usize) else {
            continue;
        };
        let restrictive = rule.action != RuleAction::Allow;
        if !rule.conditions.iter().all(|c| condition_met(c, args.get(c), restrictive)) {
            continue;
        }
        any_match = true;
        match rule.action {
            RuleAction::Block | RuleAction::RequireApproval | RuleAction::Allow => {
                fired = Some((rule.action, rule));
                break;
            }
            RuleAction::Warn => {
                if pending.warn_rule.is_none() {
                    pending.warn_rule = Some((p, Some(&rule.id), rule.message.as_ref()));
                }
            }
        }
    }
    match fired {
        Some((RuleAction::Block, rule)) => Some(Outcome::deny(
            InterventionType::HardBlock,
            ReasonCode::RuleBlock,
            rule_message(rule.message.as_ref(), Some(&rule.id), req.action, "blocks"),
            &p.name,
            Some(&rule.id),
        )),
        Some((RuleAction::RequireApproval, rule)) => {
            if pending.approval_rule.is_none() {
                pending.approval_rule = Some((p, Some(&rule.id), rule.message.as_ref()));
            }
            None
        }
        Some(_) => None,
        None if any_match => None,
        None => match p.default_action {
            RuleAction::Block => Some(Outcome::deny(
                InterventionType::HardBlock,
                ReasonCode::DefaultBlock,
                format!("no rule of policy `{}` allows `{}` and its default action is block", p.name, req.action),
                &p.name,
                None,
            )),
            RuleAction::RequireApproval => {
                if pending.approval_rule.is_none() {
                    pending.approval_rule = Some((p, None, None));
                }
                None
            }
            RuleAction::Warn => {
                if pending.warn_rule.is_none() {
                    pending.warn_rule = Some((p, None, None));
                }
                None
            }
            RuleAction::Allow => None,
        },
    }
}

fn lookup<'v>(args: &'v Value, path: &[Box<str>]) -> Option<&'v Value> {
    let mut cur = args;
    for seg in path {
        cur = match cur {
            Value::Object(m) => m.get(&**seg)?,
            Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn as_number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite()),
        _ => None,
    }
}

fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// A call's arguments, each condition path looked up at most once per call.
struct Resolved<'v> {
    args: &'v Value,
    /// By path slot: `None` not looked up yet, `Some(found)` looked up. Policies with more
    /// distinct paths than fit look the rest up every time.
    seen: [Option<Option<&'v Value>>; 16],
    paths: usize,
}

impl<'v> Resolved<'v> {
    fn new(args: &'v Value, paths: usize) -> Self {
        Resolved { args, seen: [None; 16], paths }
    }

    fn get(&mut self, c: &CompiledCondition) -> Option<&'v Value> {
        let args = self.args;
        match self.seen.get_mut(c.slot).filter(|_| c.slot < self.paths) {
            Some(Some(found)) => *found,
            Some(slot) => *slot.insert(lookup(args, &c.path)),
            None => lookup(args, &c.path),
        }
    }
}

fn eval(c: &CompiledCondition, v: Option<&Value>) -> Tri {
    let Some(v) = v else {
        return Tri::Unknown;
    };
    let b = |x: bool| if x { Tri::True } else { Tri::False };
    match c.op {
        Operator::Eq => b(json_eq(v, &c.value)),
        Operator::Ne => b(!json_eq(v, &c.value)),
        Operator::Gt | Operator::Gte | Operator::Lt | Operator::Lte => {
            let (Some(x), Some(y)) = (as_number(v), c.num) else {
                return Tri::Unknown;
            };
            b(match c.op {
                Operator::Gt => x > y,
                Operator::Gte => x >= y,
                Operator::Lt => x < y,
                _ => x <= y,
            })
        }
        Operator::In | Operator::NotIn => {
            let Value::Array(items) = &c.value else {
                return Tri::Unknown;
            };
            let hit = items.iter().any(|i| json_eq(v, i));
            b(if c.op == Operator::In { hit } else { !hit })
        }
        Operator::Contains | Operator::NotContains => {
            // A text value has its searcher (`finder`), built when the policy was compiled.
            let hit = match (v, &c.value, &c.finder) {
                (Value::String(s), _, Some(f)) => f.find(s.as_bytes()).is_some(),
                (Value::Array(items), needle, _) => items.iter().any(|i| json_eq(i, needle)),
                (Value::Object(m), Value::String(k), _) => m.contains_key(k),
                _ => return Tri::Unknown,
            };
            b(if c.op == Operator::Contains { hit } else { !hit })
        }
        Operator::StartsWith | Operator::EndsWith => {
            let (Value::String(s), Value::String(x)) = (v, &c.value) else {
                return Tri::Unknown;
            };
            b(if c.op == Operator::StartsWith { s.starts_with(x.as_str()) } else { s.ends_with(x.as_str()) })
        }
        Operator::Matches => {
            let (Value::String(s), Some(re)) = (v, &c.regex) else {
                return Tri::Unknown;
            };
            b(re.is_match(s))
        }
    }
}

/// Missing evidence never opens a door: unknown counts as met for restricting rules, not met for `allow`.
fn condition_met(c: &CompiledCondition, v: Option<&Value>, restrictive: bool) -> bool {
    match eval(c, v) {
        Tri::True => true,
        Tri::False => false,
        Tri::Unknown => restrictive,
    }
}

fn budget_check<'p>(
    enforce: impl Iterator<Item = &'p CompiledPolicy> + Clone,
    req: &ActionRequest<'_>,
    cost: Usd,
    sess: &SessionState,
    run_idx: u32,
    action_idx: u32,
) -> Option<Outcome> {
    if cost == Usd::ZERO {
        // Equal is allowed, so a free call can never exceed a budget.
        return None;
    }
    let kinds: [(LimitKind, ReasonCode, &str, Usd); 3] = [
        (LimitKind::ActionBudget, ReasonCode::ActionBudgetExceeded, "action", sess.action_spent(action_idx)),
        (LimitKind::RunBudget, ReasonCode::RunBudgetExceeded, "run", sess.run_spent(run_idx)),
        (LimitKind::SessionBudget, ReasonCode::SessionBudgetExceeded, "session", sess.spent),
    ];
    for (kind, reason, label, spent) in kinds {
        let Some((limit, p)) = tightest_budget(enforce.clone(), kind, req.action) else { continue };
        if spent.saturating_add(cost) > limit {
            return Some(budget_outcome(kind, reason, label, req, spent, cost, limit, &p.name));
        }
    }
    None
}

/// The smallest limit of one kind (action, run or session budget) among these policies, and the
/// policy that sets it.
fn tightest_budget<'p>(
    policies: impl Iterator<Item = &'p CompiledPolicy>,
    kind: LimitKind,
    action: &str,
) -> Option<(Usd, &'p CompiledPolicy)> {
    policies
        .filter_map(|p| {
            let limit = match kind {
                LimitKind::ActionBudget => p.budget_actions.get(action).copied(),
                LimitKind::RunBudget => p.budget_run,
                _ => p.budget_session,
            }?;
            Some((limit, p))
        })
        .min_by_key(|(l, _)| *l)
}

#[expect(clippy::too_many_arguments, reason = "the numbers of one budget denial")]
fn budget_outcome(
    kind: LimitKind,
    reason: ReasonCode,
    label: &str,
    req: &ActionRequest<'_>,
    spent: Usd,
    cost: Usd,
    limit: Usd,
    policy: &Arc<str>,
) -> Outcome {
    let what = if kind == LimitKind::ActionBudget {
        format!("budget for `{}`", req.action)
    } else {
        format!("{label} budget")
    };
    Outcome::deny(
        InterventionType::BudgetExceeded,
        reason,
        format!("{what} exceeded: spent {spent} + this call {cost} > limit {limit} (policy `{policy}`)"),
        policy,
        None,
    )
    .with_limit(Limit {
        kind,
        limit: limit.as_f64(),
        used: spent.as_f64(),
        requested: cost.as_f64(),
        window_seconds: None,
        field: None,
    })
}

fn approval_check<'p>(
    enforce: impl Iterator<Item = &'p CompiledPolicy> + Clone,
    req: &ActionRequest<'_>,
    cost: Usd,
    pending: &Pending<'p>,
) -> Option<Outcome> {
    let ask = |reason, message: String, p: &CompiledPolicy, rule: Option<&Arc<str>>, limit: Option<Limit>| Outcome {
        verdict: Verdict::RequireApproval,
        intervention: Some(InterventionType::ApprovalRequired),
        reason,
        message: Cow::Owned(message),
        policy: Some(Arc::clone(&p.name)),
        rule: rule.map(Arc::clone),
        limit,
        retry_after: None,
    };
    if let Some((p, rule, msg)) = pending.approval_rule {
        return Some(ask(
            ReasonCode::RuleApproval,
            rule_message(msg, rule, req.action, "requires approval for"),
            p,
            rule,
            None,
        ));
    }
    for p in enforce.clone() {
        if p.approval_actions.contains(req.action) {
            return Some(ask(
                ReasonCode::ApprovalRequired,
                format!("action `{}` requires human approval (policy `{}`)", req.action, p.name),
                p,
                None,
                None,
            ));
        }
    }
    let tightest = enforce.filter_map(|p| Some((p.approval_threshold?, p))).min_by_key(|(t, _)| *t);
    if let Some((threshold, p)) = tightest
        && cost > threshold
    {
        return Some(ask(
            ReasonCode::ApprovalCostThreshold,
            format!(
                "cost {cost} of `{}` is above the approval threshold {threshold} (policy `{}`)",
                req.action, p.name
            ),
            p,
            None,
            Some(Limit {
                kind: LimitKind::ApprovalCostThreshold,
                limit: threshold.as_f64(),
                used: 0.0,
                requested: cost.as_f64(),
                window_seconds: None,
                field: None,
            }),
        ));
    }
    None
}

fn approval_spec<'p>(enforce: impl Iterator<Item = &'p CompiledPolicy>) -> ApprovalSpec {
    let mut timeout: Option<u64> = None;
    let mut approvers: Vec<String> = Vec::new();
    let mut escalation: Option<crate::model::Escalation> = None;
    for p in enforce.filter(|p| p.has_approvals) {
        if let Some(t) = p.approval_timeout {
            timeout = Some(timeout.map_or(t, |c| c.min(t)));
        }
        for a in &p.approvers {
            if !approvers.contains(a) {
                approvers.push(a.clone());
            }
        }
        // Several policies escalate at the earliest share, to every group they name.
        if let Some(e) = &p.escalation {
            let merged = escalation.get_or_insert_with(|| crate::model::Escalation {
                after_percent: e.after_percent,
                approvers: Vec::new(),
            });
            merged.after_percent = merged.after_percent.min(e.after_percent);
            for a in &e.approvers {
                if !merged.approvers.contains(a) {
                    merged.approvers.push(a.clone());
                }
            }
        }
    }
    ApprovalSpec { timeout_seconds: timeout, approvers, escalation }
}

/// What a human granted a call before it is decided again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    None,
    /// An approval: the approval step is skipped.
    Approved,
    /// A resume after a pause over budget: the budgets and the approval step are skipped.
    OverBudget,
}

/// A 64-bit digest of a JSON value that does not depend on object key order.
/// Identifies "this action with these arguments" for loop histories, the same in every process.
fn loop_fingerprint(action: &str, args_digest: u64) -> u64 {
    stable_hash(&[b"loop", action.as_bytes(), &args_digest.to_le_bytes()])
}

pub fn args_digest(v: &Value) -> u64 {
    fn walk(v: &Value, h: &mut sha2::Sha256) {
        use sha2::Digest;
        match v {
            Value::Null => h.update([0u8]),
            Value::Bool(b) => h.update([1u8, u8::from(*b)]),
            Value::Number(n) => {
                h.update([2u8]);
                h.update(n.as_f64().unwrap_or(0.0).to_bits().to_le_bytes());
            }
            Value::String(s) => {
                h.update([3u8]);
                h.update((s.len() as u64).to_le_bytes());
                h.update(s.as_bytes());
            }
            Value::Array(a) => {
                h.update([4u8]);
                h.update((a.len() as u64).to_le_bytes());
                a.iter().for_each(|x| walk(x, h));
            }
            Value::Object(m) => {
                h.update([5u8]);
                let mut keys: SmallVec<[&String; 8]> = m.keys().collect();
                keys.sort();
                h.update((keys.len() as u64).to_le_bytes());
                for k in keys {
                    h.update((k.len() as u64).to_le_bytes());
                    h.update(k.as_bytes());
                    if let Some(x) = m.get(k) {
                        walk(x, h);
                    }
                }
            }
        }
    }
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    walk(v, &mut h);
    let out = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(out.get(..8).unwrap_or(&[0; 8]));
    u64::from_le_bytes(b)
}

// ---------------------------------------------------------------------------------------------
// Counters kept elsewhere: the server on PostgreSQL keeps budgets and windows in the database so
// that every replica agrees. It asks the policies what a call touches, checks and reserves in one
// transaction, and words its denials through the functions below, so both authorities agree.

/// A sliding window a call counts against: a rate limit, or the loop history of its arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowCheck {
    /// Identifies the counter across processes: the same limit and scope give the same key.
    pub key: String,
    pub kind: LimitKind,
    pub max: u32,
    pub window_ns: u64,
    pub window_seconds: f64,
    pub policy: Arc<str>,
}

/// The tightest budget of one kind (action, run, session) that applies to a call.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetCheck {
    pub kind: LimitKind,
    pub limit: Usd,
    pub policy: Arc<str>,
}

/// Everything a call must be checked against in shared counters, in the order `decide` checks them:
/// rate limits, then loops, then budgets (action, run, session).
#[derive(Debug, Clone, PartialEq)]
pub struct CounterPlan {
    pub cost: Usd,
    pub args_digest: u64,
    pub windows: Vec<WindowCheck>,
    pub budgets: Vec<BudgetCheck>,
}

impl PolicySet {
    /// The counters an enforced call touches. Errors name what is wrong with the request.
    pub fn counter_plan(&self, req: &ActionRequest<'_>) -> Result<CounterPlan, String> {
        let cost = validate(req)?;
        let enforce = || self.applicable(req.agent_id, req.run_id).filter(|p| p.mode == Mode::Enforce);
        // One check per policy's limit; several checks may share a counter (the same key), which
        // then counts each call once.
        let mut windows = Vec::new();
        for p in enforce() {
            if let Some(rl) = p.rate_limits.get(req.action) {
                windows.push(WindowCheck {
                    key: format!("rate:{:016x}:{}", rl.fingerprint, scope_key(rl.per, req)),
                    kind: LimitKind::RateLimit,
                    max: rl.max_count,
                    window_ns: rl.window_ns,
                    window_seconds: rl.window_seconds,
                    policy: Arc::clone(&p.name),
                });
            }
        }
        let digest = args_digest(req.args);
        let loop_key = || format!("loop:{:016x}:{}", loop_fingerprint(req.action, digest), req.run_id);
        for p in enforce() {
            if let Some((max, window_ns, window_s)) = p.loops {
                windows.push(WindowCheck {
                    key: loop_key(),
                    kind: LimitKind::Loop,
                    max,
                    window_ns,
                    window_seconds: window_s,
                    policy: Arc::clone(&p.name),
                });
            }
        }
        let mut budgets = Vec::new();
        for kind in [LimitKind::ActionBudget, LimitKind::RunBudget, LimitKind::SessionBudget] {
            if let Some((limit, p)) = tightest_budget(enforce(), kind, req.action) {
                budgets.push(BudgetCheck { kind, limit, policy: Arc::clone(&p.name) });
            }
        }
        Ok(CounterPlan { cost, args_digest: digest, windows, budgets })
    }

    /// The longest rate-limit or loop window of any policy: how far back counters can reach.
    pub fn max_window_ns(&self) -> u64 {
        let all = self.global.iter().chain(self.by_agent.values().flatten()).chain(self.by_run.values().flatten());
        all.flat_map(|p| p.rate_limits.values().map(|r| r.window_ns)).max().unwrap_or(0).max(self.max_loop_window_ns)
    }

    /// The denial for a full window: `used` calls already in it, the next slot free in `retry_after_ns`.
    pub fn window_denial(&self, req: &ActionRequest<'_>, w: &WindowCheck, used: u64, retry_after_ns: u64) -> Decision {
        let secs = nanos_to_secs(retry_after_ns);
        let (reason, message) = if w.kind == LimitKind::Loop {
            (
                ReasonCode::LoopDetected,
                format!(
                    "loop detected: `{}` was already called with the same arguments {} within {}s (policy `{}`)",
                    req.action,
                    times(w.max),
                    w.window_seconds,
                    w.policy
                ),
            )
        } else {
            (
                ReasonCode::RateLimited,
                format!(
                    "rate limit for `{}` reached: {} in any {}s (policy `{}`); retry after {secs:.3}s",
                    req.action,
                    calls(w.max),
                    w.window_seconds,
                    w.policy
                ),
            )
        };
        let mut o = Outcome::deny(InterventionType::RateLimited, reason, message, &w.policy, None).with_limit(Limit {
            kind: w.kind,
            limit: f64::from(w.max),
            used: used as f64,
            requested: 1.0,
            window_seconds: Some(w.window_seconds),
            field: None,
        });
        o.retry_after = Some(secs);
        Engine::finish(self, o)
    }

    /// The denial for a budget that `spent` plus this call's cost would exceed.
    pub fn budget_denial(&self, req: &ActionRequest<'_>, b: &BudgetCheck, spent: Usd, cost: Usd) -> Decision {
        let (reason, label) = match b.kind {
            LimitKind::ActionBudget => (ReasonCode::ActionBudgetExceeded, "action"),
            LimitKind::RunBudget => (ReasonCode::RunBudgetExceeded, "run"),
            _ => (ReasonCode::SessionBudgetExceeded, "session"),
        };
        Engine::finish(self, budget_outcome(b.kind, reason, label, req, spent, cost, b.limit, &b.policy))
    }

    /// The denial for a halted agent or run.
    pub fn halt_denial(&self, target: &HaltTarget, reason: &str) -> Decision {
        let (kind, id) = match target {
            HaltTarget::Agent(a) => ("agent", a),
            HaltTarget::Run(r) => ("run", r),
        };
        Engine::finish(
            self,
            Outcome {
                verdict: Verdict::Deny,
                intervention: Some(InterventionType::Halted),
                reason: ReasonCode::Halted,
                message: Cow::Owned(format!("{kind} `{id}` is halted: {reason}")),
                policy: None,
                rule: None,
                limit: None,
                retry_after: None,
            },
        )
    }
}

impl Engine {
    /// Re-applies a reservation made by an earlier process to the counters, without checking
    /// anything: its cost and calls, and (with `at_nanos`) its rate-limit and loop slots at the time
    /// it was made. Used to rebuild state from a database after a restart.
    pub fn restore(
        &self,
        req: &ActionRequest<'_>,
        args_digest: u64,
        at_nanos: Option<u64>,
        cost: Usd,
        calls: i64,
    ) -> Reservation {
        let set = self.policies.load();
        let id = self.state.next_id();
        let mut rates: SmallVec<[Arc<Mutex<Ring>>; 2]> = SmallVec::new();
        let mut loop_ring = None;
        if let Some(at) = at_nanos {
            for rl in set.applicable(req.agent_id, req.run_id).filter_map(|p| p.rate_limits.get(req.action)) {
                let cell = self.rate_cell(rl, req);
                if !rates.iter().any(|c| Arc::ptr_eq(c, &cell)) {
                    cell.lock().push(at, id, rl.window_ns);
                    rates.push(cell);
                }
            }
            if set.loop_capacity > 0 && set.applicable(req.agent_id, req.run_id).any(|p| p.loops.is_some()) {
                let cell = self.loop_cell(&set, req, args_digest);
                {
                    let mut g = cell.lock();
                    g.grow_to(set.loop_capacity);
                    g.push(at, id, set.max_loop_window_ns);
                }
                loop_ring = Some(cell);
            }
        }
        let session = self.session_cell(req.session_id);
        let (run_idx, action_idx) = {
            let mut s = session.lock();
            let r = s.run_idx(req.run_id);
            let a = s.action_idx(req.action);
            s.add(r, a, cost, calls);
            (r, a)
        };
        Reservation { id, cost, session, run_idx, action_idx, rates, loop_ring }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::load::parse_yaml;

    thread_local! {
        static FAULT: Cell<bool> = const { Cell::new(false) };
    }

    #[allow(clippy::panic)]
    pub(super) fn maybe_fault() {
        if FAULT.with(Cell::get) {
            panic!("injected fault");
        }
    }

    fn decide_with_fault(yaml: &str) -> Decision {
        let engine = Engine::from_docs(parse_yaml("p.yaml", "p", yaml).unwrap()).unwrap();
        FAULT.with(|f| f.set(true));
        let d = engine.decide(&ActionRequest::new("search"));
        FAULT.with(|f| f.set(false));
        d
    }

    #[test]
    fn an_internal_failure_denies_under_fail_mode_secure() {
        let d = decide_with_fault("budgets:\n  run: 1\n");
        assert_eq!(d.verdict, Verdict::Deny);
        assert_eq!(d.reason, ReasonCode::InternalError);
        assert!(d.message.contains("injected fault"), "{}", d.message);
    }

    #[test]
    fn an_internal_failure_allows_with_a_warning_under_fail_mode_safe() {
        for yaml in ["fail_mode: safe\n", "strict_mode: false\n"] {
            let d = decide_with_fault(yaml);
            assert_eq!(d.verdict, Verdict::Warn, "{yaml}");
            assert_eq!(d.intervention, Some(InterventionType::Warning));
            assert_eq!(d.reason, ReasonCode::InternalError);
        }
    }

    #[test]
    fn with_no_policy_an_internal_failure_still_fails_closed() {
        let engine = Engine::new(PolicySet::empty());
        FAULT.with(|f| f.set(true));
        let d = engine.decide(&ActionRequest::new("search"));
        FAULT.with(|f| f.set(false));
        assert_eq!(d.verdict, Verdict::Deny);
    }

    #[test]
    fn engine_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Engine>();
        check::<crate::Guard>();
    }
}
