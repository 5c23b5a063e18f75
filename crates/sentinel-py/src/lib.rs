//! PyO3 glue for `agent_sentinel`: converts Python values to the core's types and back, and maps
//! errors. Decisions, counters and ledger writing all happen in `sentinel-core`.

/// A guarded call makes a dozen small allocations (argument values, the request's strings, the
/// permit); mimalloc's thread-local free lists make them cheaper than glibc's (about 0.2 µs per
/// call measured). Built without transparent huge pages (`no_thp`): they made the process's RSS
/// swing by tens of MiB. This covers the extension's own allocations; Python objects keep
/// Python's allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use sentinel_core::decision::{ApprovalSpec, Decision};
use sentinel_core::guard::{CallOutcome, Inputs, Logs};
use sentinel_core::ledger::LogOptions;
use sentinel_core::records::ApprovalRecord;
use sentinel_core::{ActionRequest, Begun, CallParts, HaltTarget, PolicySet, Usd, load};
use serde_json::{Map, Number, Value};

/// Nesting deeper than this is recorded as the value's string form (it also stops cycles).
const MAX_DEPTH: usize = 32;

/// Converts a Python value to JSON. Anything JSON cannot hold is recorded as `str(value)`.
fn to_json(obj: &Bound<'_, PyAny>, depth: usize) -> Value {
    if obj.is_none() {
        return Value::Null;
    }
    if depth > MAX_DEPTH {
        return Value::String(stringify(obj));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Value::String(s.to_string_lossy().into_owned());
    }
    if let Ok(b) = obj.cast::<PyBool>() {
        return Value::Bool(b.is_true());
    }
    if obj.is_instance_of::<PyInt>() {
        if let Ok(i) = obj.extract::<i64>() {
            return Value::Number(i.into());
        }
        if let Ok(u) = obj.extract::<u64>() {
            return Value::Number(u.into());
        }
        return Value::String(stringify(obj));
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        return Number::from_f64(f.value()).map_or_else(|| Value::String(stringify(obj)), Value::Number);
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        let mut m = Map::new();
        for (k, v) in d.iter() {
            let key = match k.cast::<PyString>() {
                Ok(s) => s.to_string_lossy().into_owned(),
                Err(_) => stringify(&k),
            };
            m.insert(key, to_json(&v, depth + 1));
        }
        return Value::Object(m);
    }
    if let Ok(l) = obj.cast::<PyList>() {
        return Value::Array(l.iter().map(|v| to_json(&v, depth + 1)).collect());
    }
    if let Ok(t) = obj.cast::<PyTuple>() {
        return Value::Array(t.iter().map(|v| to_json(&v, depth + 1)).collect());
    }
    Value::String(stringify(obj))
}

fn stringify(obj: &Bound<'_, PyAny>) -> String {
    match obj.str() {
        Ok(s) => s.to_string_lossy().into_owned(),
        Err(_) => format!("<unprintable {}>", obj.get_type().name().map(|n| n.to_string()).unwrap_or_default()),
    }
}

/// Converts JSON back to Python (for decisions, limits, replayed outputs).
fn to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any()
            } else if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any()
            } else {
                n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any()
            }
        }
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(a) => {
            let items: Vec<Bound<'py, PyAny>> = a.iter().map(|x| to_py(py, x)).collect::<PyResult<_>>()?;
            PyList::new(py, items)?.into_any()
        }
        Value::Object(m) => {
            let d = PyDict::new(py);
            for (k, x) in m {
                d.set_item(k, to_py(py, x)?)?;
            }
            d.into_any()
        }
    })
}

/// A compiled policy set and its counters.
#[pyclass(frozen, module = "agent_sentinel._native")]
struct Engine {
    inner: Arc<sentinel_core::Engine>,
}

fn policy_errors(errors: Vec<sentinel_core::PolicyError>) -> PyErr {
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    PyValueError::new_err(text.join("\n"))
}

#[pymethods]
impl Engine {
    /// An engine over the policies in `texts`: `(text, filename, is_rules_json)` triples, merged.
    #[new]
    #[pyo3(signature = (sources=Vec::new()))]
    fn new(sources: Vec<(String, String, bool)>) -> PyResult<Self> {
        Ok(Engine { inner: Arc::new(sentinel_core::Engine::new(compile_all(&sources)?)) })
    }

