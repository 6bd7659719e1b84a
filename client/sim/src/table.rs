//! Benchmark tables: printed as Markdown, optionally written as Markdown or JSON files
//! (`--markdown PATH`, `--json PATH`) so runs can be kept and compared.

use std::path::PathBuf;

use anyhow::Context;

/// One benchmark's result.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Table {
    pub title: String,
    pub headers: Vec<String>,
    pub rows: Vec<Vec<String>>,
    /// Lines printed under the table (setup, derived figures).
    pub notes: Vec<String>,
}

/// Where `--markdown` and `--json` asked the tables to go.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Outputs {
    /// Also write the table(s) as Markdown to this file.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Also write the table(s) as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl Table {
    pub fn new(title: impl Into<String>, headers: &[&str]) -> Self {
        Table {
            title: title.into(),
            headers: headers.iter().map(|h| (*h).to_string()).collect(),
            ..Table::default()
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len());
        self.rows.push(cells);
    }

    pub fn note(&mut self, line: impl Into<String>) {
        self.notes.push(line.into());
    }

    pub fn markdown(&self) -> String {
        let mut s = format!(
            "{}\n\n| {} |\n|{}\n",
            self.title,
            self.headers.join(" | "),
            "---|".repeat(self.headers.len())
        );
        for r in &self.rows {
            s.push_str(&format!("| {} |\n", r.join(" | ")));
        }
        if !self.notes.is_empty() {
            s.push('\n');
            for n in &self.notes {
                s.push_str(n);
                s.push('\n');
            }
        }
        s
    }
}

impl Outputs {
    /// Prints `tables` and writes the files asked for.
    ///
    /// # Errors
    /// A file cannot be written.
    pub fn emit(&self, tables: &[Table]) -> anyhow::Result<()> {
        let md: Vec<String> = tables.iter().map(Table::markdown).collect();
        println!();
        println!("{}", md.join("\n"));
        if let Some(p) = &self.markdown {
            std::fs::write(p, md.join("\n")).with_context(|| format!("writing {}", p.display()))?;
        }
        if let Some(p) = &self.json {
            std::fs::write(p, serde_json::to_vec_pretty(tables)?)
                .with_context(|| format!("writing {}", p.display()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_and_json() {
        let mut t = Table::new("bench x", &["phase", "rate"]);
        t.row(vec!["push".into(), "10".into()]);
        t.note("note");
        assert_eq!(
            t.markdown(),
            "bench x\n\n| phase | rate |\n|---|---|\n| push | 10 |\n\nnote\n"
        );
        let j = serde_json::to_value([&t]).unwrap();
        assert_eq!(j[0]["rows"][0][1], "10");
    }
}
