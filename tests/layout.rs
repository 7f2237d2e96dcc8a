//! The code's shape, as README's "Layout" promises it: the module import graph
//! is a tree (no two modules import each other, directly or around a loop),
//! providers never import the top-level configuration, and every provider is
//! a folder with its section and its client.
//!
//! Read from the source text (`crate::module` paths and `use super::`), which
//! is how a reader follows an import too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/providers/pusher/mod.rs` → `["providers", "pusher"]`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts
}

/// Every `crate::a::b::...` path named in `text`, as its module segments.
fn crate_paths(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        let path: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':').collect();
        let segments: Vec<String> = path.split("::").filter(|s| !s.is_empty()).map(str::to_string).collect();
        out.push(segments);
    }
    out
}

/// Module graph at `depth` segments: `a -> b` when a file of `a` names `crate::b`.
fn graph(depth: usize) -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(&src, f)).collect();
    let top = |m: &[String]| m.iter().take(depth).cloned().collect::<Vec<_>>().join("::");
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let from = module_of(&src, file);
        let a = top(&from);
        let text = std::fs::read_to_string(file).unwrap();
        for path in crate_paths(&text) {
            // Keep the longest prefix that is a module (the rest are items).
            let Some(target) = (1..=path.len()).rev().map(|n| path[..n].to_vec()).find(|p| modules.contains(p)) else {
                continue;
            };
            let b = top(&target);
            let nested = b.starts_with(&format!("{a}::")) || a.starts_with(&format!("{b}::"));
            if a != b && !nested && !a.is_empty() {
                g.entry(a.clone()).or_default().insert(b);
            }
        }
    }
    g
}

/// A loop in `g`, if any, as the modules around it.
fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == n) {
            let mut cycle = path[at..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for next in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(next, g, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    g.keys().find_map(|n| visit(n, g, &mut Vec::new(), &mut done))
}

#[test]
fn modules_import_each_other_in_one_direction_only() {
    for depth in 1..=3 {
        let g = graph(depth);
        assert!(g.len() > 5, "the graph was read ({} modules)", g.len());
        if let Some(cycle) = find_cycle(&g) {
            panic!("module import loop at depth {depth}: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    assert!(find_cycle(&g).is_none());
    g.entry("c".into()).or_default().insert("a".into());
    assert_eq!(find_cycle(&g).unwrap(), ["a", "b", "c", "a"]);
}

#[test]
fn providers_never_import_the_configuration() {
    let g = graph(1);
    let from_providers = &g["providers"];
    assert!(!from_providers.contains("config"), "providers import config: {from_providers:?}");
    for forbidden in ["dispatch", "ledger", "routing", "source", "ingest", "app", "cli", "demo"] {
        assert!(!from_providers.contains(forbidden), "providers import {forbidden}");
    }
}

#[test]
fn the_relay_core_does_not_use_demo_code() {
    for (module, targets) in graph(1) {
        if !matches!(module.as_str(), "demo" | "cli") {
            assert!(!targets.contains("demo"), "{module} uses the demo module");
        }
    }
}

#[test]
fn every_provider_is_a_folder_with_its_section_and_client() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let table = std::fs::read_to_string(root.join("src/providers/mod.rs")).unwrap();
    let start = table.find("provider_table! {").expect("the provider table");
    let rows: Vec<&str> = table[start..].lines().skip(1).take_while(|l| l.trim() != "}").collect();
    assert!(rows.len() >= 10, "{rows:?}");
    for row in rows {
        // `Variant "name" field: path::to::module => Client(Config);`
        let module = row.split_once(": ").and_then(|(_, r)| r.split("=>").next()).unwrap().trim().replace("::", "/");
        let dir = root.join("src/providers").join(&module);
        for file in ["mod.rs", "config.rs"] {
            assert!(dir.join(file).is_file(), "{row}: {} is missing", dir.join(file).display());
        }
        let config = std::fs::read_to_string(dir.join("config.rs")).unwrap();
        assert!(config.contains("pub const PROFILE: Profile"), "{module}/config.rs defines its PROFILE");
    }
}

/// README's `[limits]` rows name every provider with its default, as the
/// provider's `PROFILE` sets it.
#[test]
fn the_readme_states_every_providers_default_limits() {
    use outbox_relay::providers::ProviderKind;
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let row = |key: &str| -> BTreeMap<String, String> {
        let line = readme.lines().find(|l| l.starts_with(&format!("| `limits.<provider>.{key}` |"))).unwrap();
        let cell = line.split('|').nth(2).unwrap();
        cell.split(',').filter_map(|p| p.trim().split_once(' ')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
    };
    let (concurrency, per_second) = (row("concurrency"), row("per_second"));
    for kind in ProviderKind::ALL {
        let limits = kind.profile().limits;
        let name = kind.as_str();
        assert_eq!(concurrency.get(name), Some(&limits.concurrency.to_string()), "README concurrency of {name}");
        match per_second.get(name) {
            Some(rate) => assert_eq!(rate, &format!("{}", limits.per_second), "README per_second of {name}"),
            None => assert_eq!(limits.per_second, 0.0, "README per_second of {name}: listed under `others`"),
        }
    }
}