    /// Replaces the policies; spend, windows and baselines are kept.
    fn replace(&self, sources: Vec<(String, String, bool)>) -> PyResult<()> {
        self.inner.replace_policies(compile_all(&sources)?);
        Ok(())
    }

    fn policy_version(&self) -> String {
        self.inner.policy_version().to_string()
    }

    /// The loaded policy documents, as JSON.
    fn docs_json(&self) -> String {
        serde_json::to_string(self.inner.policies().docs()).unwrap_or_else(|_| "[]".to_string())
    }

    /// `(session_total, run_total, {action: (count, spent)})` in dollars.
    fn spend(&self, session_id: &str, run_id: &str) -> (f64, f64, HashMap<String, (u64, f64)>) {
        let s = self.inner.spend(session_id, run_id);
        let actions = s.actions.into_iter().map(|(k, v)| (k, (v.count, v.spent.as_f64()))).collect();
        (s.session_total.as_f64(), s.run_total.as_f64(), actions)
    }

    fn reset_run(&self, session_id: &str, run_id: &str) {
        self.inner.reset_run(session_id, run_id);
    }

    fn reset_counters(&self) {
        self.inner.reset_counters();
    }

    /// `kind` is `agent` or `run`.
    fn halt(&self, kind: &str, id: &str, reason: &str) -> PyResult<()> {
        self.inner.halt(target(kind, id)?, reason);
        Ok(())
    }

    fn resume(&self, kind: &str, id: &str) -> PyResult<()> {
        self.inner.resume(&target(kind, id)?);
        Ok(())
    }
}

fn compile_all(sources: &[(String, String, bool)]) -> PyResult<PolicySet> {
    let mut docs = Vec::new();
    for (text, filename, rules_json) in sources {
        docs.extend(load::parse_source(filename, text, *rules_json).map_err(policy_errors)?);
    }
    PolicySet::compile(docs).map_err(policy_errors)
}

fn target(kind: &str, id: &str) -> PyResult<HaltTarget> {
    match kind {
        "agent" => Ok(HaltTarget::Agent(id.to_string())),
        "run" => Ok(HaltTarget::Run(id.to_string())),
        other => Err(PyValueError::new_err(format!("halt target must be `agent` or `run`, got `{other}`"))),
    }
}

/// A ledger failure as the `RuntimeError` Python sees, saying what could not be done.
fn ledger_error(what: &'static str) -> impl Fn(sentinel_core::LedgerError) -> PyErr {
    move |e| PyRuntimeError::new_err(format!("{what}: {e}"))
}

/// Every directory's logs this process has open.
static OPEN: OnceLock<Mutex<HashMap<PathBuf, Weak<Logs>>>> = OnceLock::new();

/// Logs are opened once per directory per process and shared by every guard writing there.
/// `AGENT_SENTINEL_LEDGER_SYNC` says when entries reach the OS (see `LogOptions::from_sync_setting`).
fn logs_for(home: &Path) -> PyResult<Arc<Logs>> {
    let key = std::fs::create_dir_all(home)
        .and_then(|()| home.canonicalize())
        .map_err(|e| PyRuntimeError::new_err(format!("cannot use `{}` for the ledger: {e}", home.display())))?;
    let mut open = OPEN.get_or_init(Default::default).lock();
    if let Some(l) = open.get(&key).and_then(Weak::upgrade) {
        return Ok(l);
    }
    let opts = LogOptions::from_sync_setting(&std::env::var("AGENT_SENTINEL_LEDGER_SYNC").unwrap_or_default())
        .map_err(PyValueError::new_err)?;
    let logs = Logs::open(&key, opts).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    open.insert(key, Arc::downgrade(&logs));
    Ok(logs)
}

/// Hands every entry appended so far, in every open ledger of this process, to the OS
/// (`agent_sentinel.flush()`; also run at exit).
#[pyfunction]
fn flush_all(py: Python<'_>) -> PyResult<()> {
    let open: Vec<Arc<Logs>> =
        OPEN.get().map(|o| o.lock().values().filter_map(Weak::upgrade).collect()).unwrap_or_default();
    py.detach(|| open.iter().try_for_each(|l| l.flush())).map_err(ledger_error("cannot write the ledger"))
}

