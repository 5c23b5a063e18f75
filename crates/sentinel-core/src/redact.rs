//! The one redaction function every record goes through before it is written or sent.

use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::Value;

pub const REDACTED: &str = "[REDACTED]";

/// Words that make a key name sensitive when they appear as a whole word of it
/// (`api_key`, `clientSecret`, `X-Auth-Token`), but not as part of another word (`max_tokens`, `author`).
const SENSITIVE_WORDS: &[&str] = &[
    "password",
    "passwd",
    "passphrase",
    "pwd",
    "secret",
    "token",
    "apikey",
    "auth",
    "authorization",
    "credential",
    "credentials",
    "cookie",
    "session",
    "ssn",
    "cvv",
    "cvc",
    "pin",
    "privatekey",
    "signature",
    "otp",
];

/// Pairs of adjacent words that are sensitive together.
const SENSITIVE_PAIRS: &[(&str, &str)] = &[
    ("api", "key"),
    ("private", "key"),
    ("secret", "key"),
    ("access", "key"),
    ("card", "number"),
    ("credit", "card"),
    ("account", "number"),
    ("routing", "number"),
    ("social", "security"),
];

/// A word of a key, lowercased into a small stack buffer (longer words are never sensitive).
#[derive(Clone, Copy)]
struct Word {
    buf: [u8; 16],
    len: usize,
}

impl Word {
    fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }
}

fn is_sensitive_word(w: &[u8]) -> bool {
    SENSITIVE_WORDS.iter().any(|s| s.as_bytes() == w)
}

fn is_sensitive_pair(a: &[u8], b: &[u8]) -> bool {
    SENSITIVE_PAIRS.iter().any(|(x, y)| x.as_bytes() == a && y.as_bytes() == b)
}

/// Is a key name one whose value must never be recorded? Words are split at `_`, `-`, `.`,
/// spaces and camelCase boundaries, and compared whole. No allocation.
pub fn is_sensitive_key(key: &str) -> bool {
    let mut prev: Option<Word> = None;
    let mut cur = Word { buf: [0; 16], len: 0 };
    let mut overflow = false;
    let mut prev_lower = false;
    let finish = |cur: &mut Word, overflow: &mut bool, prev: &mut Option<Word>| -> bool {
        let hit = if cur.len == 0 || *overflow {
            *prev = None;
            false
        } else {
            let w = cur.as_bytes();
            let hit = is_sensitive_word(w) || prev.is_some_and(|p| is_sensitive_pair(p.as_bytes(), w));
            *prev = Some(*cur);
            hit
        };
        cur.len = 0;
        *overflow = false;
        hit
    };
    for c in key.chars() {
        let alnum = c.is_alphanumeric();
        if (!alnum || (c.is_uppercase() && prev_lower))
            && (cur.len > 0 || overflow)
            && finish(&mut cur, &mut overflow, &mut prev)
        {
            return true;
        }
        if !alnum {
            prev_lower = false;
            continue;
        }
        prev_lower = c.is_lowercase() || c.is_ascii_digit();
        if c.is_ascii() && cur.len < cur.buf.len() {
            if let Some(slot) = cur.buf.get_mut(cur.len) {
                *slot = (c as u8).to_ascii_lowercase();
            }
            cur.len += 1;
        } else {
            overflow = true;
        }
    }
    (cur.len > 0 || overflow) && finish(&mut cur, &mut overflow, &mut prev)
}

/// Does a string look like a credential, whatever key it is under?
pub fn secret_kind(s: &str) -> Option<&'static str> {
    let t = s.trim();
    if t.len() < 8 {
        return None;
    }
    let prefixes: &[(&str, &str)] = &[
        ("sk-", "api-key"),
        ("sk_live_", "api-key"),
        ("sk_test_", "api-key"),
        ("rk_live_", "api-key"),
        ("xoxb-", "slack-token"),
        ("xoxp-", "slack-token"),
        ("xoxa-", "slack-token"),
        ("ghp_", "github-token"),
        ("gho_", "github-token"),
        ("ghs_", "github-token"),
        ("github_pat_", "github-token"),
        ("glpat-", "gitlab-token"),
        ("AKIA", "aws-access-key"),
        ("ASIA", "aws-access-key"),
        ("AIza", "google-api-key"),
        ("-----BEGIN", "private-key"),
        ("Bearer ", "bearer-token"),
        ("Basic ", "basic-auth"),
    ];
    for (p, kind) in prefixes {
        if t.starts_with(p) && t.len() >= p.len() + 8 {
            return Some(kind);
        }
    }
    if let Some(rest) = t.strip_prefix("as_")
        && rest.len() >= 32
        && rest.bytes().all(|b| b.is_ascii_hexdigit() || b == b'_')
    {
        return Some("sentinel-api-key");
    }
    // A JSON Web Token: three base64url parts, the first two starting `eyJ`.
    if t.starts_with("eyJ") && t.matches('.').count() == 2 && t.contains(".eyJ") {
        return Some("jwt");
    }
    // Credentials embedded in a URL: scheme://user:password@host
    if let Some((scheme, rest)) = t.split_once("://")
        && !scheme.is_empty()
        && let Some((userinfo, _)) = rest.split_once('@')
        && userinfo.contains(':')
        && !userinfo.contains('/')
    {
        return Some("url-credentials");
    }
    None
}

