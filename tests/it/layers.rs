//! The crate's modules depend on one another one way only: each top-level
//! module of `src/` may use the modules of the layers below its own, never
//! one of its own layer or above. The layers are the table in `lib.rs`'s
//! map, so the map cannot drift from the code: this test reads that table
//! and every `crate::…` path in the code of `src/`, and fails on a use that
//! points up or sideways, which is also how a cycle would show.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The layers of `lib.rs`'s table (`//! | N | [`a`], [`b`] |`), as module
/// name → layer number.
fn layers(lib: &str) -> BTreeMap<String, usize> {
    let mut layers = BTreeMap::new();
    for line in lib.lines() {
        let Some(row) = line.strip_prefix("//! | ") else {
            continue;
        };
        let Some((number, modules)) = row.split_once(" | ") else {
            continue;
        };
        let Ok(layer) = number.parse::<usize>() else {
            continue;
        };
        for module in modules.trim_end_matches(" |").split(", ") {
            let name = module.trim_start_matches("[`").trim_end_matches("`]");
            layers.insert(name.to_owned(), layer);
        }
    }
    layers
}

/// The top-level module each `.rs` file under `src/` belongs to (`None` for
/// `lib.rs` and `main.rs`, which tie everything together).
fn module_of(root: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(root).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_owned())
}

fn rust_files(dir: &Path, found: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

/// Every top-level module named by a `crate::NAME` path in the code of
/// `text` (comments, doc links included, may point anywhere).
fn used_modules(text: &str) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    let code = text
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"));
    for line in code {
        for (at, _) in line.match_indices("crate::") {
            let rest = &line[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                used.insert(name);
            }
        }
    }
    used
}

#[test]
fn every_module_uses_only_the_layers_below_its_own() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let layer_of = layers(&std::fs::read_to_string(root.join("lib.rs")).expect("lib.rs"));
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let mut wrong = Vec::new();
    let mut seen = BTreeSet::new();
    for file in files {
        let Some(module) = module_of(&root, &file) else {
            continue;
        };
        let Some(&layer) = layer_of.get(module.as_str()) else {
            panic!("{module} (in {}) is in no layer of lib.rs", file.display());
        };
        seen.insert(module.clone());
        let text = std::fs::read_to_string(&file).expect("a source file");
        for used in used_modules(&text) {
            if used == module {
                continue;
            }
            match layer_of.get(used.as_str()) {
                Some(&used_layer) if used_layer < layer => {}
                Some(_) => wrong.push(format!("{} uses crate::{used}", file.display())),
                None => panic!("{} uses crate::{used}, in no layer", file.display()),
            }
        }
    }
    let listed: BTreeSet<String> = layer_of.keys().cloned().collect();
    assert_eq!(
        seen, listed,
        "lib.rs's table lists exactly the modules of src/"
    );
    assert!(
        wrong.is_empty(),
        "uses that point up or sideways:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_check_finds_a_use_and_its_module() {
    let text = "use crate::store::{Store};\nfn f() { crate::domain::Ts::now(); }\n$crate::x!()\n    /// [`y`](crate::y)";
    assert_eq!(
        used_modules(text),
        BTreeSet::from(["store".to_owned(), "domain".to_owned(), "x".to_owned()])
    );
    let root = Path::new("/r/src");
    assert_eq!(
        module_of(root, Path::new("/r/src/store/sql.rs")).as_deref(),
        Some("store")
    );
    assert_eq!(
        module_of(root, Path::new("/r/src/config.rs")).as_deref(),
        Some("config")
    );
    assert_eq!(module_of(root, Path::new("/r/src/lib.rs")), None);
    let table = "//! | layer | modules |\n//! |---|---|\n//! | 1 | [`config`], [`decode`] |\n//! | 0 | [`domain`] |";
    assert_eq!(
        layers(table),
        BTreeMap::from([
            ("config".to_owned(), 1),
            ("decode".to_owned(), 1),
            ("domain".to_owned(), 0)
        ])
    );
}