/// An engine writing to the ledger and interventions log of one directory.
#[pyclass(frozen, module = "agent_sentinel._native")]
struct Guard {
    inner: sentinel_core::Guard,
}

/// A call that may run. Pass it to `Guard.finish` (or `Guard.abandon`) exactly once.
#[pyclass(frozen, module = "agent_sentinel._native")]
struct Permit {
    /// Boxed, so handing it from the core to Python and back moves a pointer, not the decision.
    inner: Mutex<Option<Box<sentinel_core::Permit>>>,
    /// The guard that issued it, when `Wrapped.begin` did (its `finish` needs no guard argument).
    guard: Option<Py<Guard>>,
    #[pyo3(get)]
    verdict: &'static str,
    #[pyo3(get)]
    message: String,
    #[pyo3(get)]
    reason: &'static str,
}

impl Permit {
    fn of(p: Box<sentinel_core::Permit>) -> Self {
        let verdict = p.decision.verdict.as_str();
        let reason = p.decision.reason.as_str();
        let message = if p.decision.verdict == sentinel_core::Verdict::Allow {
            String::new()
        } else {
            p.decision.message.to_string()
        };
        Permit { inner: Mutex::new(Some(p)), guard: None, verdict, message, reason }
    }

    fn issued_by(p: Box<sentinel_core::Permit>, guard: Py<Guard>) -> Self {
        Permit { guard: Some(guard), ..Permit::of(p) }
    }
}

/// A call that must not run now: a denial, or a request for approval.
#[pyclass(frozen, module = "agent_sentinel._native")]
struct Stop {
    decision: Decision,
    #[pyo3(get)]
    intervention_id: Option<String>,
    #[pyo3(get)]
    action: String,
    inputs: Inputs,
    args: Value,
}

#[pymethods]
impl Stop {
    #[getter]
    fn verdict(&self) -> &'static str {
        self.decision.verdict.as_str()
    }
    #[getter]
    fn reason(&self) -> &'static str {
        self.decision.reason.as_str()
    }
    #[getter]
    fn intervention(&self) -> Option<&'static str> {
        self.decision.intervention.map(|i| i.as_str())
    }
    #[getter]
    fn message(&self) -> String {
        self.decision.message.to_string()
    }
    #[getter]
    fn policy(&self) -> Option<String> {
        self.decision.policy.as_deref().map(str::to_string)
    }
    #[getter]
    fn rule(&self) -> Option<String> {
        self.decision.rule.as_deref().map(str::to_string)
    }
    #[getter]
    fn retry_after_seconds(&self) -> Option<f64> {
        self.decision.retry_after_seconds
    }
    #[getter]
    fn policy_version(&self) -> String {
        self.decision.policy_version.to_string()
    }
    #[getter]
    fn limit<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_py(py, &serde_json::to_value(&self.decision.limit).unwrap_or(Value::Null))
    }
    /// `(timeout_seconds, approvers)` when approval is required.
    #[getter]
    fn approval(&self) -> Option<(Option<u64>, Vec<String>)> {
        self.decision
            .approval
            .as_ref()
            .map(|ApprovalSpec { timeout_seconds, approvers, .. }| (*timeout_seconds, approvers.clone()))
    }
    /// The call's arguments, by parameter name (as the rules saw them).
    #[getter]
    fn arguments<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_py(py, &self.args)
    }
    /// The whole decision as a dict.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_py(py, &serde_json::to_value(&self.decision).unwrap_or(Value::Null))
    }
}

/// A function's parameters as binding needs them: positional names, and defaults by name.
struct Params<'a> {
    names: &'a [String],
    defaults: &'a [(String, Py<PyAny>)],
}

