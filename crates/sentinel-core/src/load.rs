//! Reading policy files: YAML policies and JSON rules files, with errors that point at the span.

use std::fmt;
use std::path::Path;

use crate::model::{PolicyDoc, RulesFile};

/// One problem in one policy file, located to a line and column where possible.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyError {
    pub file: String,
    /// 1-based; 0 when the problem concerns the whole file.
    pub line: u64,
    /// 1-based; 0 when the problem concerns the whole file.
    pub column: u64,
    pub message: String,
    /// The offending source line, when known.
    pub source_line: Option<String>,
}

impl PolicyError {
    fn whole_file(file: &str, message: String) -> Self {
        PolicyError { file: file.to_string(), line: 0, column: 0, message, source_line: None }
    }

    fn at(file: &str, src: &str, line: u64, column: u64, message: String) -> Self {
        let source_line = usize::try_from(line)
            .ok()
            .and_then(|l| l.checked_sub(1))
            .and_then(|l| src.lines().nth(l))
            .map(str::to_string);
        PolicyError { file: file.to_string(), line, column, message, source_line }
    }

    /// `file:line:col` (or just `file`).
    pub fn location(&self) -> String {
        if self.line == 0 { self.file.clone() } else { format!("{}:{}:{}", self.file, self.line, self.column) }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location(), self.message)?;
        if let Some(src) = &self.source_line {
            let num = self.line.to_string();
            let pad = " ".repeat(num.len());
            let col = usize::try_from(self.column.saturating_sub(1)).unwrap_or(0);
            // Keep the caret under the right character even when the line has tabs.
            let lead: String = src.chars().take(col).map(|c| if c == '\t' { '\t' } else { ' ' }).collect();
            write!(f, "\n{pad} |\n{num} | {src}\n{pad} | {lead}^")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyError {}

/// Loads one policy file from disk: `.json` files use the rules-file format, anything else is YAML.
pub fn load_file(path: &Path) -> Result<Vec<PolicyDoc>, Vec<PolicyError>> {
    let display = path.display().to_string();
    let text = match std::fs::read(path) {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => {
                return Err(vec![PolicyError::whole_file(
                    &display,
                    format!("file is not valid UTF-8 (first bad byte at offset {})", e.utf8_error().valid_up_to()),
                )]);
            }
        },
        Err(e) => {
            return Err(vec![PolicyError::whole_file(&display, format!("cannot read file: {e}"))]);
        }
    };
    let is_json = path.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("json"));
    parse_source(&display, &text, is_json)
}

/// Parses policy text from `file` (a path or a label): the rules-file JSON format when `rules_json`,
/// YAML otherwise. The file's stem names a top-level policy that has no `name`.
pub fn parse_source(file: &str, text: &str, rules_json: bool) -> Result<Vec<PolicyDoc>, Vec<PolicyError>> {
    let stem = Path::new(file).file_stem().and_then(|s| s.to_str()).unwrap_or("policy");
    if rules_json { parse_rules_json(file, stem, text) } else { parse_yaml(file, stem, text) }
}

/// Largest policy file accepted, so a mistaken path to a huge file fails fast and clearly.
pub const MAX_POLICY_BYTES: usize = 16 * 1024 * 1024;

/// Parses a YAML policy document. `default_name` names the top-level policy when it has no `name`.
pub fn parse_yaml(file: &str, default_name: &str, src: &str) -> Result<Vec<PolicyDoc>, Vec<PolicyError>> {
    precheck(file, src)?;
    let doc: PolicyDoc = serde_saphyr::from_str(src).map_err(|e| {
        let raw = e.to_string();
        let first = raw.lines().next().unwrap_or_default();
        // serde-saphyr renders "error: line L column C: message"; keep only the message.
        let msg = first.strip_prefix("error: ").unwrap_or(first);
        let msg = match msg.split_once(": ") {
            Some((head, rest)) if head.starts_with("line ") && head.contains(" column ") => rest,
            _ => msg,
        };
        let msg = improve_message(msg);
        match e.location().map(|l| (l.line(), l.column())) {
            Some((line, col)) if line > 0 => vec![PolicyError::at(file, src, line, col, msg)],
            _ => match locate_hint(&msg, src) {
                Some(line) => vec![PolicyError::at(file, src, line, 1, msg)],
                None => vec![PolicyError::whole_file(file, msg)],
            },
        }
    })?;
    finish(file, default_name, src, doc)
}

