//! Typed experiment configs: defaults of a struct, overlaid by YAML files (with `base:`
//! inheritance, as in the official Swin/SimMIM `config.py` and mmpretrain `_base_`), then by
//! command-line `--set a.b.c=value` overrides.
//!
//! Unknown keys and wrong types are reported naming the file (or `--set`) that wrote the key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_yaml_ng::{Mapping, Value};

/// Defaults of T, overlaid by the YAML file (following its `base:` chain), then by each `--set`.
pub fn load<T: Serialize + DeserializeOwned + Default>(
    path: Option<&Path>,
    sets: &[String],
) -> Result<T> {
    load_with_presets(path, sets, &[])
}

/// A config section whose `preset: NAME` key is one more layer of the merge: the preset's values,
/// then the files, then `--set` (`model.preset: swinv2_tiny_window8_256` fills every model key
/// the user does not set). The section's type carries the `preset` key itself, so the written
/// config records which preset it came from.
pub struct PresetSection {
    /// Dotted path of the section, e.g. `model` or `distill.teacher_model`.
    pub path: &'static str,
    /// The preset layer for `name` (`None`: the section gave no `preset`), given the keys the user
    /// set in the section (a preset may adapt to them, e.g. per-stage lists to a new depth).
    pub expand: fn(name: Option<&str>, user: &Mapping) -> Result<Value>,
}

/// [`load`] with preset layers for the given sections. A section takes part only where the user's
/// YAML or `--set` writes it; the preset layer then replaces the section's defaults.
pub fn load_with_presets<T: Serialize + DeserializeOwned + Default>(
    path: Option<&Path>,
    sets: &[String],
    presets: &[PresetSection],
) -> Result<T> {
    let mut layered = Layered::default();
    if let Some(path) = path {
        let mut stack = Vec::new();
        layered.merge_file(path, &mut stack)?;
    }
    for set in sets {
        layered.merge_set(set)?;
    }

    let mut defaults =
        serde_yaml_ng::to_value(T::default()).context("serializing config defaults")?;
    for preset in presets {
        layered.apply_preset(preset, &mut defaults)?;
    }
    check_known_keys(&layered.value, &defaults, &mut Vec::new(), &layered.sources)?;

    let mut full = defaults;
    let user = std::mem::take(&mut layered.value);
    merge_value(&mut full, user, &mut Vec::new(), "", &mut HashMap::new());
    serde_path_to_error::deserialize::<_, T>(full).map_err(|e| {
        let keys = map_keys(e.path());
        let source = layered.source_of(&keys).unwrap_or("config");
        anyhow!("{source}: key `{}`: {}", e.path(), e.inner())
    })
}

