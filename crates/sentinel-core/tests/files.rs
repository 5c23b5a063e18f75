#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! Policy files: every kind of bad input gets its own clear message (snapshotted as the user sees
//! it), the committed JSON Schema matches the types, and every example loads.

use std::path::{Path, PathBuf};

use sentinel_core::load::{load_file, parse_rules_json, parse_yaml};
use sentinel_core::{PolicyDoc, PolicySet};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn yaml_error(src: &str) -> String {
    match parse_yaml("policy.yaml", "policy", src) {
        Ok(docs) => match PolicySet::compile(docs) {
            Ok(_) => "accepted".to_string(),
            Err(e) => e.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"),
        },
        Err(e) => e.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"),
    }
}

fn json_error(src: &str) -> String {
    match parse_rules_json("rules.json", "rules", src) {
        Ok(_) => "accepted".to_string(),
        Err(e) => e.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"),
    }
}

macro_rules! bad {
    ($name:ident, yaml, $src:expr) => {
        #[test]
        fn $name() {
            insta::assert_snapshot!(stringify!($name), yaml_error($src));
        }
    };
    ($name:ident, json, $src:expr) => {
        #[test]
        fn $name() {
            insta::assert_snapshot!(stringify!($name), json_error($src));
        }
    };
}

bad!(unknown_top_level_key, yaml, "budjets:\n  session: 5\n");
bad!(unknown_nested_key, yaml, "budgets:\n  sesion: 5\n");
bad!(unknown_rule_key, yaml, "rules:\n  - id: a\n    function_patern: x\n    action: block\n");
bad!(
    unknown_operator,
    yaml,
    "rules:\n  - id: a\n    function_pattern: pay\n    conditions:\n      - { param: amount, operator: greater_than, value: 5 }\n    action: block\n"
);
bad!(unknown_rule_action, yaml, "rules:\n  - id: a\n    function_pattern: pay\n    action: deny\n");
bad!(
    invalid_regex,
    yaml,
    "rules:\n  - id: a\n    function_pattern: run\n    conditions:\n      - param: cmd\n        operator: matches\n        value: 'rm (-rf'\n    action: block\n"
);
bad!(invalid_glob, yaml, "rules:\n  - id: a\n    function_pattern: 'pay[_'\n    action: block\n");
bad!(negative_amount, yaml, "budgets:\n  run: -1.5\n");
bad!(nan_amount, yaml, "budgets:\n  actions:\n    llm: .nan\n");
bad!(amount_not_a_number, yaml, "budgets:\n  run: lots\n");
bad!(empty_file, yaml, "");
bad!(comments_only_file, yaml, "# just a comment\n---\n");
bad!(
    wrong_value_type_for_operator,
    yaml,
    "rules:\n  - id: a\n    function_pattern: pay\n    conditions:\n      - { param: amount, operator: gt, value: many }\n    action: block\n"
);
bad!(zero_rate_limit, yaml, "rate_limits:\n  search: { max_count: 0, window_seconds: 60 }\n");
bad!(negative_window, yaml, "rate_limits:\n  search: { max_count: 5, window_seconds: -1 }\n");
bad!(scope_agent_without_id, yaml, "policies:\n  - name: a\n    scope: agent\n    denied_actions: [x]\n");
bad!(
    duplicate_policy_names,
    yaml,
    "policies:\n  - name: a\n    denied_actions: [x]\n  - name: a\n    denied_actions: [y]\n"
);
bad!(duplicate_keys, yaml, "budgets:\n  run: 1\nbudgets:\n  run: 2\n");
bad!(
    duplicate_rule_ids,
    yaml,
    "rules:\n  - { id: a, function_pattern: x, action: block }\n  - { id: a, function_pattern: y, action: warn }\n"
);
bad!(contradictory_strict_mode, yaml, "strict_mode: false\nfail_mode: secure\n");
bad!(unknown_mode, yaml, "mode: shadw\ndenied_actions: [x]\n");
bad!(malformed_yaml, yaml, "budgets:\n  run: [1, 2\n");
bad!(json_unknown_key, json, r#"{"version": "1.0", "rulez": []}"#);
bad!(
    json_unknown_operator,
    json,
    r#"{"rules": [{"id": "a", "function_pattern": "x", "conditions": [{"param": "p", "operator": "greater", "value": 1}], "action": "block"}]}"#
);
bad!(json_missing_action, json, r#"{"rules": [{"id": "a", "function_pattern": "x"}]}"#);
bad!(json_syntax_error, json, "{\"rules\": [\n  {\"id\": \"a\",}\n]}");
bad!(json_unsupported_version, json, r#"{"version": "2.0", "rules": []}"#);

#[test]
fn schema_matches_the_types() {
    let generated = serde_json::to_string_pretty(&schemars::schema_for!(PolicyDoc)).unwrap() + "\n";
    let path = root().join("schema/policy.schema.json");
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "schema/policy.schema.json is out of date with the policy types; regenerate it with `UPDATE_SCHEMA=1 cargo test -p sentinel-core --test files schema`"
    );
}

#[test]
fn every_example_loads() {
    let mut seen = 0;
    let mut docs = Vec::new();
    for entry in std::fs::read_dir(root().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
        if !matches!(ext, "yaml" | "yml" | "json") {
            continue;
        }
        let d = load_file(&path).unwrap_or_else(|e| panic!("{}: {}", path.display(), e[0]));
        PolicySet::compile(d.clone()).unwrap_or_else(|e| panic!("{}: {}", path.display(), e[0]));
        docs.extend(d);
        seen += 1;
    }
    assert!(seen >= 3, "expected the example policies, found {seen}");
    PolicySet::compile(docs).expect("all examples load together");
}