/// A call's arguments twice over: bound by parameter name for the rules (positional, then
/// keyword, then defaults), and as the ledger records them (`{"args": [...], "kwargs": {...}}`).
/// Each Python value is converted once.
fn prepare(args: &Bound<'_, PyTuple>, kwargs: Option<&Bound<'_, PyDict>>, params: &Params<'_>) -> (Value, Inputs) {
    let positional: Vec<Value> = args.iter().map(|a| to_json(&a, 0)).collect();
    let mut keyword: Vec<(String, Value)> = match kwargs {
        Some(k) => k.iter().map(|(k, v)| (key_of(&k), to_json(&v, 0))).collect(),
        None => Vec::new(),
    };
    // The ledger's copy is written now, so the values themselves can move into the bound ones.
    let inputs = Inputs::of_call(&positional, &mut keyword);
    let mut m = Map::new();
    let mut extra = Vec::new();
    for (i, a) in positional.into_iter().enumerate() {
        match params.names.get(i) {
            Some(name) => {
                m.insert(name.clone(), a);
            }
            None => extra.push(a),
        }
    }
    if !extra.is_empty() {
        m.insert("args".to_string(), Value::Array(extra));
    }
    for (k, v) in keyword {
        m.insert(k, v);
    }
    for (k, v) in params.defaults {
        if !m.contains_key(k.as_str()) {
            m.insert(k.clone(), to_json(v.bind(args.py()), 0));
        }
    }
    (Value::Object(m), inputs)
}

fn key_of(k: &Bound<'_, PyAny>) -> String {
    k.cast::<PyString>().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| stringify(k))
}

/// Names and defaults as the Python side passes them to `Guard.begin`.
fn params_from<'py>(
    names: &Bound<'py, PyTuple>,
    defaults: Option<&Bound<'py, PyDict>>,
) -> (Vec<String>, Vec<(String, Py<PyAny>)>) {
    let names = names.iter().map(|n| key_of(&n)).collect();
    let defaults = defaults.map(|d| d.iter().map(|(k, v)| (key_of(&k), v.unbind())).collect()).unwrap_or_default();
    (names, defaults)
}

#[pymethods]
impl Guard {
    #[new]
    fn new(engine: &Engine, home: PathBuf) -> PyResult<Self> {
        let logs = logs_for(&home)?;
        let inner = sentinel_core::Guard::with_logs(Arc::clone(&engine.inner), logs)
            .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        Ok(Guard { inner })
    }

    #[getter]
    fn home(&self) -> PathBuf {
        self.inner.home().to_path_buf()
    }