/// The resolved config as YAML text (what runs write to RUN_DIR/config.yaml; loading it again
/// gives the same T). Floats are written so that YAML 1.1 readers (PyYAML, which the official
/// Swin and SimMIM code use) read them as floats too: `1.0e-6`, never `1e-6` (a string there).
pub fn to_yaml<T: Serialize>(cfg: &T) -> Result<String> {
    // Through text and back, so each float holds the value its shortest spelling reads back as
    // (an f32 field's 0.485 stays 0.485, not 0.48500001430511475).
    let text = serde_yaml_ng::to_string(cfg).context("serializing config to YAML")?;
    let mut value: Value = serde_yaml_ng::from_str(&text).context("re-reading config YAML")?;
    // Each float becomes a marker string that the emitter writes plain; the markers are then
    // replaced by the float's YAML 1.1 spelling. The marker is one that no string of the config
    // contains.
    let mut mark = String::from("mimlab-float-");
    while any_string_contains(&value, &mark) {
        mark.push('x');
    }
    let mut floats = Vec::new();
    mark_floats(&mut value, &mark, &mut floats);
    let text = serde_yaml_ng::to_string(&value).context("serializing config to YAML")?;
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(at) = rest.find(&mark) {
        out.push_str(&rest[..at]);
        let tail = &rest[at + mark.len()..];
        let end = tail
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(tail.len());
        let i: usize = tail[..end].parse().context("float marker")?;
        out.push_str(&yaml11_float(floats[i])?);
        rest = &tail[end..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Whether a string (map keys included) anywhere in `v` contains `s`.
fn any_string_contains(v: &Value, s: &str) -> bool {
    match v {
        Value::String(t) => t.contains(s),
        Value::Sequence(seq) => seq.iter().any(|x| any_string_contains(x, s)),
        Value::Mapping(map) => map
            .iter()
            .any(|(k, x)| any_string_contains(k, s) || any_string_contains(x, s)),
        Value::Tagged(t) => any_string_contains(&t.value, s),
        _ => false,
    }
}

/// Replaces every float of `v` by `<mark><index into floats>`.
fn mark_floats(v: &mut Value, mark: &str, floats: &mut Vec<f64>) {
    match v {
        Value::Number(n) if n.is_f64() => {
            floats.push(n.as_f64().unwrap_or(f64::NAN));
            *v = Value::String(format!("{mark}{}", floats.len() - 1));
        }
        Value::Sequence(seq) => seq.iter_mut().for_each(|x| mark_floats(x, mark, floats)),
        Value::Mapping(map) => map.values_mut().for_each(|x| mark_floats(x, mark, floats)),
        Value::Tagged(t) => mark_floats(&mut t.value, mark, floats),
        _ => {}
    }
}

/// `x` as a YAML 1.1 float (PyYAML's resolver: a `.` in the mantissa and a signed exponent):
/// serde_yaml_ng's shortest round-trip text with `1e-6` -> `1.0e-6`, `1e20` -> `1.0e+20`.
fn yaml11_float(x: f64) -> Result<String> {
    let text = serde_yaml_ng::to_string(&x).context("serializing a float")?;
    let text = text.trim_end();
    let Some(e) = text.find(['e', 'E']) else {
        return Ok(text.to_string()); // 0.001, 4.0, .inf, .nan: already YAML 1.1 floats
    };
    let (mantissa, exponent) = (&text[..e], &text[e + 1..]);
    let dot = if mantissa.contains('.') { "" } else { ".0" };
    let sign = if exponent.starts_with(['-', '+']) {
        ""
    } else {
        "+"
    };
    Ok(format!("{mantissa}{dot}e{sign}{exponent}"))
}

/// The user's merged YAML plus, for each dotted key path it set, the file or `--set` that set it.
#[derive(Default)]
struct Layered {
    value: Value,
    sources: HashMap<String, String>,
}

impl Layered {
    /// Merges `path` (its bases first, then itself); `stack` holds the files being included.
    fn merge_file(&mut self, path: &Path, stack: &mut Vec<PathBuf>) -> Result<()> {
        let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        if let Some(first) = stack.iter().position(|p| *p == canonical) {
            let chain: Vec<String> = stack[first..]
                .iter()
                .chain(std::iter::once(&canonical))
                .map(|p| p.display().to_string())
                .collect();
            bail!("{}: base cycle: {}", path.display(), chain.join(" -> "));
        }
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).with_context(|| format!("{name}: cannot read"))?;
        if let Some(line) = too_deep(&text) {
            bail!("{name}: line {line}: nesting deeper than {MAX_DEPTH} levels");
        }
        let mut value: Value =
            serde_yaml_ng::from_str(&text).map_err(|e| anyhow!("{name}: YAML error: {e}"))?;
        if value.is_null() {
            value = Value::Mapping(Mapping::new());
        }
        let Value::Mapping(mut map) = value else {
            bail!("{name}: top level must be a mapping of config sections");
        };
        let bases = match map.remove("base") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s],
            Some(Value::Sequence(seq)) => seq
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    other => Err(anyhow!(
                        "{name}: `base` entries must be file names, got {other:?}"
                    )),
                })
                .collect::<Result<_>>()?,
            Some(other) => bail!("{name}: `base` must be a file name or a list, got {other:?}"),
        };
        stack.push(canonical);
        let dir = path.parent().unwrap_or(Path::new(""));
        for base in bases {
            let base_path = dir.join(&base);
            if let Err(e) = std::fs::metadata(&base_path) {
                bail!(
                    "{name}: base `{base}`: cannot read {}: {e}",
                    base_path.display()
                );
            }
            self.merge_file(&base_path, stack)?;
        }
        stack.pop();
        merge_value(
            &mut self.value,
            Value::Mapping(map),
            &mut Vec::new(),
            &name,
            &mut self.sources,
        );
        Ok(())
    }

    /// Merges one `a.b.c=value` override, the value parsed as YAML.
    fn merge_set(&mut self, set: &str) -> Result<()> {
        let Some((key, text)) = set.split_once('=') else {
            bail!("--set {set}: expected `key.path=value`");
        };
        let key = key.trim();
        if key.is_empty() || key.split('.').any(str::is_empty) {
            bail!("--set {set}: empty key segment in `{key}`");
        }
        if too_deep(text).is_some() {
            bail!("--set {key}: value nested deeper than {MAX_DEPTH} levels");
        }
        let value: Value = serde_yaml_ng::from_str(text)
            .map_err(|e| anyhow!("--set {set}: bad YAML value: {e}"))?;
        let nested = key.rsplit('.').fold(value, |inner, k| {
            let mut m = Mapping::new();
            m.insert(Value::String(k.to_string()), inner);
            Value::Mapping(m)
        });
        let source = format!("--set {set}");
        merge_value(
            &mut self.value,
            nested,
            &mut Vec::new(),
            &source,
            &mut self.sources,
        );
        Ok(())
    }

    /// Expands `preset`'s section of the user's YAML into a layer that replaces the section's
    /// entry in `defaults`. A missing or null section is left alone.
    fn apply_preset(&self, preset: &PresetSection, defaults: &mut Value) -> Result<()> {
        let keys: Vec<&str> = preset.path.split('.').collect();
        let mut user = &self.value;
        for k in &keys {
            match user.get(*k) {
                Some(v) => user = v,
                None => return Ok(()),
            }
        }
        let Value::Mapping(section) = user else {
            return Ok(()); // null (an Option left unset) or a wrong type that serde reports
        };
        let source = |key: &str| {
            let full: Vec<String> = keys
                .iter()
                .map(|k| k.to_string())
                .chain([key.into()])
                .collect();
            self.source_of(&full).unwrap_or("config").to_string()
        };
        let name = match section.get("preset") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.as_str()),
            Some(other) => bail!(
                "{}: key `{}.preset`: expected a preset name, got {other:?}",
                source("preset"),
                preset.path
            ),
        };
        let layer = (preset.expand)(name, section)
            .map_err(|e| anyhow!("{}: key `{}.preset`: {e:#}", source("preset"), preset.path))?;
        let mut slot = defaults;
        for k in &keys {
            if !slot.is_mapping() {
                *slot = Value::Mapping(Mapping::new());
            }
            let Value::Mapping(map) = slot else {
                unreachable!("slot was made a mapping just above");
            };
            slot = map
                .entry(Value::String(k.to_string()))
                .or_insert(Value::Null);
        }
        *slot = layer;
        Ok(())
    }

    /// The source of the longest recorded prefix of `keys`.
    fn source_of(&self, keys: &[String]) -> Option<&str> {
        (1..=keys.len())
            .rev()
            .find_map(|n| self.sources.get(&keys[..n].join(".")))
            .map(String::as_str)
    }
}

