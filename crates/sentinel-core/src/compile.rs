//! Validated policy documents turned into an indexed form that decisions run against:
//! hash sets for names, one precompiled glob set per policy, regexes compiled once.

use std::hash::BuildHasher;
use std::sync::Arc;

use arc_swap::ArcSwap;
use globset::{Glob, GlobSet, GlobSetBuilder};
use hashbrown::{HashMap, HashSet};
use regex::Regex;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::clock::secs_to_nanos;
use crate::load::PolicyError;
use crate::model::{Anomaly, CounterScope, FailMode, Mode, Operator, PolicyDoc, RuleAction, Scope};
use crate::money::Usd;

/// Most action names whose rule matches are remembered per policy; beyond it, globs are matched per call.
pub(crate) const MATCH_CACHE_NAMES: usize = 4096;

impl CompiledPolicy {
    /// Indices (in evaluation order) of the rules whose pattern matches `action`.
    pub(crate) fn matching_rules(&self, action: &str) -> Arc<[u32]> {
        if let Some(hit) = self.match_cache.load().get(action) {
            return Arc::clone(hit);
        }
        let mut m = Vec::new();
        self.globs.matches_into(action, &mut m);
        let ids: Arc<[u32]> = m.into_iter().filter_map(|i| u32::try_from(i).ok()).collect();
        if self.match_cache.load().len() < MATCH_CACHE_NAMES {
            self.match_cache.rcu(|cur| {
                let mut next = HashMap::clone(cur);
                next.insert(Box::from(action), Arc::clone(&ids));
                next
            });
        }
        ids
    }
}

pub(crate) struct CompiledCondition {
    pub path: Vec<Box<str>>,
    /// The path's number among the policy's distinct paths ([`CompiledPolicy::paths`]): a call's
    /// argument is looked up once per path, however many conditions read it.
    pub slot: usize,
    pub op: Operator,
    pub value: Value,
    pub num: Option<f64>,
    pub regex: Option<Regex>,
    /// For `contains` / `not_contains` with a text value, and only then: the searcher, built once
    /// (`str::contains` builds one on every call, most of the cost of a short search).
    pub finder: Option<memchr::memmem::Finder<'static>>,
}

pub(crate) struct CompiledRule {
    pub id: Arc<str>,
    pub action: RuleAction,
    pub conditions: Vec<CompiledCondition>,
    pub message: Option<Arc<str>>,
}

pub(crate) struct CompiledRateLimit {
    pub fingerprint: u64,
    pub max_count: u32,
    pub window_ns: u64,
    pub window_seconds: f64,
    pub per: CounterScope,
}

pub(crate) struct CompiledPolicy {
    pub name: Arc<str>,
    pub mode: Mode,
    pub fail_mode: FailMode,
    pub denied: HashSet<Box<str>>,
    pub allowed: Option<HashSet<Box<str>>>,
    pub rules: Vec<CompiledRule>,
    /// How many distinct argument paths the rules' conditions read.
    pub paths: usize,
    pub globs: GlobSet,
    /// Which rules' patterns match an action name: a pure function of the name, so it is
    /// remembered (up to [`MATCH_CACHE_NAMES`] names). Conditions are still checked on every call.
    pub match_cache: ArcSwap<HashMap<Box<str>, Arc<[u32]>>>,
    pub default_action: RuleAction,
    pub rate_limits: HashMap<Box<str>, CompiledRateLimit>,
    pub budget_session: Option<Usd>,
    pub budget_run: Option<Usd>,
    pub budget_actions: HashMap<Box<str>, Usd>,
    pub approval_actions: HashSet<Box<str>>,
    pub approval_threshold: Option<Usd>,
    pub approval_timeout: Option<u64>,
    pub approvers: Vec<String>,
    pub escalation: Option<crate::model::Escalation>,
    pub has_approvals: bool,
    pub anomaly: Option<Anomaly>,
    pub loops: Option<(u32, u64, f64)>,
}

/// Every loaded policy, indexed by scope.
pub struct PolicySet {
    pub(crate) version: Arc<str>,
    pub(crate) docs: Vec<PolicyDoc>,
    pub(crate) global: Vec<CompiledPolicy>,
    pub(crate) by_agent: HashMap<Box<str>, Vec<CompiledPolicy>>,
    pub(crate) by_run: HashMap<Box<str>, Vec<CompiledPolicy>>,
    pub(crate) loop_capacity: usize,
    pub(crate) max_loop_window_ns: u64,
    pub(crate) any_anomaly: bool,
    pub(crate) hasher: hashbrown::DefaultHashBuilder,
}