/// Parses a rules file in the rules-and-approvals decorator's JSON format.
pub fn parse_rules_json(file: &str, default_name: &str, src: &str) -> Result<Vec<PolicyDoc>, Vec<PolicyError>> {
    precheck(file, src)?;
    let rf: RulesFile = serde_json::from_str(src).map_err(|e| {
        let msg = e.to_string();
        // serde_json appends " at line L column C"; we show the location separately.
        let msg = msg.rsplit_once(" at line ").map_or(msg.as_str(), |(m, _)| m);
        vec![PolicyError::at(file, src, e.line() as u64, e.column() as u64, improve_message(msg))]
    })?;
    if let Some(v) = &rf.version
        && v != "1.0"
        && v != "1"
    {
        return Err(vec![PolicyError::at(
            file,
            src,
            find_line(src, "\"version\"").unwrap_or(1),
            1,
            format!("unsupported rules file `version` `{v}`; expected `1.0`"),
        )]);
    }
    let doc = PolicyDoc {
        name: Some(default_name.to_string()),
        rules: rf.rules,
        default_action: rf.default_action,
        ..PolicyDoc::default()
    };
    Ok(vec![doc])
}

fn precheck(file: &str, src: &str) -> Result<(), Vec<PolicyError>> {
    if src.len() > MAX_POLICY_BYTES {
        return Err(vec![PolicyError::whole_file(
            file,
            format!("file is {} bytes; policy files are limited to {MAX_POLICY_BYTES} bytes", src.len()),
        )]);
    }
    let meaningful = src.lines().any(|l| {
        let t = l.trim();
        !t.is_empty() && !t.starts_with('#') && t != "---" && t != "..."
    });
    if !meaningful {
        return Err(vec![PolicyError::whole_file(
            file,
            "file is empty; expected a policy with keys such as `budgets`, `denied_actions`, `rules` or `policies`"
                .to_string(),
        )]);
    }
    Ok(())
}

fn finish(file: &str, default_name: &str, src: &str, mut doc: PolicyDoc) -> Result<Vec<PolicyDoc>, Vec<PolicyError>> {
    let children = std::mem::take(&mut doc.policies);
    let mut out = Vec::with_capacity(children.len() + 1);
    if doc.has_body() || children.is_empty() {
        if !doc.has_body() {
            return Err(vec![PolicyError::whole_file(
                file,
                "policy sets nothing: expected keys such as `budgets`, `denied_actions`, `rules` or `policies`"
                    .to_string(),
            )]);
        }
        if doc.name.is_none() {
            doc.name = Some(default_name.to_string());
        }
        out.push(doc);
    } else if doc.scope != crate::model::Scope::Global || doc.name.is_some() || doc.description.is_some() {
        return Err(vec![PolicyError::whole_file(
            file,
            "top-level `name`, `description` or `scope` given without any policy settings; put them inside a `policies` entry".to_string(),
        )]);
    }
    let mut errors = Vec::new();
    for (i, child) in children.into_iter().enumerate() {
        match &child.name {
            Some(n) if !n.trim().is_empty() => out.push(child),
            _ => errors.push(PolicyError::at(
                file,
                src,
                find_nth_line(src, "- ", i).unwrap_or(0),
                1,
                format!("`policies[{i}]` needs a `name`"),
            )),
        }
    }
    errors.extend(check_unique_names(file, src, &out));
    if errors.is_empty() { Ok(out) } else { Err(errors) }
}

/// Names must be unique across everything loaded together.
pub fn check_unique_names(file: &str, src: &str, docs: &[PolicyDoc]) -> Vec<PolicyError> {
    let mut seen = std::collections::HashSet::new();
    let mut errors = Vec::new();
    for d in docs {
        if let Some(n) = &d.name
            && !seen.insert(n.as_str())
        {
            let line = find_nth_line(src, &format!("name: {n}"), 1).unwrap_or(0);
            let e = if line == 0 {
                PolicyError::whole_file(file, format!("duplicate policy name `{n}`; names must be unique"))
            } else {
                PolicyError::at(file, src, line, 1, format!("duplicate policy name `{n}`; names must be unique"))
            };
            errors.push(e);
        }
    }
    errors
}

fn find_line(src: &str, needle: &str) -> Option<u64> {
    find_nth_line(src, needle, 0)
}

fn find_nth_line(src: &str, needle: &str, n: usize) -> Option<u64> {
    src.lines()
        .enumerate()
        .filter(|(_, l)| l.trim_start().starts_with(needle) || l.contains(needle))
        .nth(n)
        .map(|(i, _)| i as u64 + 1)
}

/// For checks that span a whole policy (and so carry no location), the line that the message's
/// first quoted name points at: the second occurrence for duplicates, else the first.
fn locate_hint(msg: &str, src: &str) -> Option<u64> {
    let token = msg.split('`').nth(1)?;
    let key = token.split(':').next().unwrap_or(token).trim();
    if key.is_empty() {
        return None;
    }
    if msg.starts_with("duplicate rule id") {
        let pat = format!("id: {key}");
        return src.lines().enumerate().filter(|(_, l)| l.contains(&pat)).nth(1).map(|(i, _)| i as u64 + 1);
    }
    src.lines().position(|l| l.contains(key)).map(|i| i as u64 + 1)
}