/// The deepest `[`/`{` nesting a config may have. Configs nest 3 or 4 levels; the YAML parser
/// took 39 s to fail on 100k nested brackets, so deeper text is refused before parsing.
const MAX_DEPTH: usize = 64;

/// The line (1-based) where YAML `text`'s flow collections (`[`, `{`) nest deeper than
/// [`MAX_DEPTH`], if they do. Quoted scalars and comments are skipped.
fn too_deep(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    let mut line = 1;
    let mut prev = '\n';
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        let token_start = prev.is_whitespace() || "[{,:".contains(prev);
        match c {
            '\n' => line += 1,
            '[' | '{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Some(line);
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            '#' if prev.is_whitespace() => {
                // A comment runs to the end of the line.
                if chars.by_ref().any(|c| c == '\n') {
                    line += 1;
                }
                prev = '\n';
                continue;
            }
            '"' | '\'' if token_start => {
                // A quoted scalar runs to its closing quote (`\"` stays inside).
                let mut escaped = false;
                for q in chars.by_ref() {
                    if q == '\n' {
                        line += 1;
                    }
                    if escaped {
                        escaped = false;
                    } else if c == '"' && q == '\\' {
                        escaped = true;
                    } else if q == c {
                        break;
                    }
                }
            }
            _ => {}
        }
        prev = c;
    }
    None
}

