//! The module map in `src/lib.rs` against the code: every module is on the
//! map once, and each imports only modules listed below it, so the modules
//! form a stack with no cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The modules in the order the map lists them, top first.
fn map_order(lib: &str) -> Vec<String> {
    let doc: String = lib
        .lines()
        .take_while(|l| l.starts_with("//!"))
        .collect::<Vec<_>>()
        .join("\n");
    let section = doc
        .split("# Module map")
        .nth(1)
        .expect("src/lib.rs has a `# Module map` section");
    let mut order = Vec::new();
    let mut rest = section;
    while let Some(start) = rest.find("[`") {
        let after = &rest[start + 2..];
        let end = after.find("`]").expect("a closed [`module`] link");
        order.push(after[..end].to_owned());
        rest = &after[end..];
    }
    order
}

/// The `pub mod` declarations of `src/lib.rs`.
fn declared(lib: &str) -> BTreeSet<String> {
    lib.lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';').trim().to_owned())
        .collect()
}

/// The crate modules that `text` names: `crate::x` and `crate::{x, y::z}`.
fn imports(text: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut found = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let after = &text[i + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for item in group.split(',') {
                let name = ident(item.trim());
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        } else {
            found.insert(ident(after));
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable src/") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Which top-level module imports which, from the files under `src/`.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(src).expect("under src/");
        let first = rel.components().next().expect("a path");
        let module = first
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("readable source");
        let deps = graph.entry(module.clone()).or_default();
        deps.extend(imports(&text).into_iter().filter(|d| *d != module));
    }
    graph
}

#[test]
fn the_module_map_lists_every_module_once() {
    let lib = std::fs::read_to_string("src/lib.rs").expect("src/lib.rs");
    let order = map_order(&lib);
    let listed: BTreeSet<String> = order.iter().cloned().collect();
    assert_eq!(
        listed.len(),
        order.len(),
        "a module is listed twice in src/lib.rs's map: {order:?}"
    );
    assert_eq!(
        listed,
        declared(&lib),
        "src/lib.rs's module map and its `pub mod` lines differ"
    );
}

#[test]
fn every_module_imports_only_modules_below_it() {
    let lib = std::fs::read_to_string("src/lib.rs").expect("src/lib.rs");
    let order = map_order(&lib);
    let position = |m: &str| order.iter().position(|o| o == m);
    let mut upward = Vec::new();
    for (module, deps) in graph(Path::new("src")) {
        let at = position(&module)
            .unwrap_or_else(|| panic!("module `{module}` is not on src/lib.rs's map"));
        for dep in deps {
            match position(&dep) {
                Some(p) if p < at => upward.push(format!("{module} imports {dep}")),
                Some(_) => {}
                None => panic!("`{module}` names crate::{dep}, which is not on the map"),
            }
        }
    }
    assert!(
        upward.is_empty(),
        "modules importing modules listed above them in src/lib.rs's map: {upward:?}"
    );
}
