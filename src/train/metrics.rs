//! Training metrics: one JSON object per line (appended and flushed every step, so a crash keeps
//! what was logged), and an SVG plot of chosen series against the step, rewritten beside it.

use crate::error::{Error, Result};
use serde_json::Value;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// An append-only metrics file.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
    rows: Vec<Value>,
    /// The lines in the file, as written.
    text: String,
}

/// Rows kept from a log's text, before the file is (re)written and opened.
struct Kept {
    rows: Vec<Value>,
    text: String,
}

/// Whether `text`'s rows up to `step` are the log whose [`MetricsLog::checksum`] is `checksum`.
pub fn log_matches(text: &str, step: u64, checksum: &str) -> bool {
    MetricsLog::keep_rows(text, step).checksum() == checksum
}

/// FNV-1a of a log's text, in hex ([`MetricsLog::checksum`]).
fn checksum_of(text: &str) -> String {
    format!("{:016x}", crate::data::corpus::fnv1a64(text.as_bytes()))
}

impl Kept {
    fn checksum(&self) -> String {
        checksum_of(&self.text)
    }

    /// The log at `path` from these rows (`rewrite`: the file is replaced by them first).
    fn start(self, path: &Path, rewrite: bool) -> Result<MetricsLog> {
        if rewrite {
            crate::io::write_atomic(path, |w| w.write_all(self.text.as_bytes()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file,
            rows: self.rows,
            text: self.text,
        })
    }
}

impl MetricsLog {
    /// Open `path` for a run at step `step` (0 = a fresh run): the rows already there up to that
    /// step (a resumed run's history) are kept, later ones (an earlier attempt that went on past
    /// the checkpoint, or an older run in the same directory) are dropped from the file, which is
    /// then appended to. With `checksum` (the resumed checkpoint's record of its log), the kept
    /// rows must be that log: another run's rows in the directory are dropped too, and the log
    /// starts after the checkpoint, as in a fresh directory.
    pub fn open(path: &Path, step: u64, checksum: Option<&str>) -> Result<MetricsLog> {
        Self::open_resumed(path, step, checksum, None)
    }

    /// [`MetricsLog::open`] for a resumed run whose checkpoint holds its own copy of the log up
    /// to its step (`log`, see [`TrainState::log`](super::TrainState::log)): when that copy is
    /// the checkpoint's log (its checksum matches), it becomes the file, whatever `path` held.
    pub fn open_resumed(
        path: &Path,
        step: u64,
        checksum: Option<&str>,
        log: Option<&str>,
    ) -> Result<MetricsLog> {
        if let Some(text) = log {
            let copy = Self::keep_rows(text, step);
            if checksum.is_none_or(|c| c == copy.checksum()) {
                return copy.start(path, true);
            }
        }
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut kept = Self::keep_rows(&text, step);
        if checksum.is_some_and(|c| c != kept.checksum()) {
            kept = Self::keep_rows("", 0);
        }
        let rewrite = kept.rows.len() != text.lines().count();
        kept.start(path, rewrite)
    }

    /// The rows of `text` with steps 1..=step, each with its line as written (re-serialising the
    /// parsed value could move a float by an ulp: the file must read as an uninterrupted run's).
    fn keep_rows(text: &str, step: u64) -> Kept {
        let mut kept = Kept {
            rows: Vec::new(),
            text: String::new(),
        };
        for l in text.lines() {
            let Ok(r) = serde_json::from_str::<Value>(l) else {
                continue;
            };
            if r.get("step")
                .and_then(Value::as_u64)
                .is_some_and(|s| (1..=step).contains(&s))
            {
                kept.text.push_str(l);
                kept.text.push('\n');
                kept.rows.push(r);
            }
        }
        kept
    }

    /// Append one row.
    pub fn log(&mut self, row: Value) -> Result<()> {
        let line = format!("{row}\n");
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| Error::io(&self.path, e))?;
        self.file.flush().map_err(|e| Error::io(&self.path, e))?;
        self.text.push_str(&line);
        self.rows.push(row);
        Ok(())
    }

    /// A checksum of the file's lines (FNV-1a, hex): a checkpoint records it, so that a resume
    /// keeps only rows of its own run.
    pub fn checksum(&self) -> String {
        checksum_of(&self.text)
    }

    /// The file's text (every row as written): a checkpoint keeps a copy.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Rows logged so far (including those of a resumed run).
    pub fn rows(&self) -> &[Value] {
        &self.rows
    }

    /// Write an SVG line plot of `keys` against "step" to `svg` (atomically).
    pub fn write_svg(&self, svg: &Path, title: &str, keys: &[&str]) -> Result<()> {
        let doc = plot_svg(&self.rows, title, keys);
        crate::io::write_atomic(svg, |w| w.write_all(doc.as_bytes()))
    }
}