/// Deep merge of `src` into `dst`: maps merge recursively, lists and scalars replace. Each key
/// `src` writes is recorded in `sources` as coming from `source`.
fn merge_value(
    dst: &mut Value,
    src: Value,
    path: &mut Vec<String>,
    source: &str,
    sources: &mut HashMap<String, String>,
) {
    let Value::Mapping(src_map) = src else {
        *dst = src;
        return;
    };
    if !dst.is_mapping() {
        *dst = Value::Mapping(Mapping::new());
    }
    let Value::Mapping(dst_map) = dst else {
        unreachable!("dst was made a mapping just above");
    };
    for (k, v) in src_map {
        path.push(key_text(&k));
        let dotted = path.join(".");
        match dst_map.get_mut(&k) {
            Some(existing) if existing.is_mapping() && v.is_mapping() => {
                sources.entry(dotted).or_insert_with(|| source.to_string());
                merge_value(existing, v, path, source, sources);
            }
            existing => {
                // Forget sources of keys below this one: they were replaced wholesale. Only a
                // mapping has keys below it (pruning on every key made the merge quadratic).
                if existing.is_some_and(|e| e.is_mapping()) {
                    let below = format!("{dotted}.");
                    sources.retain(|p, _| !p.starts_with(&below));
                }
                sources.insert(dotted, source.to_string());
                dst_map.insert(k, v);
            }
        }
        path.pop();
    }
}

/// Walks the user's YAML against the defaults' YAML: every user key must exist at its level.
/// A null default (an `Option` field) or an empty default map (a free-form map) accepts anything.
fn check_known_keys(
    user: &Value,
    defaults: &Value,
    path: &mut Vec<String>,
    sources: &HashMap<String, String>,
) -> Result<()> {
    let (Value::Mapping(user_map), Value::Mapping(default_map)) = (user, defaults) else {
        return Ok(());
    };
    if default_map.is_empty() {
        return Ok(());
    }
    for (k, v) in user_map {
        path.push(key_text(k));
        match default_map.get(k) {
            Some(d) => check_known_keys(v, d, path, sources)?,
            None => {
                let dotted = path.join(".");
                let source = (1..=path.len())
                    .rev()
                    .find_map(|n| sources.get(&path[..n].join(".")))
                    .map_or("config", String::as_str);
                let candidates: Vec<String> = default_map.keys().map(key_text).collect();
                let hint = closest(&key_text(k), &candidates)
                    .map(|c| {
                        let prefix = &path[..path.len() - 1];
                        let full = prefix.iter().chain(std::iter::once(&c)).cloned();
                        format!(" (did you mean `{}`?)", full.collect::<Vec<_>>().join("."))
                    })
                    .unwrap_or_default();
                bail!("{source}: unknown key `{dotted}`{hint}");
            }
        }
        path.pop();
    }
    Ok(())
}

/// The candidate nearest to `key` by Damerau-Levenshtein distance, if it is close: at most 2
/// edits (or a third of the key's length) and not a complete rewrite.
fn closest(key: &str, candidates: &[String]) -> Option<String> {
    candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(key, c), c))
        .filter(|(d, c)| *d <= (key.len() / 3).max(2) && *d < key.len().max(c.len()))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.clone())
}

/// A YAML map key as text (keys are normally strings; numbers and bools are printed).
fn key_text(k: &Value) -> String {
    match k {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => format!("{other:?}"),
    }
}

