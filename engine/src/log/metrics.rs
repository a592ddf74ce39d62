//! RUN_DIR/metrics.jsonl: one JSON object per line,
//! `{"step":..,"epoch":..,"split":"train"|"eval", <metric>: value, ...}`.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Appends metric lines to a JSONL file, one flushed line per `write`.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens for appending; when `resume_step` is Some(s), first drops existing lines whose
    /// step > s (what a crashed run wrote after its last checkpoint), rewriting the file
    /// atomically. Lines that do not parse (a half-written last line) are dropped too.
    pub fn open(path: &Path, resume_step: Option<u64>) -> Result<Self> {
        let name = path.display();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("{}: creating folder", dir.display()))?;
        }
        if let (Some(s), true) = (resume_step, path.exists()) {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("{name}: cannot read"))?;
            let mut kept = String::with_capacity(text.len());
            for line in text.lines() {
                let step = serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64));
                if step.is_some_and(|step| step <= s) {
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
            if kept.len() != text.len() {
                crate::fsutil::write_atomic(path, kept.as_bytes())?;
            }
        }
        let file = File::options()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("{name}: cannot open for appending"))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Writes one line `{"step", "epoch", "split", metrics...}` in that key order and flushes it.
    /// Non-finite values are written as `null` (JSON has no NaN).
    pub fn write(
        &mut self,
        step: u64,
        epoch: usize,
        split: &str,
        metrics: &[(String, f64)],
    ) -> Result<()> {
        let mut line = format!(
            "{{\"step\":{step},\"epoch\":{epoch},\"split\":{}",
            serde_json::to_string(split)?
        );
        for (i, (key, value)) in metrics.iter().enumerate() {
            if matches!(key.as_str(), "step" | "epoch" | "split")
                || metrics[..i].iter().any(|(k, _)| k == key)
            {
                bail!("{}: duplicate metric key `{key}`", self.path.display());
            }
            let value = if value.is_finite() {
                serde_json::to_string(value)?
            } else {
                "null".to_string()
            };
            line.push_str(&format!(",{}:{value}", serde_json::to_string(key)?));
        }
        line.push_str("}\n");
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .with_context(|| format!("{}: cannot write", self.path.display()))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads every line of a metrics.jsonl file (errors name the file and line number).
pub fn read_metrics(path: &Path) -> Result<Vec<serde_json::Map<String, serde_json::Value>>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}: line {}: not a JSON object", path.display(), i + 1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pairs: &[(&str, f64)]) -> Vec<(String, f64)> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn writes_ordered_lines_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run/metrics.jsonl");
        let mut log = MetricsLog::open(&p, None).unwrap();
        log.write(10, 0, "train", &m(&[("loss", 0.5), ("lr", 1e-4)]))
            .unwrap();
        log.write(20, 1, "eval", &m(&[("acc", 0.75), ("nan", f64::NAN)]))
            .unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(
            text,
            "{\"step\":10,\"epoch\":0,\"split\":\"train\",\"loss\":0.5,\"lr\":0.0001}\n\
             {\"step\":20,\"epoch\":1,\"split\":\"eval\",\"acc\":0.75,\"nan\":null}\n"
        );
        let rows = read_metrics(&p).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1]["acc"], 0.75);
        let err = log
            .write(30, 1, "train", &m(&[("step", 1.0)]))
            .unwrap_err()
            .to_string();
        assert!(err.ends_with("duplicate metric key `step`"), "{err}");
    }

    #[test]
    fn resume_drops_later_steps_and_appends() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::open(&p, None).unwrap();
        for step in [100, 200, 300, 400] {
            log.write(step, 0, "train", &m(&[("loss", step as f64)]))
                .unwrap();
        }
        drop(log);
        // A crash mid-line leaves a fragment.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"{\"step\":5")
            .unwrap();
        let mut log = MetricsLog::open(&p, Some(200)).unwrap();
        log.write(300, 0, "train", &m(&[("loss", 3.5)])).unwrap();
        let steps: Vec<u64> = read_metrics(&p)
            .unwrap()
            .iter()
            .map(|r| r["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, vec![100, 200, 300]);
        assert_eq!(read_metrics(&p).unwrap()[2]["loss"], 3.5);
    }

    #[test]
    fn bad_line_error_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        std::fs::write(&p, "{\"step\":1}\nnot json\n").unwrap();
        let err = read_metrics(&p).unwrap_err().to_string();
        assert_eq!(err, format!("{}: line 2: not a JSON object", p.display()));
    }
}