impl std::fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySet").field("version", &self.version).field("policies", &self.docs.len()).finish()
    }
}

impl PolicySet {
    /// An empty set: every well-formed call is allowed.
    pub fn empty() -> Self {
        Self::with_version(&[])
    }

    /// A set with no compiled policies yet, versioned by `docs`.
    fn with_version(docs: &[PolicyDoc]) -> Self {
        PolicySet {
            version: Arc::from(version_of(docs)),
            docs: Vec::new(),
            global: Vec::new(),
            by_agent: HashMap::new(),
            by_run: HashMap::new(),
            loop_capacity: 0,
            max_loop_window_ns: 0,
            any_anomaly: false,
            hasher: Default::default(),
        }
    }

    /// Validates and indexes policies. Errors name the policy and rule.
    pub fn compile(docs: Vec<PolicyDoc>) -> Result<Self, Vec<PolicyError>> {
        let mut errors = Vec::new();
        let mut names = std::collections::HashSet::new();
        for d in &docs {
            let n = d.name.clone().unwrap_or_default();
            if !names.insert(n.clone()) {
                errors.push(PolicyError {
                    file: format!("policy `{n}`"),
                    line: 0,
                    column: 0,
                    message: format!("duplicate policy name `{n}`; names must be unique"),
                    source_line: None,
                });
            }
        }
        let mut set = Self::with_version(&docs);
        for d in &docs {
            if !d.enabled {
                continue;
            }
            match compile_one(d) {
                Ok(p) => {
                    if let Some((n, w, _)) = p.loops {
                        set.loop_capacity = set.loop_capacity.max(n as usize);
                        set.max_loop_window_ns = set.max_loop_window_ns.max(w);
                    }
                    set.any_anomaly |= p.anomaly.as_ref().is_some_and(|a| a.enabled);
                    match d.scope {
                        Scope::Global => set.global.push(p),
                        Scope::Agent => {
                            let k: Box<str> = d.agent_id.clone().unwrap_or_default().into();
                            set.by_agent.entry(k).or_default().push(p);
                        }
                        Scope::Run => {
                            let k: Box<str> = d.run_id.clone().unwrap_or_default().into();
                            set.by_run.entry(k).or_default().push(p);
                        }
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        set.docs = docs;
        if errors.is_empty() { Ok(set) } else { Err(errors) }
    }

    /// The hash that identifies this exact set of policies.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Whether the policy named `name` pauses calls over its budgets instead of failing them.
    pub fn pauses_on_budget(&self, name: &str) -> bool {
        self.docs.iter().any(|d| {
            d.name.as_deref() == Some(name) && d.on_budget_exceeded == Some(crate::model::OnBudgetExceeded::Pause)
        })
    }

    pub fn docs(&self) -> &[PolicyDoc] {
        &self.docs
    }

    /// The enabled policies that apply to an agent and run: global, then the agent's, then the run's.
    pub(crate) fn applicable<'a>(&'a self, agent: &str, run: &str) -> impl Iterator<Item = &'a CompiledPolicy> + Clone {
        self.global
            .iter()
            .chain(self.by_agent.get(agent).into_iter().flatten())
            .chain(self.by_run.get(run).into_iter().flatten())
    }

    pub(crate) fn hash_str(&self, s: &str) -> u64 {
        self.hasher.hash_one(s)
    }
}

/// A stable fingerprint (not seeded per process) so counters survive a policy reload.
pub(crate) fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    let out = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(out.get(..8).unwrap_or(&[0; 8]));
    u64::from_le_bytes(b)
}

fn version_of(docs: &[PolicyDoc]) -> String {
    let bytes = serde_json::to_vec(docs).unwrap_or_default();
    let digest = Sha256::digest(&bytes);
    hex::encode(digest.get(..8).unwrap_or_default())
}

fn compile_one(d: &PolicyDoc) -> Result<CompiledPolicy, PolicyError> {
    let name: Arc<str> = Arc::from(d.name.clone().unwrap_or_else(|| "policy".to_string()));
    let err = |message: String| PolicyError {
        file: format!("policy `{name}`"),
        line: 0,
        column: 0,
        message,
        source_line: None,
    };
    let mut order: Vec<usize> = (0..d.rules.len()).collect();
    // Higher priority first; equal priorities keep file order (the sort is stable).
    order.sort_by_key(|i| std::cmp::Reverse(d.rules.get(*i).map_or(0, |r| r.priority)));
    let mut rules = Vec::new();
    let mut paths: HashMap<&str, usize> = HashMap::new();
    let mut gsb = GlobSetBuilder::new();
    for i in order {
        let Some(r) = d.rules.get(i) else { continue };
        if !r.enabled {
            continue;
        }
        let glob = Glob::new(&r.function_pattern)
            .map_err(|e| err(format!("rule `{}`: invalid glob `{}`: {}", r.id, r.function_pattern, e.kind())))?;
        gsb.add(glob);
        let mut conditions = Vec::new();
        for c in &r.conditions {
            let regex = match (c.operator, &c.value) {
                (Operator::Matches, Value::String(p)) => {
                    Some(Regex::new(p).map_err(|e| err(format!("rule `{}`: invalid regex `{p}`: {e}", r.id)))?)
                }
                _ => None,
            };
            let next = paths.len();
            let slot = *paths.entry(c.param.as_str()).or_insert(next);
            conditions.push(CompiledCondition {
                path: c.param.split('.').map(Box::from).collect(),
                slot,
                op: c.operator,
                num: c.value.as_f64(),
                value: c.value.clone(),
                regex,
                finder: match (c.operator, &c.value) {
                    (Operator::Contains | Operator::NotContains, Value::String(n)) => {
                        Some(memchr::memmem::Finder::new(n.as_bytes()).into_owned())
                    }
                    _ => None,
                },
            });
        }
        rules.push(CompiledRule {
            id: Arc::from(r.id.as_str()),
            action: r.action,
            conditions,
            message: r.message.as_deref().map(Arc::from),
        });
    }
    let globs = gsb.build().map_err(|e| err(format!("cannot build rule patterns: {e}")))?;
    let per_default = CounterScope::Agent;
    let rate_limits = d
        .rate_limits
        .iter()
        .map(|(action, rl)| {
            let per = rl.per.unwrap_or(per_default);
            let fp = stable_hash(&[
                b"rate",
                action.as_bytes(),
                &rl.max_count.to_le_bytes(),
                &rl.window_seconds.to_bits().to_le_bytes(),
                &[per as u8],
            ]);
            (
                Box::from(action.as_str()),
                CompiledRateLimit {
                    fingerprint: fp,
                    max_count: rl.max_count,
                    window_ns: secs_to_nanos(rl.window_seconds),
                    window_seconds: rl.window_seconds,
                    per,
                },
            )
        })
        .collect();
    let budgets = d.budgets.clone().unwrap_or_default();
    let approvals = d.approvals.clone().unwrap_or_default();
    if let Some(e) = &approvals.escalation {
        if !(e.after_percent.is_finite() && e.after_percent > 0.0 && e.after_percent < 100.0) {
            return Err(err(format!(
                "`approvals.escalation.after_percent` must be between 0 and 100 (exclusive), got {}",
                e.after_percent
            )));
        }
        if e.approvers.is_empty() {
            return Err(err("`approvals.escalation.approvers` must name at least one approver".into()));
        }
    }
    Ok(CompiledPolicy {
        name,
        mode: d.mode.unwrap_or_default(),
        fail_mode: d.effective_fail_mode(),
        denied: d.denied_actions.iter().map(|s| Box::from(s.as_str())).collect(),
        allowed: d
            .allowed_actions
            .as_ref()
            .filter(|a| !a.is_empty())
            .map(|a| a.iter().map(|s| Box::from(s.as_str())).collect()),
        rules,
        paths: paths.len(),
        globs,
        match_cache: ArcSwap::from_pointee(HashMap::new()),
        default_action: d.default_action.unwrap_or(RuleAction::Allow),
        rate_limits,
        budget_session: budgets.session,
        budget_run: budgets.run,
        budget_actions: budgets.actions.iter().map(|(k, v)| (Box::from(k.as_str()), *v)).collect(),
        has_approvals: d.approvals.is_some(),
        approval_actions: approvals.actions.iter().map(|s| Box::from(s.as_str())).collect(),
        approval_threshold: approvals.cost_threshold_usd,
        approval_timeout: approvals.timeout_seconds,
        approvers: approvals.approvers,
        escalation: approvals.escalation,
        anomaly: d.anomaly.clone().filter(|a| a.enabled),
        loops: d.loops.as_ref().map(|l| (l.max_repeats, secs_to_nanos(l.window_seconds), l.window_seconds)),
    })
}