/// A self-contained SVG (no scripts, no external fonts) with one polyline per key.
pub fn plot_svg(rows: &[Value], title: &str, keys: &[&str]) -> String {
    const W: f64 = 720.0;
    const H: f64 = 400.0;
    const PAD: f64 = 50.0;
    const COLORS: [&str; 6] = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
    ];
    let series: Vec<Vec<(f64, f64)>> = keys
        .iter()
        .map(|k| {
            rows.iter()
                .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(*k)?.as_f64()?)))
                .filter(|(_, y)| y.is_finite())
                .collect()
        })
        .collect();
    let all = series.iter().flatten();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 == x0 {
        x1 = x0 + 1.0;
    }
    if y1 == y0 {
        y1 = y0 + 1.0;
    }
    let sx = |x: f64| PAD + (x - x0) / (x1 - x0) * (W - 2.0 * PAD);
    let sy = |y: f64| H - PAD - (y - y0) / (y1 - y0) * (H - 2.0 * PAD);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="20" text-anchor="middle" font-size="14">{}</text>"#,
        W / 2.0,
        escape(title)
    );
    let _ = writeln!(
        s,
        r#"<path d="M{PAD},{PAD} V{} H{}" stroke="black" fill="none"/>"#,
        H - PAD,
        W - PAD
    );
    for (v, y) in [
        (y0, sy(y0)),
        (y1, sy(y1)),
        ((y0 + y1) / 2.0, sy((y0 + y1) / 2.0)),
    ] {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{v:.4}</text>"#,
            PAD - 4.0,
            y + 4.0
        );
    }
    for (v, x) in [(x0, sx(x0)), (x1, sx(x1))] {
        let _ = writeln!(
            s,
            r#"<text x="{x}" y="{}" text-anchor="middle">{v}</text>"#,
            H - PAD + 16.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">step</text>"#,
        W / 2.0,
        H - 10.0
    );
    for (i, (k, pts)) in keys.iter().zip(&series).enumerate() {
        let color = COLORS[i % COLORS.len()];
        let d: Vec<String> = pts
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        if !d.is_empty() {
            let _ = writeln!(
                s,
                r#"<polyline points="{}" stroke="{color}" fill="none" stroke-width="1.5"/>"#,
                d.join(" ")
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" fill="{color}">{}</text>"#,
            W - PAD - 150.0,
            PAD + 16.0 * i as f64,
            escape(k)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::MetricsLog;

    /// A resume keeps the rows up to its step exactly as they were written (a float that
    /// serde_json would print one ulp apart after a parse included) and drops the later ones.
    #[test]
    fn resume_keeps_earlier_rows_byte_for_byte() {
        let dir = std::env::temp_dir().join(format!("retrom3-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        let rows = [
            r#"{"step":1,"loss":59.655338287353516}"#,
            r#"{"step":2,"loss":21.627803802490234}"#,
            r#"{"step":3,"loss":1.5}"#,
        ];
        std::fs::write(&path, rows.join("\n") + "\n").unwrap();
        let log = MetricsLog::open(&path, 2, None).unwrap();
        assert_eq!(log.rows().len(), 2);
        let sum = log.checksum();
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("{}\n{}\n", rows[0], rows[1]));
        // The checkpoint's checksum of its log: the rows are kept; another's: dropped.
        let mut log = MetricsLog::open(&path, 2, Some(&sum)).unwrap();
        assert_eq!(log.rows().len(), 2);
        log.log(serde_json::json!({"step": 3, "loss": 1.25}))
            .unwrap();
        let three = log.checksum();
        let copy = log.text().to_string();
        drop(log);
        let log = MetricsLog::open(&path, 3, Some(&three)).unwrap();
        assert_eq!(log.rows().len(), 3);
        drop(log);
        let log = MetricsLog::open(&path, 2, Some("0123456789abcdef")).unwrap();
        assert!(log.rows().is_empty());
        drop(log);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        // A checkpoint's own copy of its log (rows 1..=3 as written) restores the file, whatever
        // it held (here nothing; a later attempt's rows; another run's).
        for held in ["", "{\"step\":1,\"loss\":7.0}\n", &copy] {
            std::fs::write(&path, held).unwrap();
            let log = MetricsLog::open_resumed(&path, 3, Some(&three), Some(&copy)).unwrap();
            assert_eq!(log.rows().len(), 3);
            assert_eq!(log.checksum(), three);
            drop(log);
            assert_eq!(std::fs::read_to_string(&path).unwrap(), copy);
        }
        // A copy that is not the checkpoint's log is not used.
        std::fs::write(&path, "").unwrap();
        let log = MetricsLog::open_resumed(&path, 3, Some(&three), Some(rows[0])).unwrap();
        assert!(log.rows().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