    /// Hands every entry appended so far to the OS.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.inner.flush()).map_err(ledger_error("cannot write the ledger"))
    }

    /// Decides one call. Returns a `Permit` (run it, then `finish`) or a `Stop`.
    /// `names`/`defaults` describe the function's parameters, so rules see arguments by name.
    #[pyo3(signature = (action, cost, tags, args, kwargs, names, defaults, ctx, approval=None, escalation_id=None))]
    #[expect(clippy::too_many_arguments, reason = "one crossing of the language boundary per call")]
    fn begin<'py>(
        &self,
        py: Python<'py>,
        action: &str,
        cost: f64,
        tags: Vec<String>,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
        names: &Bound<'py, PyTuple>,
        defaults: Option<&Bound<'py, PyDict>>,
        ctx: (Bound<'py, PyString>, Bound<'py, PyString>, Bound<'py, PyString>),
        approval: Option<(bool, String, String)>,
        escalation_id: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (agent_id, run_id, session_id) = (ctx.0.to_str()?, ctx.1.to_str()?, ctx.2.to_str()?);
        let (names, defaults) = params_from(names, defaults);
        let (bound, inputs) = prepare(args, kwargs, &Params { names: &names, defaults: &defaults });
        let req = ActionRequest::new(action)
            .agent(agent_id)
            .run(run_id)
            .session(session_id)
            .cost(cost)
            .args(&bound)
            .tags(&tags);
        let begun = match approval {
            Some((approved, approver, reason)) => {
                let record =
                    ApprovalRecord { approved, approver, reason, decided_at: sentinel_core::ledger::now_rfc3339() };
                self.inner.begin_approved(&req, inputs, record, escalation_id.as_deref())
            }
            None => self.inner.begin(&req, inputs),
        }
        .map_err(ledger_error("cannot record the decision"))?;
        match begun {
            Begun::Proceed(p) => Ok(Bound::new(py, Permit::of(p))?.into_any()),
            Begun::Stop { decision, intervention_id, inputs } => {
                Ok(Bound::new(py, Stop { decision, intervention_id, action: action.to_string(), inputs, args: bound })?
                    .into_any())
            }
        }
    }

    /// The call ran. `ok` says whether it returned (`output` is its result) or raised
    /// (`output` is the error text). Chains the ledger entry before returning (see `flush`).
    #[pyo3(signature = (permit, ok, output, actual_cost=None))]
    fn finish(
        &self,
        permit: &Bound<'_, Permit>,
        ok: bool,
        output: &Bound<'_, PyAny>,
        actual_cost: Option<f64>,
    ) -> PyResult<u64> {
        let Some(p) = permit.get().inner.lock().take() else {
            return Err(PyRuntimeError::new_err("this permit was already finished"));
        };
        let outcome = if ok { CallOutcome::Success(to_json(output, 0)) } else { CallOutcome::Error(stringify(output)) };
        let appended = self.inner.finish(*p, outcome, actual_cost).map_err(ledger_error("cannot write the ledger"))?;
        Ok(appended.seq)
    }

    /// The call never ran: give back its reservation.
    fn abandon(&self, permit: &Bound<'_, Permit>) {
        if let Some(p) = permit.get().inner.lock().take() {
            self.inner.abandon(*p);
        }
    }

    /// Records that a human rejected (or did not answer) an escalated call.
    fn reject(
        &self,
        stop: &Stop,
        approver: String,
        reason: String,
        agent_id: &str,
        run_id: &str,
        session_id: &str,
    ) -> PyResult<String> {
        let record =
            ApprovalRecord { approved: false, approver, reason, decided_at: sentinel_core::ledger::now_rfc3339() };
        let req = ActionRequest::new(&stop.action).agent(agent_id).run(run_id).session(session_id).args(&stop.args);
        self.inner
            .record_rejection(&req, &stop.inputs, &stop.decision, record, stop.intervention_id.as_deref())
            .map_err(ledger_error("cannot record the rejection"))
    }

    /// Writes a ledger entry directly (`Ledger.record`); it is with the OS when this returns.
    #[pyo3(signature = (action, inputs, outputs, cost_usd, duration_ms, outcome, tags, agent_id, run_id, session_id))]
    #[expect(clippy::too_many_arguments, reason = "mirrors Ledger.record")]
    fn record(
        &self,
        action: &str,
        inputs: &Bound<'_, PyAny>,
        outputs: &Bound<'_, PyAny>,
        cost_usd: f64,
        duration_ms: f64,
        outcome: &str,
        tags: Vec<String>,
        agent_id: &str,
        run_id: &str,
        session_id: &str,
    ) -> PyResult<u64> {
        if Usd::from_f64(cost_usd).is_err() {
            return Err(PyValueError::new_err(format!("`cost_usd` must be a non-negative number, got {cost_usd}")));
        }
        self.inner
            .record(
                action,
                &to_json(inputs, 0),
                &to_json(outputs, 0),
                cost_usd,
                duration_ms,
                outcome,
                &tags,
                (agent_id, run_id, session_id),
            )
            .and_then(|a| self.inner.flush().map(|()| a.seq))
            .map_err(ledger_error("cannot write the ledger"))
    }
}

// ---------------------------------------------------------------------------------------------
// The fast path of a guarded sync call: decide, run, settle and record in one crossing into Rust.

/// Reasons every guarded call must take the Python path (a replay exists, a central authority
/// decides too): while any holds, [`Wrapped::run`] hands the call to Python before deciding.
static SLOW_PATH: AtomicUsize = AtomicUsize::new(0);

/// `+1` when a reason to take the Python path begins, `-1` when it ends.
#[pyfunction]
fn slow_path(delta: i64) {
    if delta > 0 {
        SLOW_PATH.fetch_add(1, Ordering::SeqCst);
    } else {
        let _ = SLOW_PATH.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }
}

/// Where wrappers find their guard; set by Python when the guard is opened or dropped.
#[pyclass(frozen, module = "agent_sentinel._native")]
struct GuardSlot {
    guard: Mutex<Option<Py<Guard>>>,
}

#[pymethods]
impl GuardSlot {
    #[new]
    fn new() -> Self {
        GuardSlot { guard: Mutex::new(None) }
    }

    fn set(&self, guard: Option<Py<Guard>>) {
        *self.guard.lock() = guard;
    }
}

