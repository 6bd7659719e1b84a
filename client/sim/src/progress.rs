//! Progress for long CLI runs: an indicatif bar on a terminal, a line every 10%
//! otherwise (so logs stay readable).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};

pub struct Bar {
    bar: Option<indicatif::ProgressBar>,
    len: u64,
    label: String,
    /// Last tenth printed (plain mode).
    tenth: AtomicU64,
    plain_lines: bool,
}

impl Bar {
    pub fn new(len: u64, label: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(len);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b.set_message(label.to_string());
            b
        });
        Bar {
            bar,
            len: len.max(1),
            label: label.to_string(),
            tenth: AtomicU64::new(0),
            plain_lines: true,
        }
    }

    /// A bar that prints nothing of its own when stderr is not a terminal (the caller
    /// prints its own progress lines).
    pub fn terminal_only(len: u64, label: &str) -> Self {
        Bar {
            plain_lines: false,
            ..Bar::new(len, label)
        }
    }

    /// Sets the position (and a short status after the bar).
    pub fn set(&self, pos: u64) {
        match &self.bar {
            Some(b) => b.set_position(pos),
            None if !self.plain_lines => {}
            None => {
                let tenth = pos * 10 / self.len;
                if self.tenth.fetch_max(tenth, Ordering::Relaxed) < tenth {
                    eprintln!("{}: {pos}/{} ({}%)", self.label, self.len, tenth * 10);
                }
            }
        }
    }

    pub fn message(&self, msg: &str) {
        if let Some(b) = &self.bar {
            b.set_message(format!("{} {msg}", self.label));
        }
    }

    /// A line above the bar (or a plain line).
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