/// The map keys of a serde path, up to the first sequence index.
fn map_keys(path: &serde_path_to_error::Path) -> Vec<String> {
    use serde_path_to_error::Segment;
    path.iter()
        .map_while(|s| match s {
            Segment::Map { key } => Some(key.clone()),
            Segment::Enum { variant } => Some(variant.clone()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Model {
        name: String,
        depths: Vec<usize>,
        drop_path: f64,
        pretrained: Option<String>,
    }
    impl Default for Model {
        fn default() -> Self {
            Self {
                name: "swinv2_tiny".into(),
                depths: vec![2, 2, 6, 2],
                drop_path: 0.1,
                pretrained: None,
            }
        }
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Train {
        lr: f64,
        epochs: usize,
        warmup: Warmup,
    }
    impl Default for Train {
        fn default() -> Self {
            Self {
                lr: 1e-3,
                epochs: 10,
                warmup: Warmup::default(),
            }
        }
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Warmup {
        epochs: usize,
        start_lr: f64,
    }
    impl Default for Warmup {
        fn default() -> Self {
            Self {
                epochs: 1,
                start_lr: 1e-6,
            }
        }
    }

    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Cfg {
        model: Model,
        train: Train,
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    fn sets(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn defaults_without_file() {
        let cfg: Cfg = load(None, &[]).unwrap();
        assert_eq!(cfg, Cfg::default());
    }

    #[test]
    fn file_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "x.yaml",
            "train:\n  lr: 5.0e-4\n  warmup:\n    epochs: 3\n",
        );
        let cfg: Cfg = load(Some(&p), &[]).unwrap();
        assert_eq!(cfg.train.lr, 5e-4);
        assert_eq!(cfg.train.warmup.epochs, 3);
        assert_eq!(cfg.train.warmup.start_lr, 1e-6); // sibling default kept by deep merge
        assert_eq!(cfg.train.epochs, 10);
        assert_eq!(cfg.model, Model::default());
    }

    #[test]
    fn base_chain_two_levels_child_wins() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "base/root.yaml",
            "model:\n  name: root\n  drop_path: 0.3\ntrain:\n  epochs: 100\n",
        );
        write(
            dir.path(),
            "base/mid.yaml",
            "base: root.yaml\nmodel:\n  name: mid\n  depths: [1, 1]\n",
        );
        let p = write(
            dir.path(),
            "exp/child.yaml",
            "base: ../base/mid.yaml\nmodel:\n  name: child\n",
        );
        let cfg: Cfg = load(Some(&p), &[]).unwrap();
        assert_eq!(cfg.model.name, "child");
        assert_eq!(cfg.model.depths, vec![1, 1]);
        assert_eq!(cfg.model.drop_path, 0.3);
        assert_eq!(cfg.train.epochs, 100);
        assert_eq!(cfg.train.lr, 1e-3);
    }

    #[test]
    fn base_list_later_wins() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", "train:\n  lr: 1.0\n  epochs: 7\n");
        write(dir.path(), "b.yaml", "train:\n  lr: 2.0\n");
        let p = write(dir.path(), "c.yaml", "base: [a.yaml, b.yaml]\n");
        let cfg: Cfg = load(Some(&p), &[]).unwrap();
        assert_eq!((cfg.train.lr, cfg.train.epochs), (2.0, 7));
    }

    #[test]
    fn base_cycle_is_an_error_naming_files() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", "base: b.yaml\n");
        let b = write(dir.path(), "b.yaml", "base: a.yaml\n");
        let err = load::<Cfg>(Some(&b), &[]).unwrap_err().to_string();
        assert!(err.contains("base cycle"), "{err}");
        assert!(
            err.contains("a.yaml -> ") && err.contains("b.yaml"),
            "{err}"
        );
    }

    #[test]
    fn set_scalar_list_nested_and_string() {
        let s = sets(&[
            "train.lr=1e-3",
            "model.depths=[2,2,2]",
            "train.warmup.epochs=5",
            "model.name=foo",
        ]);
        let cfg: Cfg = load(None, &s).unwrap();
        assert_eq!(cfg.train.lr, 1e-3);
        assert_eq!(cfg.model.depths, vec![2, 2, 2]);
        assert_eq!(cfg.train.warmup.epochs, 5);
        assert_eq!(cfg.model.name, "foo");
        let cfg: Cfg = load(None, &sets(&["model.pretrained=ckpt.safetensors"])).unwrap();
        assert_eq!(cfg.model.pretrained.as_deref(), Some("ckpt.safetensors"));
    }

    #[test]
    fn set_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "x.yaml", "train:\n  lr: 0.5\n");
        let cfg: Cfg = load(Some(&p), &sets(&["train.lr=0.25"])).unwrap();
        assert_eq!(cfg.train.lr, 0.25);
    }

    #[test]
    fn malformed_set_is_quoted() {
        let err = load::<Cfg>(None, &sets(&["train.lr"]))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "--set train.lr: expected `key.path=value`");
    }

    #[test]
    fn unknown_key_from_file_with_hint() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "base.yaml", "train:\n  lrr: 0.1\n");
        let p = write(dir.path(), "x.yaml", "base: base.yaml\nmodel:\n  name: a\n");
        let err = load::<Cfg>(Some(&p), &[]).unwrap_err().to_string();
        let base = dir.path().join("base.yaml");
        assert_eq!(
            err,
            format!(
                "{}: unknown key `train.lrr` (did you mean `train.lr`?)",
                base.display()
            )
        );
    }

    #[test]
    fn a_missing_base_names_the_file_that_includes_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "x.yaml",
            "base: nope.yaml