/// A JSON value that serializes redacted: values under sensitive keys become `[REDACTED]`, and
/// secret-shaped strings anywhere become `[REDACTED:<kind>]`. This is the one redaction
/// implementation; [`redact`] and [`redacted`] are built on it. Serializing through it copies nothing.
#[derive(Debug, Clone, Copy)]
pub struct Redacted<'a>(pub &'a Value);

/// Everything under a sensitive key is redacted, however deep (nulls stay null).
struct RedactAll<'a>(&'a Value);

impl Serialize for Redacted<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Object(m) => {
                let mut map = s.serialize_map(Some(m.len()))?;
                for (k, v) in m {
                    if is_sensitive_key(k) {
                        map.serialize_entry(k, &RedactAll(v))?;
                    } else {
                        map.serialize_entry(k, &Redacted(v))?;
                    }
                }
                map.end()
            }
            Value::Array(a) => {
                let mut seq = s.serialize_seq(Some(a.len()))?;
                for v in a {
                    seq.serialize_element(&Redacted(v))?;
                }
                seq.end()
            }
            Value::String(text) => {
                if let Some(kind) = secret_kind(text) {
                    s.serialize_str(&format!("[REDACTED:{kind}]"))
                } else if text.len() >= 16 && text.contains(char::is_whitespace) {
                    let mut c = text.clone();
                    if redact_tokens(&mut c) { s.serialize_str(&c) } else { s.serialize_str(text) }
                } else {
                    s.serialize_str(text)
                }
            }
            other => other.serialize(s),
        }
    }
}

impl Serialize for RedactAll<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Object(m) => {
                let mut map = s.serialize_map(Some(m.len()))?;
                for (k, v) in m {
                    map.serialize_entry(k, &RedactAll(v))?;
                }
                map.end()
            }
            Value::Array(a) => {
                let mut seq = s.serialize_seq(Some(a.len()))?;
                for v in a {
                    seq.serialize_element(&RedactAll(v))?;
                }
                seq.end()
            }
            Value::Null => s.serialize_unit(),
            _ => s.serialize_str(REDACTED),
        }
    }
}

/// Writes `"key":value` as [`Redacted`] writes a member of an object: everything under a
/// sensitive key redacted, secret-shaped strings anywhere else.
pub fn write_member(out: &mut Vec<u8>, key: &str, v: &Value) -> serde_json::Result<()> {
    serde_json::to_writer(&mut *out, key)?;
    out.push(b':');
    if is_sensitive_key(key) {
        serde_json::to_writer(out, &RedactAll(v))
    } else {
        serde_json::to_writer(out, &Redacted(v))
    }
}

/// A redacted copy.
pub fn redacted(v: &Value) -> Value {
    serde_json::to_value(Redacted(v)).unwrap_or(Value::Null)
}

/// Redacts in place.
pub fn redact(v: &mut Value) {
    *v = redacted(v);
}

fn trim(w: &str) -> &str {
    w.trim_matches(|c: char| matches!(c, '"' | '\'' | ',' | ';' | '(' | ')' | '<' | '>' | '[' | ']'))
}

/// Replaces secret-shaped words inside free text ("my key is sk-...").
fn redact_tokens(s: &mut String) -> bool {
    if !s.split_whitespace().any(|w| secret_kind(trim(w)).is_some()) {
        return false;
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s.as_str();
    while !rest.is_empty() {
        let ws_end = rest.find(|c: char| !c.is_whitespace()).unwrap_or(rest.len());
        let (ws, after) = rest.split_at(ws_end);
        out.push_str(ws);
        let word_end = after.find(char::is_whitespace).unwrap_or(after.len());
        let (word, tail) = after.split_at(word_end);
        let core = trim(word);
        match secret_kind(core) {
            Some(kind) => out.push_str(&word.replace(core, &format!("[REDACTED:{kind}]"))),
            None => out.push_str(word),
        }
        rest = tail;
    }
    *s = out;
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sensitive_keys_by_whole_word() {
        for k in [
            "password",
            "api_key",
            "apiKey",
            "X-Auth-Token",
            "client_secret",
            "access_token",
            "card_number",
            "Authorization",
        ] {
            assert!(is_sensitive_key(k), "{k}");
        }
        for k in ["max_tokens", "author", "query", "tokens_used", "keyboard", "passenger", "description"] {
            assert!(!is_sensitive_key(k), "{k}");
        }
    }

    #[test]
    fn redacts_nested_and_secret_shaped_values() {
        let mut v = json!({
            "query": "hello",
            "headers": {"Authorization": "Bearer abcdefghijklmnop"},
            "note": "key is sk-abcdefghijklmnopqrstuvwx",
            "key_in_value": "sk-abcdefghijklmnopqrstuvwx",
            "creds": {"password": {"nested": "x"}},
            "db": "postgres://admin:hunter22@db.internal/prod",
            "max_tokens": 100
        });
        redact(&mut v);
        assert_eq!(v["query"], "hello");
        assert_eq!(v["headers"]["Authorization"], REDACTED);
        assert_eq!(v["note"], "key is [REDACTED:api-key]");
        assert_eq!(v["key_in_value"], "[REDACTED:api-key]");
        assert_eq!(v["creds"]["password"]["nested"], REDACTED);
        assert_eq!(v["db"], "[REDACTED:url-credentials]");
        assert_eq!(v["max_tokens"], 100);
    }
}
