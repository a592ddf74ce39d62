//! A per-epoch progress bar with rate, ETA and a message (loss, lr). On a terminal it is an
//! indicatif bar; otherwise (CI, pipes) a plain line every `plain_every` steps:
//! `epoch 3/10 step 120/469 (25.6%) 41.2 it/s eta 8s loss 0.4312 lr 1.2e-4`.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Progress of one epoch (or any counted loop).
pub struct Progress {
    label: String,
    total: u64,
    start: u64,
    plain_every: u64,
    started: Instant,
    pos: AtomicU64,
    msg: Mutex<String>,
    bar: Option<ProgressBar>,
    /// Counts but shows nothing ([`Progress::silent`]).
    silent: bool,
}

impl Progress {
    /// A bar labelled `label` (e.g. "epoch 3/10") over `total` steps, starting at `start` (a run
    /// resumed mid-epoch). Plain lines come every `max(1, total / 10)` steps; see `plain_every`.
    pub fn new(label: &str, total: u64, start: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template(
                "{prefix} [{bar:30.cyan/blue}] {pos}/{len} ({percent}%) {per_sec} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(label.to_string());
            bar.set_position(start);
            bar.reset_eta();
            bar
        });
        Self {
            label: label.to_string(),
            total,
            start,
            plain_every: (total / 10).max(1),
            started: Instant::now(),
            pos: AtomicU64::new(start),
            msg: Mutex::new(String::new()),
            bar,
            silent: false,
        }
    }

    /// The same bar, never shown (a data-parallel rank other than 0: one bar per run).
    pub fn silent(mut self) -> Self {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        self.silent = true;
        self
    }

    /// Sets how many steps pass between plain (non-terminal) lines.
    pub fn plain_every(mut self, n: u64) -> Self {
        self.plain_every = n.max(1);
        self
    }

    /// Sets the message shown after the rate (e.g. "loss 0.4312 lr 1.2e-4").
    pub fn set_message(&self, msg: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(msg.to_string()),
            None => *self.msg.lock().unwrap_or_else(|e| e.into_inner()) = msg.to_string(),
        }
    }

    /// Advances by `n` steps.
    pub fn inc(&self, n: u64) {
        let before = self.pos.fetch_add(n, Ordering::Relaxed);
        let pos = before + n;
        match &self.bar {
            Some(bar) => bar.inc(n),
            None if self.silent => {}
            None => {
                if pos / self.plain_every != before / self.plain_every || pos == self.total {
                    eprintln!("{}", self.plain_line(pos));
                }
            }
        }
    }

    /// Ends the bar, leaving `msg` as its last word.
    pub fn finish(&self, msg: &str) {
        match &self.bar {
            Some(bar) => bar.finish_with_message(msg.to_string()),
            None if self.silent => {}
            None => {
                let pos = self.pos.load(Ordering::Relaxed);
                let secs = self.started.elapsed().as_secs_f64();
                let done = pos.saturating_sub(self.start);
                let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
                eprintln!(
                    "{} done {pos}/{} steps in {secs:.1}s ({rate:.1} it/s) {msg}",
                    self.label, self.total
                );
            }
        }
    }

    /// The plain line at position `pos`.
    fn plain_line(&self, pos: u64) -> String {
        let msg = self.msg.lock().unwrap_or_else(|e| e.into_inner()).clone();
        plain_line(
            &self.label,
            pos,
            self.total,
            pos - self.start,
            self.started.elapsed(),
            &msg,
        )
    }
}

/// `label step pos/total (pct%) rate it/s eta T msg`, the rate from `done` steps in `elapsed`.
fn plain_line(
    label: &str,
    pos: u64,
    total: u64,
    done: u64,
    elapsed: Duration,
    msg: &str,
) -> String {
    let pct = if total == 0 {
        100.0
    } else {
        100.0 * pos as f64 / total as f64
    };
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    let eta = if rate > 0.0 {
        fmt_duration(total.saturating_sub(pos) as f64 / rate)
    } else {
        "?".into()
    };
    let mut line = format!("{label} step {pos}/{total} ({pct:.1}%) {rate:.1} it/s eta {eta}");
    if !msg.is_empty() {
        line.push(' ');
        line.push_str(msg);
    }
    line
}

/// A duration as `8s`, `2m05s` or `1h02m`.
fn fmt_duration(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_line_format() {
        // 96 steps done (resumed at 24) in 2.33 s -> 41.2 it/s; 349 left -> 8.47 s -> "8s".
        let line = plain_line(
            "epoch 3/10",
            120,
            469,
            96,
            Duration::from_millis(2330),
            "loss 0.4312 lr 1.2e-4",
        );
        assert_eq!(
            line,
            "epoch 3/10 step 120/469 (25.6%) 41.2 it/s eta 8s loss 0.4312 lr 1.2e-4"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(fmt_duration(8.4), "8s");
        assert_eq!(fmt_duration(125.0), "2m05s");
        assert_eq!(fmt_duration(3720.0), "1h02m");
    }

    #[test]
    fn counts_steps_without_terminal() {
        let p = Progress::new("epoch 1/1", 10, 2).plain_every(4);
        p.set_message("loss 1.0");
        p.inc(3);
        p.inc(5);
        assert_eq!(p.pos.load(Ordering::Relaxed), 10);
        p.finish("ok");
    }
}