/// One decorated function: what does not change between calls, and the call itself (`run` for
/// a sync function; `begin` and `finish` around the await of an async one).
#[pyclass(frozen, module = "agent_sentinel._native")]
struct Wrapped {
    func: Py<PyAny>,
    action: Arc<str>,
    cost: f64,
    tags: Arc<[String]>,
    names: Vec<String>,
    defaults: Vec<(String, Py<PyAny>)>,
    slot: Py<GuardSlot>,
    /// Opens the guard when the slot is empty (and fills the slot).
    open_guard: Py<PyAny>,
    /// Where the context comes from: `task()` is this task's `(agent_id, run_id, session_id)` or
    /// `None`, then `module._process` is the process's (see `_context.py`).
    task_context: Py<PyAny>,
    context_module: Py<PyAny>,
    /// `protect(SentinelConfig(agent_id=...))`: the agent every call is made as.
    agent: Option<Arc<str>>,
    /// The last context object seen and its ids as shared strings: the same context (the
    /// process's, or one `with context(...)` block's) is copied once, not on every call.
    last_ids: Mutex<Option<SeenContext>>,
    /// `(args, kwargs, stop) -> result`: the rest of the call in Python, for a call that was
    /// stopped (`stop`) or that cannot take this path at all (`stop` is `None`).
    slow: Py<PyAny>,
}

#[pymethods]
impl Wrapped {
    #[new]
    #[expect(clippy::too_many_arguments, reason = "built once per decorated function")]
    fn new(
        func: Py<PyAny>,
        action: String,
        cost: f64,
        tags: Vec<String>,
        names: Vec<String>,
        defaults: Vec<(String, Py<PyAny>)>,
        slot: Py<GuardSlot>,
        open_guard: Py<PyAny>,
        task_context: Py<PyAny>,
        context_module: Py<PyAny>,
        agent: Option<String>,
        slow: Py<PyAny>,
    ) -> Self {
        Wrapped {
            func,
            action: Arc::from(action),
            cost,
            tags: Arc::from(tags),
            names,
            defaults,
            slot,
            open_guard,
            task_context,
            context_module,
            agent: agent.map(Arc::from),
            last_ids: Mutex::new(None),
            slow,
        }
    }

    /// Decides the call, runs it if allowed, settles and records it, and returns its result.
    /// The function's own exceptions propagate unchanged (recorded with outcome `error`).
    #[pyo3(signature = (args, kwargs=None))]
    fn run<'py>(
        &self,
        py: Python<'py>,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (guard, permit) = match self.decide(py, args, kwargs)? {
            Decided::Go(guard, permit) => (guard, permit),
            Decided::Python(stop) => return self.slow.bind(py).call1((args, kwargs, stop.map(|s| *s))),
        };
        let result = self.func.bind(py).call(args, kwargs);
        let outcome = match &result {
            Ok(r) => CallOutcome::Success(to_json(r, 0)),
            Err(e) => CallOutcome::Error(error_text(py, e)),
        };
        guard.get().inner.finish(*permit, outcome, None).map_err(ledger_error("cannot write the ledger"))?;
        result
    }

    /// The first half of a call made from Python (async functions): a `Permit` to run it (then
    /// pass it to `finish`), a `Stop`, or `None` when the call must take the Python path.
    #[pyo3(signature = (args, kwargs=None))]
    fn begin<'py>(
        &self,
        py: Python<'py>,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        match self.decide(py, args, kwargs)? {
            Decided::Go(guard, permit) => Ok(Bound::new(py, Permit::issued_by(permit, guard.unbind()))?.into_any()),
            Decided::Python(None) => Ok(py.None().into_bound(py)),
            Decided::Python(Some(stop)) => Ok(Bound::new(py, *stop)?.into_any()),
        }
    }

    /// The call `begin` permitted ran: `ok` and its result, or the error text.
    fn finish(&self, permit: &Bound<'_, Permit>, ok: bool, output: &Bound<'_, PyAny>) -> PyResult<()> {
        let p = permit.get();
        let (Some(guard), Some(inner)) = (p.guard.as_ref(), p.inner.lock().take()) else {
            return Err(PyRuntimeError::new_err("this permit was already finished"));
        };
        let outcome = if ok { CallOutcome::Success(to_json(output, 0)) } else { CallOutcome::Error(stringify(output)) };
        guard.get().inner.finish(*inner, outcome, None).map_err(ledger_error("cannot write the ledger"))?;
        Ok(())
    }
}

