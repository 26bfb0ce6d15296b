//! Progress reporting on stderr: a bar for terminals, JSON lines for orchestrators.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// Nothing.
    None,
    /// A redrawn bar with bytes, rate and ETA.
    Bar,
    /// One JSON object per line: `{"done":N,"total":N,"percent":F,"rate":F,"eta_seconds":F}`.
    Json,
}

impl ProgressMode {
    /// The bar when stderr is a terminal or `-p` was given, unless a mode was named.
    pub fn choose(named: Option<ProgressMode>, p_flag: bool) -> Self {
        match named {
            Some(m) => m,
            None if p_flag || std::io::stderr().is_terminal() => ProgressMode::Bar,
            None => ProgressMode::None,
        }
    }
}

/// A progress reporter; call [`Progress::update`] often, it throttles itself.
pub struct Progress {
    mode: ProgressMode,
    start: Instant,
    last: Option<Instant>,
    label: String,
}

impl Progress {
    /// A reporter for an operation called `label`.
    pub fn new(mode: ProgressMode, label: &str) -> Self {
        Progress {
            mode,
            start: Instant::now(),
            last: None,
            label: label.to_string(),
        }
    }

    /// Reports `done` of `total` bytes.
    pub fn update(&mut self, done: u64, total: u64) {
        if self.mode == ProgressMode::None {
            return;
        }
        let now = Instant::now();
        let interval = match self.mode {
            ProgressMode::Json => Duration::from_millis(500),
            _ => Duration::from_millis(100),
        };
        if let Some(last) = self.last {
            if now.duration_since(last) < interval && done < total {
                return;
            }
        }
        self.last = Some(now);
        self.draw(done, total, now);
    }

    fn draw(&self, done: u64, total: u64, now: Instant) {
        let secs = now.duration_since(self.start).as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        let pct = if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        };
        let eta = if rate > 0.0 {
            total.saturating_sub(done) as f64 / rate
        } else {
            0.0
        };
        let mut err = std::io::stderr().lock();
        match self.mode {
            ProgressMode::Json => {
                let line = serde_json::json!({
                    "operation": self.label,
                    "done": done,
                    "total": total,
                    "percent": (pct * 100.0).round() / 100.0,
                    "rate_bytes_per_second": rate.round(),
                    "eta_seconds": (eta * 10.0).round() / 10.0,
                });
                let _ = writeln!(err, "{line}");
            }
            ProgressMode::Bar => {
                let width = 30usize;
                let filled = ((pct / 100.0) * width as f64).round() as usize;
                let bar: String =
                    "#".repeat(filled.min(width)) + &"-".repeat(width - filled.min(width));
                let _ = write!(
                    err,
                    "\r{} [{bar}] {pct:5.1}% {} / {} {}/s ETA {}   ",
                    self.label,
                    human(done),
                    human(total),
                    human(rate as u64),
                    eta_text(eta)
                );
                let _ = err.flush();
            }
            ProgressMode::None => {}
        }
    }

    /// Ends the display (a newline after the bar).
    pub fn finish(&mut self, total: u64) {
        if self.mode == ProgressMode::None {
            return;
        }
        self.draw(total, total, Instant::now());
        if self.mode == ProgressMode::Bar {
            let _ = writeln!(std::io::stderr());
        }
    }
}

/// Bytes in binary units, like `1.5 GiB`.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS.get(u).copied().unwrap_or("B"))
    }
}

fn eta_text(secs: f64) -> String {
    let s = secs.round() as u64;
    format!("{:02}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}