/// Rewrites serde's messages into ours: user input in backticks, and the nearest valid key suggested.
pub fn improve_message(msg: &str) -> String {
    for (prefix, noun) in [("unknown field `", "key"), ("unknown variant `", "value")] {
        let Some(rest) = msg.strip_prefix(prefix) else {
            continue;
        };
        let Some((found, tail)) = rest.split_once('`') else {
            continue;
        };
        // serde_json ends the list with where the key is; that stays at the end of the message.
        let (tail, at) = match tail.rfind(" at line ") {
            Some(i) => (tail.get(..i).unwrap_or(tail), tail.get(i..).unwrap_or_default()),
            None => (tail, ""),
        };
        let expected: Vec<String> = tail
            .trim_start_matches(',')
            .trim()
            .trim_start_matches("expected one of")
            .trim_start_matches("expected")
            .split(',')
            .map(|s| s.trim().trim_matches('`').to_string())
            .filter(|s| !s.is_empty() && s != "there are no fields")
            .collect();
        let mut out = format!("unknown {noun} `{found}`{at}");
        if !expected.is_empty() {
            let list: Vec<String> = expected.iter().map(|e| format!("`{e}`")).collect();
            out.push_str(&format!("; expected one of {}", list.join(", ")));
        }
        if let Some(best) = synonym(found, &expected).or_else(|| nearest(found, &expected)) {
            out.push_str(&format!("; did you mean `{best}`?"));
        }
        return out;
    }
    if let Some(rest) = msg.strip_prefix("duplicate mapping key: ") {
        let key = rest.split(',').next().unwrap_or(rest).trim();
        return format!("duplicate key `{key}`; each key may appear only once in a mapping");
    }
    if msg.starts_with("invalid floating point") {
        return "expected a number".to_string();
    }
    if msg.starts_with("invalid integer") {
        return "expected a whole number".to_string();
    }
    if let Some(field) = msg.strip_prefix("missing field `") {
        return format!("missing required key `{}", field);
    }
    msg.to_string()
}

/// Common spellings of operators and actions from other tools.
fn synonym<'a>(found: &str, expected: &'a [String]) -> Option<&'a str> {
    const SYNONYMS: &[(&[&str], &str)] = &[
        (&["greater", "greater_than", ">", "gt_"], "gt"),
        (&["greater_or_equal", "greater_than_or_equal", ">=", "ge"], "gte"),
        (&["less", "less_than", "<"], "lt"),
        (&["less_or_equal", "less_than_or_equal", "<=", "le"], "lte"),
        (&["equals", "equal", "==", "is"], "eq"),
        (&["not_equals", "not_equal", "!=", "neq"], "ne"),
        (&["regex", "match", "re"], "matches"),
        (&["startswith", "prefix"], "starts_with"),
        (&["endswith", "suffix"], "ends_with"),
        (&["deny", "reject", "forbid"], "block"),
        (&["approve", "approval", "require-approval", "ask"], "require_approval"),
        (&["permit"], "allow"),
    ];
    let lower = found.to_ascii_lowercase();
    SYNONYMS
        .iter()
        .find(|(names, _)| names.contains(&lower.as_str()))
        .and_then(|(_, target)| expected.iter().find(|e| e == target))
        .map(String::as_str)
}

/// The candidate closest to `found`, if it is close enough to be a plausible typo.
pub fn nearest<'a>(found: &str, candidates: &'a [String]) -> Option<&'a str> {
    let lower = found.to_ascii_lowercase();
    candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(&lower, &c.to_ascii_lowercase()), c))
        .filter(|(d, c)| *d <= (c.len().max(found.len()) / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_the_nearest_key() {
        assert_eq!(
            improve_message("unknown field `budjets`, expected one of budgets, rules"),
            "unknown key `budjets`; expected one of `budgets`, `rules`; did you mean `budgets`?"
        );
        assert_eq!(
            improve_message("unknown variant `greater`, expected one of `gt`, `gte`, `lt`"),
            "unknown value `greater`; expected one of `gt`, `gte`, `lt`; did you mean `gt`?"
        );
        // Where serde_json found the key stays with it, outside the list.
        assert_eq!(
            improve_message("unknown field `ledgr`, expected one of `stream`, `ledger` at line 1 column 8"),
            "unknown key `ledgr` at line 1 column 8; expected one of `stream`, `ledger`; did you mean `ledger`?"
        );
    }
}