/// A context object and its `(agent_id, run_id, session_id)`.
type SeenContext = (Py<PyAny>, [Arc<str>; 3]);

/// What [`Wrapped::decide`] found.
enum Decided<'py> {
    /// Allowed: run it, then finish the permit on this guard.
    Go(Bound<'py, Guard>, Box<sentinel_core::Permit>),
    /// Python takes it from here: a stopped call, or (`None`) one that cannot take this path.
    Python(Option<Box<Stop>>),
}

impl Wrapped {
    fn decide<'py>(
        &self,
        py: Python<'py>,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Decided<'py>> {
        if SLOW_PATH.load(Ordering::Relaxed) > 0 {
            return Ok(Decided::Python(None));
        }
        let task = self.task_context.bind(py).call0()?;
        let ctx = if task.is_none() { self.context_module.bind(py).getattr(intern!(py, "_process"))? } else { task };
        let held = self.slot.get().guard.lock().as_ref().map(|g| g.clone_ref(py));
        let guard = match held {
            Some(g) => g.into_bound(py),
            None => self.open_guard.bind(py).call0()?.cast_into::<Guard>()?,
        };
        let [agent_id, run_id, session_id] = self.ids_of(&ctx)?;
        let (bound, inputs) = prepare(args, kwargs, &Params { names: &self.names, defaults: &self.defaults });
        let req = ActionRequest::new(&self.action)
            .agent(&agent_id)
            .run(&run_id)
            .session(&session_id)
            .cost(self.cost)
            .args(&bound)
            .tags(&self.tags);
        let parts = CallParts {
            action: Arc::clone(&self.action),
            agent_id: Arc::clone(&agent_id),
            run_id: Arc::clone(&run_id),
            session_id: Arc::clone(&session_id),
            cost: self.cost,
            tags: Arc::clone(&self.tags),
        };
        match guard.get().inner.begin_parts(&req, inputs, parts).map_err(ledger_error("cannot record the decision"))? {
            Begun::Proceed(p) => Ok(Decided::Go(guard, p)),
            // The Python side takes the context again (the same one: nothing ran in between).
            Begun::Stop { decision, intervention_id, inputs } => Ok(Decided::Python(Some(Box::new(Stop {
                decision,
                intervention_id,
                action: self.action.to_string(),
                inputs,
                args: bound,
            })))),
        }
    }

    /// `(agent_id, run_id, session_id)` of a context object, shared.
    fn ids_of(&self, ctx: &Bound<'_, PyAny>) -> PyResult<[Arc<str>; 3]> {
        let mut last = self.last_ids.lock();
        if let Some((seen, ids)) = last.as_ref()
            && seen.is(ctx)
        {
            return Ok(ids.clone());
        }
        let t = ctx.cast::<PyTuple>()?;
        let text = |i: usize| -> PyResult<Arc<str>> { Ok(Arc::from(t.get_item(i)?.cast::<PyString>()?.to_str()?)) };
        let agent = match &self.agent {
            Some(a) => Arc::clone(a),
            None => text(0)?,
        };
        let ids = [agent, text(1)?, text(2)?];
        *last = Some((ctx.clone().unbind(), ids.clone()));
        Ok(ids)
    }
}

/// How a raised exception is recorded: `TypeName: message`, as the Python path writes it.
fn error_text(py: Python<'_>, e: &PyErr) -> String {
    let kind = e.get_type(py).name().map(|n| n.to_string()).unwrap_or_default();
    let text = e.value(py).str().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    format!("{kind}: {text}")
}

/// Converts a Python value to the JSON the ledger records (for replay comparisons).
#[pyfunction]
fn to_record(py: Python<'_>, value: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
    let v = sentinel_core::redact::redacted(&to_json(value, 0));
    Ok(to_py(py, &v)?.unbind())
}

#[pymodule]
#[pyo3(name = "_native")]
fn agent_sentinel_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add_class::<Guard>()?;
    m.add_class::<Permit>()?;
    m.add_class::<Stop>()?;
    m.add_class::<GuardSlot>()?;
    m.add_class::<Wrapped>()?;
    m.add_function(wrap_pyfunction!(slow_path, m)?)?;
    m.add_function(wrap_pyfunction!(to_record, m)?)?;
    m.add_function(wrap_pyfunction!(flush_all, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
