//! Printing results as human-readable text or as JSON (`--json`).

use serde::Serialize;
use std::io::Write;

/// Where and how subcommands print their results.
pub struct Output {
    pub json: bool,
}

impl Output {
    /// Print `value` as one JSON document, or `human()` as text.
    pub fn emit<T: Serialize>(
        &self,
        value: &T,
        human: impl FnOnce() -> String,
    ) -> anyhow::Result<()> {
        let text = if self.json {
            serde_json::to_string(value)?
        } else {
            human()
        };
        if text.is_empty() {
            return Ok(());
        }
        match writeln!(std::io::stdout().lock(), "{}", text.trim_end_matches('\n')) {
            // The reader went away (`imctl ... | head`): not an error.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => Ok(other?),
        }
    }
}