",
        );
        let err = format!("{:#}", load::<Cfg>(Some(&p), &[]).unwrap_err());
        assert_eq!(
            err,
            format!(
                "{}: base `nope.yaml`: cannot read {}: No such file or directory (os error 2)",
                p.display(),
                dir.path().join("nope.yaml").display()
            )
        );
    }

    #[test]
    fn many_keys_merge_and_the_first_unknown_one_is_named() {
        // 100k keys: the merge pruned the key sources once per key over all of them (quadratic:
        // 13.6 s before it got to this error).
        let dir = tempfile::tempdir().unwrap();
        let text: String = (0..100_000).map(|i| format!("k{i}: {i}\n")).collect();
        let p = write(dir.path(), "x.yaml", &text);
        let err = load::<Cfg>(Some(&p), &[]).unwrap_err().to_string();
        assert_eq!(err, format!("{}: unknown key `k0`", p.display()));
    }

    #[test]
    fn deep_nesting_is_rejected_before_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("model:\n  depths: {}\n", "[".repeat(100_000));
        let p = write(dir.path(), "x.yaml", &text);
        let err = load::<Cfg>(Some(&p), &[]).unwrap_err().to_string();
        assert_eq!(
            err,
            format!("{}: line 2: nesting deeper than 64 levels", p.display())
        );
        let set = format!("train.lr={}", "[".repeat(100_000));
        let err = load::<Cfg>(None, &[set]).unwrap_err().to_string();
        assert_eq!(err, "--set train.lr: value nested deeper than 64 levels");
        // Brackets in quoted strings and comments do not count.
        let quoted = format!("model:\n  name: \"{0}\" # {0}\n", "[".repeat(100));
        let p = write(dir.path(), "q.yaml", &quoted);
        assert_eq!(
            load::<Cfg>(Some(&p), &[]).unwrap().model.name,
            "[".repeat(100)
        );
        // 64 levels still parse (then serde names the wrong type).
        let ok = format!("model:\n  name: {}{}\n", "[".repeat(63), "]".repeat(63));
        let p = write(dir.path(), "y.yaml", &ok);
        let err = load::<Cfg>(Some(&p), &[]).unwrap_err().to_string();
        assert!(err.contains("key `model.name`"), "{err}");
    }

    #[test]
    fn unknown_key_without_close_match_has_no_hint() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "x.yaml", "optimizer:\n  kind: sgd\n");
        let err = load::<Cfg>(Some(&p), &[]).unwrap_err().to_string();
        assert_eq!(err, format!("{}: unknown key `optimizer`", p.display()));
    }

    #[test]
    fn unknown_key_from_set_names_the_set() {
        let err = load::<Cfg>(None, &sets(&["train.warmup.epoch=3"]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "--set train.warmup.epoch=3: unknown key `train.warmup.epoch` \
             (did you mean `train.warmup.epochs`?)"
        );
    }

    #[test]
    fn option_field_accepts_any_value_then_serde_checks_type() {
        let err = load::<Cfg>(None, &sets(&["model.pretrained=[1,2]"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("--set model.pretrained=[1,2]: key `model.pretrained`: "),
            "{err}"
        );
    }

    #[test]
    fn wrong_type_names_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "x.yaml", "train:\n  lr: abc\n");
        let err = load::<Cfg>(Some(&p), &[]).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "{}: key `train.lr`: invalid type: string \"abc\", expected f64",
                p.display()
            )
        );
        let err = load::<Cfg>(None, &sets(&["train.epochs=-3"]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "--set train.epochs=-3: key `train.epochs`: invalid value: integer `-3`, expected usize"
        );
    }

    #[test]
    fn yaml_syntax_error_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "x.yaml",
            "train:\n  lr: [1,\n  epochs: 3\n:::\n",
        );
        let err = load::<Cfg>(Some(&p), &[]).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}: YAML error: ", p.display())),
            "{err}"
        );
        assert!(err.contains("line"), "{err}");
        let missing = dir.path().join("missing.yaml");
        let err = load::<Cfg>(Some(&missing), &[]).unwrap_err().to_string();
        assert_eq!(err, format!("{}: cannot read", missing.display()));
    }

    #[test]
    fn to_yaml_then_load_round_trips() {
        let s = sets(&[
            "train.lr=3.0e-5",
            "model.depths=[1,2,3]",
            "model.pretrained=x.st",
            "train.warmup.start_lr=1e-9",
        ]);
        let cfg: Cfg = load(None, &s).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "config.yaml", &to_yaml(&cfg).unwrap());
        let again: Cfg = load(Some(&p), &[]).unwrap();
        assert_eq!(again, cfg);
    }

    /// A YAML 1.1 float as PyYAML's resolver matches it (a `.` and a signed exponent), or the
    /// special values.
    fn is_yaml11_float(t: &str) -> bool {
        let t = t.strip_prefix(['-', '+']).unwrap_or(t);
        if matches!(t, ".inf" | ".nan") {
            return true;
        }
        let (m, e) = match t.find(['e', 'E']) {
            Some(i) => (&t[..i], Some(&t[i + 1..])),
            None => (t, None),
        };
        let digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
        let mantissa_ok = m
            .split_once('.')
            .is_some_and(|(a, b)| !(a.is_empty() && b.is_empty()) && digits(a) && digits(b));
        let exponent_ok =
            e.is_none_or(|e| e.len() > 1 && e.starts_with(['-', '+']) && digits(&e[1..]));
        mantissa_ok && exponent_ok
    }

    #[test]
    fn to_yaml_writes_floats_that_yaml_1_1_reads_as_floats() {
        let s = sets(&[
            "train.lr=1e-6",
            "model.drop_path=1e20",
            "train.warmup.start_lr=0.00001",
        ]);
        let cfg: Cfg = load(None, &s).unwrap();
        let yaml = to_yaml(&cfg).unwrap();
        assert!(yaml.contains("  lr: 1.0e-6\n"), "{yaml}");
        assert!(yaml.contains("  drop_path: 1.0e+20\n"), "{yaml}");
        assert!(yaml.contains("    start_lr: 0.00001\n"), "{yaml}");
        for (x, want) in [
            (1e-6, "1.0e-6"),
            (2.5e-7, "2.5e-7"),
            (1e20, "1.0e+20"),
            (0.001, "0.001"),
            (4.0, "4.0"),
            (-3e-300, "-3.0e-300"),
            (f64::INFINITY, ".inf"),
            (f64::NEG_INFINITY, "-.inf"),
        ] {
            let t = yaml11_float(x).unwrap();
            assert_eq!(t, want);
            assert!(is_yaml11_float(&t), "{t}");
            assert_eq!(serde_yaml_ng::from_str::<f64>(&t).unwrap(), x, "{t}");
        }
        assert_eq!(yaml11_float(f64::NAN).unwrap(), ".nan");
        // f32 fields keep their short spelling
        #[derive(Serialize)]
        struct Norm {
            mean: Vec<f32>,
            eps: f32,
        }
        let norm = Norm {
            mean: vec![0.485, 0.456],
            eps: 1e-6,
        };
        assert_eq!(
            to_yaml(&norm).unwrap(),
            "mean:\n- 0.485\n- 0.456\neps: 1.0e-6\n"
        );
        assert!(!is_yaml11_float("1e-6") && !is_yaml11_float("1.0e6"));
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "config.yaml", &yaml);
        assert_eq!(load::<Cfg>(Some(&p), &[]).unwrap(), cfg);
    }

    #[test]
    fn a_string_that_looks_like_the_float_marker_stays_a_string() {
        let cfg: Cfg = load(None, &sets(&["model.name=mimlab-float-0"])).unwrap();
        let yaml = to_yaml(&cfg).unwrap();
        let back: Cfg = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(back.model.name, "mimlab-float-0");
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Net {
        preset: Option<String>,
        width: usize,
        depths: Vec<usize>,
        windows: Vec<usize>,
    }
    impl Default for Net {
        fn default() -> Self {
            Self {
                preset: Some("small".into()),
                width: 8,
                depths: vec![1, 1],
                windows: vec![0, 0],
            }
        }
    }
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct WithNet {
        net: Net,
        teacher: Option<Net>,
        train: Train,
    }

    fn net_preset(name: Option<&str>, user: &Mapping) -> Result<Value> {
        let mut net = match name.unwrap_or("small") {
            "small" => Net::default(),
            "big" => Net {
                preset: Some("big".into()),
                width: 64,
                depths: vec![2, 2, 6],
                windows: vec![12, 12, 6],
            },
            other => bail!("unknown preset `{other}`"),
        };
        // per-stage lists follow a depth the user changes
        if let (Some(Value::Sequence(d)), None) = (user.get("depths"), user.get("windows")) {
            net.windows = vec![0; d.len()];
        }
        Ok(serde_yaml_ng::to_value(net)?)
    }

    const NET_PRESETS: [PresetSection; 2] = [
        PresetSection {
            path: "net",
            expand: net_preset,
        },
        PresetSection {
            path: "teacher",
            expand: net_preset,
        },
    ];

    #[test]
    fn preset_is_a_layer_under_the_file_and_the_sets() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "x.yaml", "net:\n  preset: big\n  width: 32\n");
        let cfg: WithNet = load_with_presets(Some(&p), &[], &NET_PRESETS).unwrap();
        let big = Net {
            preset: Some("big".into()),
            width: 32,
            depths: vec![2, 2, 6],
            windows: vec![12, 12, 6],
        };
        assert_eq!(cfg.net, big);
        assert_eq!(cfg.teacher, None);
        let s = sets(&["net.width=16", "net.depths=[1,1]", "teacher.preset=big"]);
        let cfg: WithNet = load_with_presets(Some(&p), &s, &NET_PRESETS).unwrap();
        assert_eq!((cfg.net.width, &cfg.net.depths), (16, &vec![1, 1]));
        assert_eq!(cfg.net.windows, vec![0, 0]);
        assert_eq!(cfg.teacher.as_ref().map(|t| t.width), Some(64));
        // no preset named: the section's default preset
        let cfg: WithNet = load_with_presets(None, &sets(&["net.width=3"]), &NET_PRESETS).unwrap();
        assert_eq!(
            cfg.net,
            Net {
                width: 3,
                ..Net::default()
            }
        );
        // the written config loads back to the same values
        let q = write(dir.path(), "config.yaml", &to_yaml(&cfg).unwrap());
        let again: WithNet = load_with_presets(Some(&q), &[], &NET_PRESETS).unwrap();
        assert_eq!(again, cfg);
    }

    #[test]
    fn preset_errors_name_the_source_and_unknown_keys_still_get_hints() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "x.yaml", "net:\n  preset: huge\n");
        let err = load_with_presets::<WithNet>(Some(&p), &[], &NET_PRESETS)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!("{}: key `net.preset`: unknown preset `huge`", p.display())
        );
        let err = load_with_presets::<WithNet>(None, &sets(&["teacher.preset=3"]), &NET_PRESETS)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "--set teacher.preset=3: key `teacher.preset`: expected a preset name, got Number(3)"
        );
        let s = sets(&["teacher.preset=big", "teacher.widht=4"]);
        let err = load_with_presets::<WithNet>(None, &s, &NET_PRESETS)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "--set teacher.widht=4: unknown key `teacher.widht` (did you mean `teacher.width`?)"
        );
    }
}
